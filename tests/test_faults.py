"""Never lose a run: kill -9 and rerun, a checkpoint cut off mid-save, export of any checkpoint, no secrets in what
a run writes, a rank that dies, a nan loss, a full disk, and the messages for what cannot work. CPU, real DeepSpeed,
1 and 2 processes.

Default run: the kill -9, cut-off, export and secrets checks read the shared 2-process ZeRO-2 run and its twins
(conftest: zero2_run, killed_and_rerun, cut_and_resumed_on_one); rank death (kill -9 of one rank), the nan loss and
the full disk are a launch each; messages are checked in process, with one bad input end to end through __main__
for its exit code. `-m slow`: ZeRO-3 exports (with and without gathered 16-bit weights), a rank that raises.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import (ROOT, SECRETS, ZERO2_GROUP, ZERO2_SAVE, ZERO2_STEPS, check_ok, command, launch,
                      load_script, logged, only_run_dir, read_summary)

CKPT = ["--logging_steps", "1", "--eval_strategy", "no", "--heldout_eval", "false", "--save_strategy", "steps",
        "--max_train_samples", "64", "--max_eval_samples", "64", "--global_batch_size", "8",
        "--per_device_train_batch_size", "4"]


# ── kill -9, cut off mid-save: the shared ZeRO-2 run's twins ─────────────────


@ZERO2_GROUP
def test_kill_9_mid_training_then_the_same_command_resumes(killed_and_rerun, zero2_run):
    """2 processes; kill -9 the whole job (launcher and both ranks) once checkpoint-4 is complete; the same command
    resumes from the last complete checkpoint, continues the same W&B run (offline here), and its loss curve is the
    uninterrupted run's at every step."""
    after_kill, proc, run_dir = killed_and_rerun["after_kill"], killed_and_rerun["proc"], killed_and_rerun["dir"]
    saved = after_kill["checkpoints"]
    assert not after_kill["summary"] and saved and ZERO2_SAVE <= saved[-1] < ZERO2_STEPS, after_kill["checkpoints"]

    check_ok(proc)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"checkpoint-{saved[-1]}")
    assert summary["global_step"] == ZERO2_STEPS and summary["world_size"] == 2
    assert "universal checkpoint" not in proc.stdout + proc.stderr  # the same count: the normal resume
    resumed, uninterrupted = logged(run_dir), logged(zero2_run["dir"])
    assert sorted(resumed) == list(range(1, ZERO2_STEPS + 1))  # one curve: the steps before the checkpoint, then on
    for step in range(1, ZERO2_STEPS + 1):
        assert resumed[step]["loss"] == pytest.approx(uninterrupted[step]["loss"], rel=1e-5), step
        assert resumed[step]["learning_rate"] == pytest.approx(uninterrupted[step]["learning_rate"], rel=1e-9), step
    # the same W&B run continued: both offline run folders carry the run id kept in the run folder
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    offline = sorted(p.name for p in (run_dir / "wandb").glob("**/offline-run-*") if p.is_dir())
    assert len(offline) == 2 and all(name.endswith(run_id) for name in offline), (offline, run_id)


@ZERO2_GROUP
def test_a_checkpoint_cut_off_mid_save_is_skipped(cut_and_resumed_on_one):
    """A newest checkpoint without its completion marker and with a truncated shard (what a kill during a save
    leaves) is skipped and kept aside; the run resumes from the one before and finishes, saving that step again.
    (Resumed on 1 process here: test_universal checks the 2 -> 1 side of the same run.)"""
    proc, run_dir = cut_and_resumed_on_one["proc"], cut_and_resumed_on_one["dir"]
    check_ok(proc)
    ckpts = run_dir / "checkpoints"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"checkpoint-{ZERO2_STEPS - ZERO2_SAVE}")
    assert summary["global_step"] == ZERO2_STEPS
    assert (ckpts / f"incomplete-checkpoint-{ZERO2_STEPS}").is_dir() and "incomplete" in proc.stderr
    assert (ckpts / f"checkpoint-{ZERO2_STEPS}" / "checkpoint_complete.json").exists()  # saved again, whole


# ── export ───────────────────────────────────────────────────────────────────


