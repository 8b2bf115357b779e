"""Never lose a run: kill -9 and rerun, a checkpoint cut off mid-save, export of any checkpoint,
no secrets in what a run writes. CPU, real DeepSpeed, 1 and 2 processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, check_ok, command, launch, load_script, only_run_dir, read_summary

CKPT = ["--logging_steps", "1", "--eval_strategy", "no", "--heldout_eval", "false", "--save_strategy", "steps"]


def logged_steps(run_dir) -> list[int]:
    state = json.loads((run_dir / "checkpoints" / "trainer_state.json").read_text())
    return [r["step"] for r in state["log_history"] if "loss" in r]


@pytest.mark.slow
def test_kill_9_mid_training_then_the_same_command_resumes(tmp_path):
    """2 processes; kill -9 the whole job after its second checkpoint; the same command resumes from the last
    complete checkpoint, continues the same W&B run (offline here) and the loss curve, loses only later steps."""
    args = [*CKPT, "--save_steps", "4", "--max_steps", "40", "--report_to", "wandb"]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HOME": str(tmp_path / "home")}
    cmd, full_env = command(args, tmp_path, nproc=2, launcher="deepspeed", env=env)
    job = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.time() + 300
    marker = None
    while time.time() < deadline and job.poll() is None:
        runs = [p for p in tmp_path.iterdir() if p.is_dir() and p.name != "home"]
        found = list(runs[0].glob("checkpoints/checkpoint-8/checkpoint_complete.json")) if runs else []
        if found:
            marker = found[0]
            break
        time.sleep(0.2)
    assert marker is not None and job.poll() is None, "the job ended or never saved checkpoint-8"
    os.killpg(job.pid, signal.SIGKILL)  # the whole job: launcher and both ranks
    job.wait(timeout=30)
    run_dir = marker.parents[2]
    saved = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*")
                   if (p / "checkpoint_complete.json").exists())
    assert not (run_dir / "summary.json").exists() and saved[-1] < 40

    proc = launch(args, tmp_path, nproc=2, launcher="deepspeed", env=env)  # the same command again
    check_ok(proc)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"checkpoint-{saved[-1]}")
    assert summary["global_step"] == 40
    steps = logged_steps(run_dir)
    assert steps == list(range(1, 41)), steps  # one curve: the steps before the checkpoint, then the rest
    # the same W&B run continued: both offline run folders carry the run id kept in the run folder
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    offline = sorted(p.name for p in (run_dir / "wandb").glob("**/offline-run-*") if p.is_dir())
    assert len(offline) == 2 and all(name.endswith(run_id) for name in offline), (offline, run_id)


def test_a_checkpoint_cut_off_mid_save_is_skipped(tmp_path):
    """A newest checkpoint without its completion marker and with a truncated shard (what a kill during a save
    leaves) is skipped and kept aside; the run resumes from the one before and finishes."""
    args = [*CKPT, "--save_steps", "5", "--report_to", "none"]
    check_ok(launch([*args, "--max_steps", "10"], tmp_path))
    ckpts = only_run_dir(tmp_path) / "checkpoints"
    cut = ckpts / "checkpoint-10"
    (cut / "checkpoint_complete.json").unlink()
    shard = next(cut.glob("global_step10/*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])
    proc = launch([*args, "--max_steps", "15"], tmp_path)
    check_ok(proc)
    summary = read_summary(tmp_path)
    assert summary["resumed_from"].endswith("checkpoint-5") and summary["global_step"] == 15
    assert (ckpts / "incomplete-checkpoint-10").is_dir() and "incomplete" in proc.stderr
    assert (ckpts / "checkpoint-10" / "checkpoint_complete.json").exists()  # saved again, whole this time
    assert (ckpts / "checkpoint-15" / "checkpoint_complete.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage,gather", [("2", True), ("3", True), ("3", False)])
def test_export_any_checkpoint_to_a_hf_folder(tmp_path, stage, gather):
    """ZeRO-2 and ZeRO-3 (with and without gathered 16-bit weights) checkpoints become safetensors folders that
    from_pretrained loads and that give the run's own eval loss; --fp32 takes the master weights."""
    extra = []
    if not gather:
        config = json.loads((ROOT / "ds_configs" / "stage3.json").read_text())
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
        (tmp_path / "s3.json").write_text(json.dumps(config))
        extra = ["--deepspeed", str(tmp_path / "s3.json"), "--save_final_model", "false"]
    else:
        extra = ["--zero_stage", stage]
    runs = tmp_path / "runs"
    args = [*CKPT, "--save_steps", "6", "--max_steps", "6", "--report_to", "none", "--eval_strategy", "no",
            "--eval_dataset_name", "data/test.jsonl", "--max_eval_samples", "64", *extra]
    check_ok(launch(args, runs, nproc=2, launcher="deepspeed"))
    run = only_run_dir(runs)
    trained = read_summary(runs)["eval_loss"]
    ckpt = run / "checkpoints" / "checkpoint-6"
    for flags in ([], ["--fp32"]):
        out = tmp_path / f"export{''.join(flags)}"
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), str(ckpt), "--out", str(out), *flags],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
        evals = tmp_path / f"eval{''.join(flags)}"
        check_ok(launch(["--eval_only", "--model_name_or_path", str(out), "--eval_dataset_name", "data/test.jsonl",
                         "--max_eval_samples", "64", "--heldout_eval", "false", "--report_to", "none"], evals))
        assert read_summary(evals)["eval_loss"] == pytest.approx(trained, rel=1e-3), flags


