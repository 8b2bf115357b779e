"""Host memory before any weights load: what this node can give (MemAvailable and cgroup limits, read from made-up
/proc and /sys/fs/cgroup trees), the preflight's verdict for every shipped config against made-up limits, the
"auto" values filled from the model (NVMe buffer, partial-offload ratio), and train.sh's SIGKILL message. CPU only;
the NVMe run on a Llama-3 vocabulary is a GPU test (marked gpu, where libaio is present)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, check_ok, command, launch, read_summary
from recipe import estimate as E
from recipe import preflight
from recipe.ds_config import aio_available
from recipe.errors import ConfigError
from recipe.hardware import prepare_process

prepare_process()  # what train_ds.py does before parsing: a world of one process

GiB = 2**30
MODELS = ROOT / "configs" / "models"
SHAPE_8B = ["--model_name_or_path", str(MODELS / "llama-3.1-8b"), "--random_init", "true",
            "--tokenizer_name_or_path", "tiny", "--max_length", "2048", "--report_to", "none"]
H200 = E.Hardware(1, 139.8, 1, None, "NVIDIA H200 (made up)")


# ---------------------------------------------------------------- reading what the node can give


def fake_proc(root: Path, available_gib: float, rss_gib: float, cgroup_line: str) -> Path:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal:       {int(8 * 1024**2)} kB\n"  # small, as on the H200 hosts at start
                                  f"MemFree:        1024 kB\nMemAvailable:   {int(available_gib * 1024**2)} kB\n")
    (proc / "self" / "status").write_text(f"Name:\tpython\nVmRSS:\t{int(rss_gib * 1024**2)} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup_line + "\n")
    return proc


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit_of_an_ancestor_is_the_bound(tmp_path):
    """A SLURM-like v2 tree: the job's cgroup limits to 100 GiB (its child has no limit); 30 GiB used of which 10 GiB
    inactive file cache. MemAvailable (200 GiB) is not the bound, the job's 80 GiB of headroom is; MemTotal is read
    never."""
    proc = fake_proc(tmp_path, 200, 2, "0::/job_1/step_0")
    cg = tmp_path / "cgroup"
    write(cg / "job_1" / "memory.max", str(100 * GiB))
    write(cg / "job_1" / "memory.current", str(30 * GiB))
    write(cg / "job_1" / "memory.stat", f"anon {20 * GiB}\nfile {10 * GiB}\ninactive_file {10 * GiB}\n")
    write(cg / "job_1" / "step_0" / "memory.max", "max\n")
    write(cg / "job_1" / "step_0" / "memory.current", str(30 * GiB))
    host = E.read_host_memory(proc, cg)
    assert host.mem_available == 200 * GiB and host.own_rss == 2 * GiB
    assert host.cgroup_limit == 100 * GiB and host.cgroup_free == 80 * GiB
    assert host.cgroup_file.endswith("job_1/memory.max")
    assert host.usable() == 80 * GiB
    assert host.usable(processes=2) == 84 * GiB  # the run's own processes hold 2 GiB each already
    assert "cgroup limit 100.0 GiB" in host.describe() and "MemAvailable 200.0 GiB" in host.describe()


def test_cgroup_v1_container_at_the_mount_root(tmp_path):
    """A v1 container whose /proc/self/cgroup names a path outside its mount reads the mount's root; a 24 GiB limit
    (the CI runners) bounds it below MemAvailable."""
    proc = fake_proc(tmp_path, 60, 1, "4:memory:/process_api/abc\n0::/")
    cg = tmp_path / "cgroup"
    write(cg / "memory" / "memory.limit_in_bytes", str(24 * GiB))
    write(cg / "memory" / "memory.usage_in_bytes", str(6 * GiB))
    write(cg / "memory" / "memory.stat", f"cache {3 * GiB}\ntotal_inactive_file {2 * GiB}\n")
    host = E.read_host_memory(proc, cg)
    assert host.cgroup_limit == 24 * GiB and host.cgroup_free == 20 * GiB and host.usable() == 20 * GiB


def test_no_cgroup_limit_leaves_mem_available(tmp_path):
    proc = fake_proc(tmp_path, 120, 1.5, "4:memory:/")
    cg = tmp_path / "cgroup"
    write(cg / "memory" / "memory.limit_in_bytes", "9223372036854771712")  # v1's "no limit"
    host = E.read_host_memory(proc, cg)
    assert host.cgroup_limit is None and host.usable() == 120 * GiB and host.usable(1) == 121.5 * GiB
    assert "no cgroup memory limit" in host.describe()


def test_this_machine_reads():
    host = E.read_host_memory()
    assert host.mem_available > 0 and host.usable() > 0


# ---------------------------------------------------------------- the verdict per config, made-up limits


def verdict(model: str, config: str, host_gib: float, hw: E.Hardware, work: E.Workload) -> dict:
    shape = E.load_shape(str(MODELS / model)) if model != "tiny" else E.load_shape(None)
    host = E.HostMemory(host_gib * GiB)
    hw = E.Hardware(hw.gpus_per_node, hw.gpu_memory_gib, hw.nodes, host.usable() / GiB, hw.gpu_name)
    return preflight.host_check(shape, E.shipped_configs()[config], f"{config}.json", hw, work, host)


# the issue's machine: one H200, 125 GiB of host RAM, of which ~120 available; Llama-3.1-8B, micro-batch 8
ISSUE_HOST = 120.0
EXPECTED_8B = {"stage0": True, "stage1": True, "stage2": True, "stage3": True, "stage3_nvme": True,
               "stage2_offload": False, "stage3_offload": False,
               "stage2_offload_bf16": True,  # bf16 master weights, gradients and moments: 79.9 GiB, not 141.8
               "stage2_offload_zenflow": False,  # stage2_offload's fp32 states on the host
               "stage3_partial_offload": False}  # micro-batch 8 without checkpointing: 65% on the CPU, 135 GiB


@pytest.mark.parametrize("config", sorted(E.shipped_configs()))
def test_8b_on_one_h200_with_125_gib_of_host_memory(config):
    """Every shipped config for the 8B shape on the issue's machine: the CPU-offload configs need 142 and 173 GiB
    per node and are stopped with what fits (host memory; the GPU does not fit the in-GPU stages, which is the
    out-of-GPU-memory message's business)."""
    check = verdict("llama-3.1-8b", config, ISSUE_HOST, H200, E.Workload(micro_batch=8))
    assert check["fits"] == EXPECTED_8B[config], check
    assert check["fits"] == (check["need_gib"] <= 0.9 * ISSUE_HOST)
    if check["fits"]:
        assert check["problems"] == [] and "host memory at start:" in check["line"]
        return
    (problem,) = check["problems"]
    assert f"{config}.json with llama-3.1-8b" in problem and f"{check['need_gib']:.1f} GiB" in problem
    assert "120.0 GiB" in problem and "SIGKILL" in problem and "return code = -9" in problem
    assert "--zero_stage 3_partial_offload --per_device_train_batch_size 8 --gradient_checkpointing true" in problem
    assert "--zero_stage 3_nvme" in problem
    assert "--use_peft true" in problem and "--check_host_memory false" in problem
    assert check["line"].startswith("host memory at start:")


def test_the_issues_numbers():
    """The issue's 8B runs on one H200 (micro-batch 8) against rank 0's peak RSS measured there: stage2_offload
    142.9 GiB (estimated 141.8: the pinned blocks of the master weights and gradients, Adam's moments, the loaded
    weights; DeepSpeed's own 24 bytes/param said 182.5), stage3_offload 172.4 (estimated 172.9: ZeRO-3's pinned
    gradient and parameter buffers, its sub-groups, the moments; DeepSpeed's said 204.9); and partial offload on the
    issue's machine: the ratio the GPU allows and a host figure that fits."""
    need = {c: verdict("llama-3.1-8b", c, ISSUE_HOST, H200, E.Workload(micro_batch=8))["need_gib"]
            for c in ("stage2_offload", "stage3_offload")}
    assert need["stage2_offload"] == pytest.approx(142.9, rel=0.15)
    assert need["stage3_offload"] == pytest.approx(172.4, rel=0.15)
    assert need == {"stage2_offload": pytest.approx(141.8, abs=0.5), "stage3_offload": pytest.approx(172.9, abs=0.5)}
    check = verdict("llama-3.1-8b", "stage3_partial_offload", ISSUE_HOST, H200,
                    E.Workload(micro_batch=4, gradient_checkpointing=True))
    assert check["fits"] and check["need_gib"] < 50


@pytest.mark.parametrize("config", sorted(E.shipped_configs()))
def test_the_tiny_default_and_ci_never_stop(config):
    """The default tiny run (2 CPU processes) under a 24 GiB cgroup (the CI runners) with 16 GiB free: every
    shipped config passes."""
    check = verdict("tiny", config, 16.0, E.Hardware(2, 0.0), E.Workload(micro_batch=32, seq_len=64))
    assert check["fits"] and check["need_gib"] < 7, check  # 2 x 3 GiB per process, the model next to nothing


def test_without_a_gpu_everything_is_host_memory():
    """Training on the CPU, the estimate's per-GPU memory lives in host memory too: counted, and what would fit is
    judged on host memory alone."""
    on_gpu = verdict("llama-3.2-1b", "stage2", 24.0, E.Hardware(1, 80.0), E.Workload(micro_batch=1))
    check = verdict("llama-3.2-1b", "stage2", 24.0, E.Hardware(1, 0.0), E.Workload(micro_batch=1))
    assert on_gpu["fits"] and not check["fits"] and check["need_gib"] > on_gpu["need_gib"] + 20
    assert "GiB per GPU" not in check["problems"][0]


# ---------------------------------------------------------------- through the real parser, before weights load


@pytest.fixture
def issue_machine(monkeypatch):
    monkeypatch.setattr(E, "run_hardware", lambda: E.Hardware(1, 139.8, 1, None, "NVIDIA H200 (made up)"))
    monkeypatch.setattr(E, "read_host_memory", lambda *a, **k: E.HostMemory(ISSUE_HOST * GiB))


def test_before_weights_stops_the_issues_run(issue_machine, tmp_path, monkeypatch):
    """`--zero_stage 2_offload`, micro-batch 8, 8B shape, on the made-up issue machine: ConfigError (exit 2) before
    any weights load, with the estimate and what fits; the report line train.sh prints is written."""
    from recipe.config import parse_args

    report_file = tmp_path / "host_memory.txt"
    monkeypatch.setenv(preflight.HOST_REPORT_ENV, str(report_file))
    _, args, model_args = parse_args([*SHAPE_8B, "--zero_stage", "2_offload", "--per_device_train_batch_size", "8"])
    with pytest.raises(ConfigError) as err:
        preflight.before_weights(args, model_args)
    text = str(err.value)
    assert "stage2_offload.json with llama-3.1-8b" in text and "141.8 GiB" in text and "3_partial_offload" in text
    assert report_file.read_text().startswith("host memory at start: stage2_offload.json")
    args.check_host_memory = False  # the TrainConfig field the flag sets: warned, not stopped
    assert preflight.before_weights(args, model_args)["fits"] is False


def test_partial_offload_ratio_is_filled_from_the_estimate(issue_machine):
    """stage3_partial_offload's "auto" ratio becomes the estimator's smallest CPU share that fits the GPU, in the
    config TrainingArguments hold and in HF's copy of it that DeepSpeed is given."""
    from recipe.config import parse_args

    _, args, model_args = parse_args([*SHAPE_8B, "--zero_stage", "3_partial_offload", "--per_device_train_batch_size",
                                      "4", "--gradient_checkpointing", "true"])
    assert args.deepspeed["zero_optimization"]["offload_optimizer"]["ratio"] == "auto"
    check = preflight.before_weights(args, model_args)
    shape = E.load_shape(str(MODELS / "llama-3.1-8b"))
    work = E.Workload(micro_batch=4, gradient_checkpointing=True)
    expected = E.partial_offload_ratio(shape, E.shipped_configs()["stage3_partial_offload"], H200, work)
    assert 0 < expected < 0.4  # the GPU holds most of the states
    for config in (args.deepspeed, args.hf_deepspeed_config.config):
        assert config["zero_optimization"]["offload_optimizer"]["ratio"] == expected
    assert check["fits"] and args.ds.partial_offload


def test_nvme_buffer_is_filled_from_the_largest_parameter(issue_machine, tmp_path, monkeypatch):
    """stage3_nvme's "auto" buffer_size becomes the embedding's partition (128256 x 2048 on one process), rounded up
    to 2^20, where DeepSpeed's 1e8 failed with "More elements 262668288 than buffer size 100000000"."""
    from recipe import config as C

    monkeypatch.setattr(C, "nvme_problems", lambda ds: [])  # as if libaio were here
    _, args, model_args = C.parse_args(["--model_name_or_path", str(MODELS / "llama-3.2-1b"), "--random_init", "true",
                                        "--tokenizer_name_or_path", "tiny", "--zero_stage", "3_nvme", "--nvme_path",
                                        str(tmp_path), "--report_to", "none"])
    preflight.before_weights(args, model_args)
    for config in (args.deepspeed, args.hf_deepspeed_config.config):
        size = config["zero_optimization"]["offload_param"]["buffer_size"]
        assert size >= 128256 * 2048 and size % 2**20 == 0 and size - 128256 * 2048 < 2**20


def test_a_users_nvme_file_with_a_small_buffer_stops_before_weights(issue_machine, tmp_path, monkeypatch):
    """The old stage3_nvme.json (buffer_size 1e8) as a user's own file, on the 1B shape: exit 2 before any weights
    load, naming the key, the embedding and the fix."""
    from recipe import config as C

    monkeypatch.setattr(C, "nvme_problems", lambda ds: [])
    config = json.loads((ROOT / "ds_configs" / "stage3_nvme.json").read_text())
    config["zero_optimization"]["offload_param"]["buffer_size"] = 1e8
    path = tmp_path / "my_nvme.json"
    path.write_text(json.dumps(config))
    _, args, model_args = C.parse_args(["--model_name_or_path", str(MODELS / "llama-3.2-1b"), "--random_init", "true",
                                        "--tokenizer_name_or_path", "tiny", "--deepspeed", str(path), "--nvme_path",
                                        str(tmp_path), "--report_to", "none"])
    with pytest.raises(ConfigError) as err:
        preflight.before_weights(args, model_args)
    text = str(err.value)
    assert "my_nvme.json: zero_optimization.offload_param.buffer_size: 100,000,000 elements" in text
    assert "128256 x 2048" in text and "More elements 262668288 than buffer size 100000000" in text
    assert 'set it to "auto"' in text


@pytest.mark.slow
@pytest.mark.skipif(not aio_available(), reason="needs libaio (DeepSpeed's async_io op), as NVMe offload does")
def test_nvme_parameters_past_max_in_cpu_train_with_the_shipped_reuse_distance(tmp_path):
    """Real ZeRO-Infinity on CPU (DeepSpeed's CPU async_io op): a 0.1B Llama whose every parameter goes through the
    NVMe swap buffers (max_in_cpu 0) trains past step 2 with the shipped stage3_nvme.json's reuse distance (0);
    the guides' 1e9 had DeepSpeed stop at step 2 ("Not enough buffers 0 for swapping 1"), and ds_check now stops
    it before any weights load. 84 s on 2 cores with libaio unpacked from Debian's packages (2026-12-02)."""
    config = json.loads((ROOT / "recipe" / "tiny_llama.json").read_text())
    config.update(hidden_size=1024, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    ds = json.loads((ROOT / "ds_configs" / "stage3_nvme.json").read_text())
    ds["zero_optimization"]["offload_param"]["max_in_cpu"] = 0
    (tmp_path / "nvme").mkdir()
    common = ["--model_name_or_path", str(tmp_path / "model"), "--random_init", "true", "--tokenizer_name_or_path",
              "tiny", "--nvme_path", str(tmp_path / "nvme"), "--max_steps", "3", "--logging_steps", "1",
              "--per_device_train_batch_size", "2", "--max_length", "64", "--eval_strategy", "no",
              "--heldout_eval", "false", "--save_final_model", "false", "--report_to", "none"]
    for reuse in (0, 1e9):
        ds["zero_optimization"]["stage3_max_reuse_distance"] = reuse
        path = tmp_path / f"nvme_reuse_{reuse:g}.json"
        path.write_text(json.dumps(ds))
        proc = launch([*common, "--deepspeed", str(path)], tmp_path / f"r{reuse:g}")
        if reuse:
            assert proc.returncode == 2 and "stage3_max_reuse_distance" in proc.stderr, proc.stderr[-2000:]
            assert "Traceback" not in proc.stderr
        else:
            check_ok(proc)
            assert read_summary(tmp_path / "r0")["global_step"] == 3
            assert any((tmp_path / "nvme").rglob("*param.tensor.swp"))  # the parameters really went to disk


def test_dry_run_reports_host_memory_and_exits_2_when_it_would(issue_machine, tmp_path):
    """--dry_run writes its estimate (host memory included) and, like the run it stands for, stops with the
    host-memory problem."""
    import train_ds
    from recipe.config import parse_args

    argv = [*SHAPE_8B, "--zero_stage", "2_offload", "--per_device_train_batch_size", "8", "--dry_run",
            "--results_dir", str(tmp_path)]
    with pytest.raises(ConfigError, match="host memory: stage2_offload.json"):
        train_ds.main(*parse_args(argv))
    result = json.loads(next(tmp_path.glob("*/memory_estimate.json")).read_text())
    assert result["host_memory"]["fits"] is False and result["host_memory"]["need_gib"] == pytest.approx(141.8, abs=0.5)
    assert result["hardware"]["cpu_memory_gib"] == pytest.approx(ISSUE_HOST)


# ---------------------------------------------------------------- scripts/train.sh after a SIGKILL


def fake_launcher(tmp_path: Path, body: str) -> dict:
    """An environment whose `deepspeed` is a script with this body (train.sh finds DeepSpeed on PATH)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    launcher = bindir / "deepspeed"
    launcher.write_text("#!/usr/bin/env bash\n" + body + "\n")
    launcher.chmod(launcher.stat().st_mode | stat.S_IEXEC)
    _, env = command([], ROOT, nproc=2, launcher="deepspeed")
    env["PATH"] = f"{bindir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def train_sh(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / "train.sh"), "--num_gpus", "1", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("code", [247, 137])
def test_train_sh_reports_a_sigkill_as_a_likely_host_oom_with_the_estimate(tmp_path, code):
    """DeepSpeed's launcher exits 247 after a rank's -9 (a killed launcher: 137). The rank had written its start-up
    verdict where train.sh asked; train.sh prints it with the diagnosis and keeps the exit status."""
    kill = "kill -9 $$" if code == 137 else f"exit {code}"
    env = fake_launcher(tmp_path, f'echo "host memory at start: stage2_offload.json needs about 182.5 GiB" '
                                  f'> "$RECIPE_HOST_MEMORY_REPORT"\n{kill}')
    proc = train_sh(env, "--zero_stage", "2_offload")
    assert proc.returncode == code, proc.stderr
    assert "killed by SIGKILL" in proc.stderr and "out-of-memory" in proc.stderr
    assert "at start, train_ds.py said: host memory at start: stage2_offload.json needs about 182.5 GiB" in proc.stderr


def test_train_sh_sigkill_before_the_check_and_other_failures(tmp_path):
    env = fake_launcher(tmp_path, 'if [[ "$*" == *exit3* ]]; then exit 3; fi\nexit 247')
    proc = train_sh(env)
    assert proc.returncode == 247 and "died before its host-memory check" in proc.stderr and "--dry_run" in proc.stderr
    proc = train_sh(env, "exit3")
    assert proc.returncode == 3 and "SIGKILL" not in proc.stderr  # other failures pass through untouched


def test_train_sh_passes_on_success_and_the_report_path(tmp_path):
    env = fake_launcher(tmp_path, 'echo "report=$RECIPE_HOST_MEMORY_REPORT"; exit 0')
    proc = train_sh(env)
    assert proc.returncode == 0 and "report=" in proc.stdout and "SIGKILL" not in proc.stderr
    assert not Path(proc.stdout.split("report=")[1].strip()).parent.exists()  # its folder cleaned up


# ---------------------------------------------------------------- GPU: NVMe on a Llama-3 vocabulary


@pytest.mark.gpu
@pytest.mark.slow
def test_nvme_trains_the_1b_shape(tmp_path):
    """stage3_nvme on the Llama-3.2-1B shape (its 128256 x 2048 embedding above DeepSpeed's default buffer):
    two steps train with the buffer filled from the model. Runs where libaio is present."""
    if not aio_available():
        pytest.skip("NVMe offload needs libaio (DeepSpeed's async_io op): apt install libaio-dev")
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    proc = launch(["--model_name_or_path", str(MODELS / "llama-3.2-1b"), "--random_init", "true",
                   "--tokenizer_name_or_path", "tiny", "--max_length", "512", "--zero_stage", "3_nvme",
                   "--nvme_path", str(nvme), "--max_steps", "2", "--per_device_train_batch_size", "2",
                   "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
                   "--heldout_eval", "false", "--save_final_model", "false"], tmp_path / "r")
    check_ok(proc)
    summary = read_summary(tmp_path / "r")
    assert summary["global_step"] == 2
    resolved = json.loads(next((tmp_path / "r").glob("*/ds_config.json")).read_text())
    assert resolved["zero_optimization"]["offload_param"]["buffer_size"] >= 128256 * 2048


def test_dry_run_on_a_gpu_names_the_longest_sequence_with_and_without_the_levers(issue_machine, tmp_path):
    """--dry_run on the made-up H200: the longest sequence per config at this run's settings, and again with
    gradient checkpointing, the tiled MLP and activation offloading (longer), in the text and in memory_estimate.json."""
    from recipe.config import parse_args

    _, args, model_args = parse_args(["--model_name_or_path", "configs/models/llama-3.2-1b", "--max_length", "2048",
                                      "--per_device_train_batch_size", "1", "--report_to", "none"])
    result = preflight.dry_run(args, model_args, tmp_path, is_main=True)
    plain, levers = result["longest_sequence"], result["longest_sequence_with_long_context_levers"]
    assert plain["stage2"] >= 32768 and levers["stage2"] > plain["stage2"]
    saved = json.loads((tmp_path / "memory_estimate.json").read_text())
    assert saved["longest_sequence_with_long_context_levers"] == levers