def export_cli(ckpt, out, *flags) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), str(ckpt), "--out", str(out), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def eval_loss_of(model_dir, results) -> float:
    check_ok(launch(["--eval_only", "--model_name_or_path", str(model_dir), "--eval_dataset_name", "data/test.jsonl",
                     "--max_eval_samples", "64", "--heldout_eval", "false", "--report_to", "none"], results))
    return read_summary(results)["eval_loss"]


@ZERO2_GROUP
def test_export_a_zero2_checkpoint_to_a_hf_folder(zero2_run, tmp_path, capsys):
    """The 2-process ZeRO-2 run's last checkpoint becomes a safetensors folder (the weights saved in the checkpoint)
    that --eval_only loads and that gives the run's own eval loss; --fp32 (the master weights from the
    ZeRO shards, zero_to_fp32) gives the same tensors, which are the run's final model."""
    import torch
    from transformers import AutoModelForCausalLM

    ckpt = zero2_run["dir"] / "checkpoints" / f"checkpoint-{ZERO2_STEPS}"
    export = load_script(ROOT / "scripts" / "export.py")  # its main(), in process (the CLI's exit: the test below)
    for out, flags, weights in (("export", [], "the weights saved in the checkpoint"),
                                ("export_fp32", ["--fp32"], "fp32 master weights from the ZeRO shards")):
        assert export.main([str(ckpt), "--out", str(tmp_path / out), *flags]) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["weights"].startswith(weights)
    for out in ("export", "export_fp32"):
        assert (tmp_path / out / "model.safetensors").exists() and (tmp_path / out / "tokenizer.json").exists()
    # as loaded (tied weights tied; the run's own save writes lm_head beside the embedding it is tied to)
    final, saved, fp32 = (AutoModelForCausalLM.from_pretrained(path).state_dict() for path in
                          (zero2_run["dir"] / "model", tmp_path / "export", tmp_path / "export_fp32"))
    assert saved.keys() == fp32.keys() == final.keys() and sum(t.numel() for t in final.values()) > 500_000
    for name in final:
        assert torch.equal(saved[name], final[name]) and torch.allclose(fp32[name], final[name], rtol=1e-6, atol=0), name
    trained = read_summary(zero2_run["dir"].parent)["eval_loss"]
    assert eval_loss_of(tmp_path / "export", tmp_path / "eval") == pytest.approx(trained, rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("gather", [True, False])
def test_export_a_zero3_checkpoint_to_a_hf_folder(tmp_path, gather):
    """ZeRO-3 checkpoints, with and without gathered 16-bit weights, become safetensors folders that from_pretrained
    loads and that give the run's own eval loss; --fp32 takes the master weights."""
    if not gather:
        config = json.loads((ROOT / "ds_configs" / "stage3.json").read_text())
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
        (tmp_path / "s3.json").write_text(json.dumps(config))
        extra = ["--deepspeed", str(tmp_path / "s3.json"), "--save_final_model", "false"]
    else:
        extra = ["--zero_stage", "3"]
    runs = tmp_path / "runs"
    args = [*CKPT, "--save_steps", "6", "--max_steps", "6", "--report_to", "none", "--eval_dataset_name",
            "data/test.jsonl", *extra]
    check_ok(launch(args, runs, nproc=2, launcher="deepspeed"))
    trained = read_summary(runs)["eval_loss"]
    ckpt = only_run_dir(runs) / "checkpoints" / "checkpoint-6"
    for flags in ([], ["--fp32"]):
        out = tmp_path / f"export{''.join(flags)}"
        proc = export_cli(ckpt, out, *flags)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
        loss = eval_loss_of(out, tmp_path / f"eval{''.join(flags)}")
        assert loss == pytest.approx(trained, rel=1e-3), flags


def test_export_refuses_what_it_cannot_export(tmp_path):
    export = load_script(ROOT / "scripts" / "export.py")
    empty = tmp_path / "checkpoint-3"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(SystemExit) as err:
        export.main([str(empty), "--out", str(tmp_path / "out")])
    assert "neither model weights nor DeepSpeed ZeRO shards" in str(err.value)
    proc = export_cli(tmp_path / "nope", tmp_path / "out2")  # the CLI: an exit code, the message on stderr
    assert proc.returncode != 0 and "is not a folder" in proc.stderr


# ── secrets ──────────────────────────────────────────────────────────────────


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@ZERO2_GROUP
def test_no_secret_in_anything_a_run_writes(zero2_run):
    """HF_TOKEN, WANDB_API_KEY and any *_TOKEN / *_KEY / *_SECRET variable never reach results/, checkpoints,
    logs or the W&B config (offline run files included); weights are safetensors; remote code stays off."""
    run, proc = zero2_run["dir"], zero2_run["proc"]
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files) and any("checkpoints" in p.parts for p in files)  # all were written
    leaks = []
    for path in files:
        data = path.read_bytes()
        leaks += [f"{path.relative_to(run)}: {name}" for name, value in SECRETS.items() if value.encode() in data]
    for stream in (proc.stdout, proc.stderr):
        leaks += [f"log: {n}" for n, v in SECRETS.items() if v in stream]
    assert not leaks, leaks
    assert list(run.rglob("*.safetensors")) and not list(run.rglob("pytorch_model*.bin"))
    args = json.loads((run / "args.json").read_text())
    assert not any(v is True for k, v in _flatten(args) if k.endswith("trust_remote_code"))