def test_export_refuses_what_it_cannot_export(tmp_path):
    empty = tmp_path / "checkpoint-3"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), str(empty), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "neither model weights nor DeepSpeed ZeRO shards" in proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), str(tmp_path / "nope"), "--out",
                           str(tmp_path / "out2")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "is not a folder" in proc.stderr


def test_no_secret_in_anything_a_run_writes(tmp_path):
    """HF_TOKEN, WANDB_API_KEY and any *_TOKEN / *_KEY / *_SECRET variable never reach results/, checkpoints,
    logs or the W&B config (offline run files included); weights are safetensors; remote code stays off."""
    secrets = {"HF_TOKEN": "hf_SECRETtokenvalue123456", "WANDB_API_KEY": "wandbSECRETkey0123456789abcdef01234567",
               "MY_SERVICE_TOKEN": "svcSECRETtoken987", "OPENAI_API_KEY": "sk-SECRETkey42", "HOME": str(tmp_path / "h"),
               "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = launch([*CKPT, "--save_steps", "3", "--max_steps", "3", "--report_to", "wandb"], tmp_path / "runs",
                  env=secrets)
    check_ok(proc)
    run = only_run_dir(tmp_path / "runs")
    leaks = []
    for path in [p for p in run.rglob("*") if p.is_file()]:
        data = path.read_bytes()
        leaks += [f"{path.relative_to(run)}: {name}" for name, value in secrets.items()
                  if name not in ("HOME", "WANDB_MODE", "WANDB_SILENT") and value.encode() in data]
    for stream in (proc.stdout, proc.stderr):
        leaks += [f"log: {n}" for n, v in secrets.items() if n.endswith(("TOKEN", "KEY")) and v in stream]
    assert not leaks, leaks
    assert list(run.rglob("*.safetensors")) and not list(run.rglob("pytorch_model*.bin"))
    args = json.loads((run / "args.json").read_text())
    assert not any(v is True for k, v in _flatten(args) if k.endswith("trust_remote_code"))


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def rank_pids(launcher_pid: int, local_rank: int) -> list[int]:
    """PIDs of the job's processes running as LOCAL_RANK=local_rank (found by their environment)."""
    from pathlib import Path

    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text().split()
        except OSError:
            continue
        session = int(stat[5])
        if session == launcher_pid and f"LOCAL_RANK={local_rank}".encode() in env and b"train_ds.py" in \
                (proc / "cmdline").read_bytes():
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "raise"])
def test_one_rank_dies_and_the_whole_job_ends_promptly(tmp_path, how):
    """Rank 1 is killed (-9) or raises mid-training: every process exits within a bounded time (not the
    collective timeout), non-zero, with the failing rank's error in the output."""
    args = [*CKPT, "--save_strategy", "no", "--max_steps", "400", "--report_to", "none"]
    env = {"RECIPE_FAULT": "raise:1:3"} if how == "raise" else {}
    cmd, full_env = command(args, tmp_path, nproc=2, launcher="deepspeed", env=env)
    out = (tmp_path / "out.log").open("w+")
    job = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if how == "kill":
            deadline = time.time() + 240
            while time.time() < deadline and "'loss'" not in (tmp_path / "out.log").read_text():
                time.sleep(0.5)  # training has started on both ranks
            victims = rank_pids(job.pid, 1)
            assert victims, "rank 1 not found"
            killed_at = time.time()
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
        else:
            killed_at = time.time()
        rc = job.wait(timeout=240)
        ended = time.time()
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    text = (tmp_path / "out.log").read_text()
    assert rc != 0
    assert not rank_pids(job.pid, 0), "rank 0 outlived the job"
    if how == "kill":
        assert ended - killed_at < 60, ended - killed_at
        assert "-9" in text or "SIGKILL" in text, text[-3000:]
    else:
        assert "injected fault (RECIPE_FAULT) on rank 1 at step 3" in text, text[-3000:]