# ── one rank dies ────────────────────────────────────────────────────────────


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
            session = int(stat[5])
            if session == launcher_pid and f"LOCAL_RANK={local_rank}".encode() in env and b"train_ds.py" in \
                    (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.parametrize("how", [
    pytest.param("kill", marks=pytest.mark.xdist_group("rank_death")),
    pytest.param("raise", marks=pytest.mark.slow),
])
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


# ── a nan loss, a full disk ──────────────────────────────────────────────────


def test_a_non_finite_gradient_norm_stops_like_a_non_finite_loss():
    """ZeRO-1/2 bf16 configs leave DeepSpeed's overflow check off (ZeRO-3 never runs it in bf16): a step whose
    gradient norm is inf or nan stops the run before a save, even while the loss logged beside it is finite."""
    from types import SimpleNamespace

    from recipe.trainer import NonFiniteLossCallback

    callback, control = NonFiniteLossCallback(), SimpleNamespace(should_training_stop=False, should_save=True,
                                                                 should_evaluate=True)
    callback.on_log(None, SimpleNamespace(global_step=7), control, logs={"loss": 2.5, "grad_norm": 3.0})
    assert not control.should_training_stop and callback.bad_step is None
    callback.on_log(None, SimpleNamespace(global_step=8), control, logs={"loss": 2.5, "grad_norm": float("inf")})
    assert control.should_training_stop and not control.should_save and callback.bad_step == 8
    assert callback.message("/nonexistent", 1e-4).startswith("the gradient norm became inf at step 8")


@pytest.mark.xdist_group("nan")
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


@pytest.mark.xdist_group("disk")
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


# ── bad input: one end to end (the exit code), the rest in process ──────────


def test_every_example_longer_than_max_length_is_named(tmp_path):
    """Through __main__, as a user runs it: found after tokenisation, before training; exit 2, no traceback."""
    rows = tmp_path / "long.jsonl"
    rows.write_text("".join(json.dumps({"prompt": "x" * 80 + str(i), "completion": "abc"}) + "\n" for i in range(12)))
    proc = launch(["--dataset_name", str(rows), "--eval_dataset_name", str(rows), "--max_length", "64",
                   "--max_steps", "2", "--report_to", "none", "--heldout_eval", "false"], tmp_path / "r")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "none of the 12 train examples has a completion token within --max_length 64" in proc.stderr
    assert "Raise --max_length" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "r").glob("*/checkpoints/checkpoint-*"))


def test_an_unwritable_results_dir_is_named(tmp_path, process):
    from recipe.config import parse_args
    from recipe.errors import ConfigError

    train_ds = load_script(ROOT / "train_ds.py")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError) as err:
        train_ds.prepare_run(*parse_args([*CKPT, "--max_steps", "2", "--report_to", "none", "--results_dir",
                                          str(blocker / "results")]))
    assert "cannot write the run folder" in str(err.value) and "--results_dir" in str(err.value)