def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    args = [*CKPT, "--save_steps", "4", "--max_steps", "30", "--report_to", "none"]
    proc = launch(args, tmp_path, env={"RECIPE_FAULT": "nan:0:10"})
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "became nan at step 11" in proc.stderr and "Last good checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr
    run = only_run_dir(tmp_path)
    saved = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*"))
    assert saved and max(saved) <= 8 and all((run / "checkpoints" / f"checkpoint-{s}" / "checkpoint_complete.json")
                                             .exists() for s in saved)
    assert f"checkpoint-{max(saved)}" in proc.stderr and not (run / "model").exists()


def test_an_unwritable_results_dir_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = launch([*CKPT, "--max_steps", "2", "--report_to", "none"], blocker / "results")
    assert proc.returncode == 2 and "cannot write the run folder" in proc.stderr and "--results_dir" in proc.stderr


def test_out_of_memory_message_says_what_would_fit(monkeypatch):
    from recipe import estimate as E
    from recipe.config import parse_args

    train_ds = load_script(ROOT / "train_ds.py")
    monkeypatch.setattr(E, "run_hardware", lambda: E.Hardware(1, 24, 1, 256, "made-up GPU"))
    _, targs, margs = parse_args(["--model_name_or_path", str(ROOT / "configs" / "models" / "llama-3.2-1b"),
                                  "--per_device_train_batch_size", "16", "--max_length", "2048", "--report_to", "none"])
    text = train_ds.oom_message(targs, margs, RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert "out of GPU memory (CUDA out of memory" in text and "micro-batch 16" in text
    assert "What would fit: --zero_stage" in text and "--zero_stage auto" in text


def test_model_and_tokenizer_errors_say_what_to_do(tmp_path, monkeypatch):
    """A local folder without tokenizer files, a hub id that does not exist (offline here), a gated model."""
    from recipe.config import ConfigError
    from recipe.modeling import load_tokenizer, model_error

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError) as err:
        load_tokenizer(str(folder))
    assert "not a loadable model/tokenizer folder" in str(err.value) and "tokenizer files" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_tokenizer("no-such-org/no-such-model-xyz")
    assert "cannot load 'no-such-org/no-such-model-xyz'" in str(err.value) and "Check the id" in str(err.value)
    gated = model_error("meta-llama/Llama-3.2-1B", OSError("401 Client Error: gated repo"))
    assert "is gated" in gated and "HF_TOKEN" in gated


def test_resume_from_a_path_that_does_not_exist(tmp_path):
    proc = launch([*CKPT, "--max_steps", "2", "--report_to", "none", "--resume_from_checkpoint",
                   str(tmp_path / "checkpoint-99")], tmp_path / "r")
    assert proc.returncode == 2 and "no such checkpoint folder" in proc.stderr and "'last'" in proc.stderr


def can_mount_tmpfs() -> bool:
    try:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                               capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


# in a mount namespace of its own (unshare -rm: no root needed), the run's folder is a small tmpfs; what the run
# wrote is copied out before the namespace, and the tmpfs with it, goes away
ON_SMALL_DISK = """mount -t tmpfs -o size="$1" tmpfs "$2" || exit 90
disk=$2; copy=$3; shift 3
"$@"; rc=$?
cp -a "$disk/." "$copy/"
exit $rc"""


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare -rm (user and mount namespaces) to mount a tmpfs")
def test_a_disk_that_fills_up_during_a_save(tmp_path):
    """A real full disk: results on a 28 MiB tmpfs, where the checkpoint of step 2 (~17 MiB with its optimizer
    state) fits and that of step 4 does not. The run stops (exit 3) naming the disk, the space and the fix;
    checkpoint-2 stays complete, and the same command on a disk with room resumes from it and finishes. The warning
    came at checkpoint-2 already, from its size and the space left."""
    args = [*CKPT, "--save_steps", "2", "--max_steps", "6", "--report_to", "none", "--save_final_model", "false"]
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    disk.mkdir()
    copy.mkdir()
    cmd, env = command(args, disk / "results")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", ON_SMALL_DISK, "sh", "28m", str(disk), str(copy), *cmd],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-4000:]
    assert "needs room for 2 more checkpoint(s) at once (--save_total_limit 2): the disk fills at checkpoint-4" \
        in proc.stderr  # said at checkpoint-2 (the default recipe keeps 2: 2 and 4 before 2 is deleted)
    assert "the disk filled up while saving checkpoint-4" in proc.stderr, proc.stderr[-4000:]
    assert "checkpoint-2 is complete and untouched" in proc.stderr and "--save_total_limit" in proc.stderr
    ckpts = only_run_dir(copy / "results") / "checkpoints"
    assert (ckpts / "checkpoint-2" / "checkpoint_complete.json").is_file()
    assert not (ckpts / "checkpoint-4" / "checkpoint_complete.json").exists()
    proc = launch(args, copy / "results")  # the same command, with room now
    check_ok(proc)
    summary = read_summary(copy / "results")
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 6
    assert (ckpts / "incomplete-checkpoint-4").is_dir()


def test_a_checkpoint_of_another_model_or_method_is_not_resumed(tmp_path):
    """A LoRA run gets its own folder (run name ..._lora); pointed at a full fine-tune's checkpoint anyway (same
    --run_name, or a path), it stops with what differs instead of failing deep inside DeepSpeed's loader."""
    from types import SimpleNamespace

    from recipe.config import ConfigError, parse_args
    from recipe.trainer import CheckpointCompleteCallback

    train_ds = load_script(ROOT / "train_ds.py")
    full, lora = parse_args(["--report_to", "none"]), parse_args(["--use_peft", "true", "--report_to", "none"])
    assert train_ds.run_name_for(*lora) == train_ds.run_name_for(*full) + "_lora"
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    CheckpointCompleteCallback(train_ds.what_trains(full[2])).on_save(
        SimpleNamespace(output_dir=str(tmp_path), world_size=1, save_strategy="no"),
        SimpleNamespace(global_step=4, is_world_process_zero=True), None)
    assert train_ds.resolve_resume(None, str(tmp_path), True, train_ds.what_trains(full[2])) == str(ckpt)
    for value in (None, str(ckpt)):
        with pytest.raises(ConfigError) as err:
            train_ds.resolve_resume(value, str(tmp_path), True, train_ds.what_trains(lora[2]))
        assert "method 'full' there, 'lora' here" in str(err.value) and "--run_name <new name>" in str(err.value)
    assert train_ds.resolve_resume("false", str(tmp_path), True, train_ds.what_trains(lora[2])) is None


@pytest.mark.parametrize("argv,message", [
    (["--global_batch_size", "50", "--per_device_train_batch_size", "32"], "is not a multiple of per-device batch"),
    (["--bf16", "true", "--fp16", "true"], "choose one"),
])
def test_argument_conflicts_are_named(argv, message):
    from recipe.config import ConfigError, parse_args

    with pytest.raises(ConfigError) as err:
        parse_args([*argv, "--report_to", "none"])
    assert message in str(err.value)


def test_eval_only_ignores_a_leftover_accelerate_deepspeed_flag(tmp_path):
    """`accelerate launch --use_deepspeed` (or an earlier Accelerator) leaves ACCELERATE_USE_DEEPSPEED=true;
    --eval_only must still evaluate without DeepSpeed."""
    from recipe.config import parse_args

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        _, args, _ = parse_args(["--eval_only", "--model_name_or_path", "tiny", "--report_to", "none"])
    finally:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    assert args.deepspeed is None and args.deepspeed_plugin is None


def test_every_example_longer_than_max_length_is_named(tmp_path):
    rows = tmp_path / "long.jsonl"
    rows.write_text("".join(json.dumps({"prompt": "x" * 80 + str(i), "completion": "abc"}) + "\n" for i in range(12)))
    proc = launch(["--dataset_name", str(rows), "--eval_dataset_name", str(rows), "--max_length", "64",
                   "--max_steps", "2", "--report_to", "none", "--heldout_eval", "false"], tmp_path / "r")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "none of the 12 train examples has a completion token within --max_length 64" in proc.stderr
    assert "Raise --max_length" in proc.stderr


def test_a_busy_master_port_is_named(monkeypatch):
    import socket

    import torch.distributed

    from recipe.config import ConfigError, parse_args

    # an earlier in-process test may have set up torch.distributed here, which the check rightly skips
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)}.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(ConfigError) as err:
            parse_args(["--report_to", "none"])
    assert f"MASTER_PORT {port} is already in use" in str(err.value)
    assert "--master_port" in str(err.value)


def test_wandb_unreachable_while_logged_in_goes_offline(tmp_path):
    from conftest import free_port

    env = {"WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567", "WANDB_SILENT": "true",
           "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}"}
    proc = launch(["--max_steps", "2", "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
                   "--heldout_eval", "false", "--report_to", "wandb"], tmp_path, env=env, timeout=300)
    check_ok(proc)
    assert "does not answer" in proc.stderr and "logging offline" in proc.stderr
    run_dir = only_run_dir(tmp_path)
    assert read_summary(tmp_path)["wandb"] == "offline"
    assert list((run_dir / "wandb").glob("**/offline-run-*"))