def test_resume_from_a_path_that_does_not_exist(tmp_path):
    from recipe.checkpoints import resolve_resume
    from recipe.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        resolve_resume(str(tmp_path / "checkpoint-99"), tmp_path / "r" / "checkpoints")
    assert "no such checkpoint folder" in str(err.value) and "'last'" in str(err.value)


def test_out_of_memory_message_says_what_would_fit(monkeypatch, process):
    from recipe import estimate as E
    from recipe.config import parse_args
    from recipe.preflight import oom_message

    monkeypatch.setattr(E, "run_hardware", lambda: E.Hardware(1, 24, 1, 256, "made-up GPU"))
    _, targs, margs = parse_args(["--model_name_or_path", str(ROOT / "configs" / "models" / "llama-3.2-1b"),
                                  "--per_device_train_batch_size", "16", "--max_length", "2048", "--report_to", "none"])
    text = oom_message(targs, margs, RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert "out of GPU memory (CUDA out of memory" in text and "micro-batch 16" in text
    assert "What would fit: --zero_stage" in text and "--zero_stage auto" in text


def test_model_and_tokenizer_errors_say_what_to_do(tmp_path, monkeypatch):
    """A local folder without tokenizer files, a hub id that does not exist (offline here), a gated model."""
    from recipe.errors import ConfigError
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


def test_a_checkpoint_of_another_model_or_method_is_not_resumed(tmp_path, process):
    """A LoRA run gets its own folder (run name ..._lora); pointed at a full fine-tune's checkpoint anyway (same
    --run_name, or a path), it stops with what differs instead of failing deep inside DeepSpeed's loader."""
    from types import SimpleNamespace

    from recipe.checkpoints import CheckpointCompleteCallback, prepare_resume, what_trains
    from recipe.config import parse_args
    from recipe.errors import ConfigError

    train_ds = load_script(ROOT / "train_ds.py")
    full, lora = parse_args(["--report_to", "none"]), parse_args(["--use_peft", "true", "--report_to", "none"])
    assert train_ds.run_name_for(*lora) == train_ds.run_name_for(*full) + "_lora"
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    CheckpointCompleteCallback(what_trains(full[2])).on_save(
        SimpleNamespace(output_dir=str(tmp_path), world_size=1, save_strategy="no"),
        SimpleNamespace(global_step=4, is_world_process_zero=True), None)
    plan = prepare_resume(None, tmp_path, what_trains(full[2]), 1, None, True)
    assert plan is not None and plan.checkpoint == ckpt and not plan.universal
    for value in (None, str(ckpt)):
        with pytest.raises(ConfigError) as err:
            prepare_resume(value, tmp_path, what_trains(lora[2]), 1, None, True)
        assert "method 'full' there, 'lora' here" in str(err.value) and "--run_name <new name>" in str(err.value)
    assert prepare_resume("false", tmp_path, what_trains(lora[2]), 1, None, True) is None


@pytest.mark.parametrize("argv,message", [
    (["--global_batch_size", "50", "--per_device_train_batch_size", "32"], "is not a multiple of per-device batch"),
    (["--bf16", "true", "--fp16", "true"], "choose one"),
])
def test_argument_conflicts_are_named(argv, message, process):
    from recipe.config import parse_args
    from recipe.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_args([*argv, "--report_to", "none"])
    assert message in str(err.value)


def test_eval_only_ignores_a_leftover_accelerate_deepspeed_flag(tmp_path, process):
    """`accelerate launch --use_deepspeed` (or an earlier Accelerator) leaves ACCELERATE_USE_DEEPSPEED=true;
    --eval_only must still evaluate without DeepSpeed."""
    from recipe.config import parse_args

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        _, args, _ = parse_args(["--eval_only", "--model_name_or_path", "tiny", "--report_to", "none"])
    finally:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    assert args.deepspeed is None and args.deepspeed_plugin is None


def test_a_busy_master_port_is_named(monkeypatch, process):
    import socket

    import torch.distributed

    from recipe.config import parse_args
    from recipe.errors import ConfigError

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
