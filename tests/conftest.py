"""Shared fixtures: run the real entry point in subprocesses (1 or 2 ranks, gloo on CPU), and the shared runs that
many tests read.

Cost, measured on the 2-core CI machine: every rank of every launch imports torch, transformers, trl, peft and
deepspeed (~20 s of CPU) before it trains a step, and DeepSpeed JIT-builds its CPU ops (shm_comm, fused_adam,
cpu_adam: ~4 min of CPU) on first use. So the default run (`uv run pytest`: two xdist workers, `-m "not slow"`)
pays for few launches and reads each many times:

- `zero2_run`: one 2-process ZeRO-2 run (deepspeed launcher), logged in to an unreachable W&B, fake secrets in its
  environment; the stage, W&B, secrets and export checks read it. `killed_and_rerun`: the same command killed with
  -9 after a checkpoint and rerun, which must give the same loss curve. `cut_and_resumed_on_one`: a copy of the
  run's folder whose newest checkpoint is cut off mid-save, resumed on 1 process (cut-off save + universal 2 -> 1).
- `stage_runs`: 1-process runs of ZeRO 0-3 with one seed (stage parity).
The tests that share a run carry its `xdist_group`, so one worker builds it once; heavy groups are sent first.
`-m slow` runs the exhaustive matrix (README: Tests).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# A few steps of the default recipe, small enough for 2 CPU cores: 64 rows (formatting and tokenising all 8,000
# would cost more than the training), global batch 8 (the default 64 takes ~2 s a step on one core).
FAST = ["--max_steps", "4", "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
        "--heldout_max_samples", "8", "--heldout_max_new_tokens", "8", "--report_to", "none",
        "--max_train_samples", "64", "--max_eval_samples", "64", "--global_batch_size", "8",
        "--per_device_train_batch_size", "4"]
RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "WANDB_MODE")


def _pin_caches() -> None:
    """The DeepSpeed op and datasets caches by absolute path, so runs that move HOME (W&B logins, secrets) find them
    warm instead of compiling the ops again. The same folders the libraries choose by default."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        # torch.utils.cpp_extension's default: <cache>/torch_extensions/py<ver>_<cu|cpu>
        import torch

        flavour = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
        version = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        os.environ["TORCH_EXTENSIONS_DIR"] = str(cache / "torch_extensions" / f"{version}_{flavour}")
    hf_home = Path(os.environ.get("HF_HOME") or cache / "huggingface")
    os.environ.setdefault("HF_DATASETS_CACHE", str(hf_home / "datasets"))
    # this venv's bin first (`uv run` does it; `.venv/bin/python -m pytest` does not): its ninja, not a system one,
    # builds the ops. Two ninja versions hash build commands differently, and each rebuilds what the other built.
    bindir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"


# offline, in process as in every launch: huggingface_hub reads these once, at import (a monkeypatch after that is
# too late, and a hub lookup without network waits out its retries)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
_pin_caches()
OPS = {"ShareMemCommBuilder": "deepspeed_shm_comm", "FusedAdamBuilder": "fused_adam", "CPUAdamBuilder": "cpu_adam"}
BUILD_OPS = """
import sys
from deepspeed.accelerator import get_accelerator
if get_accelerator().device_name() != "cpu":
    sys.exit(0)  # GPU machines build their CUDA ops in the runs that need them
for name in sys.argv[1:]:
    get_accelerator().create_op_builder(name).load(verbose=False)
    print("built", name, flush=True)
"""


def pytest_sessionstart(session):
    """Start building DeepSpeed's CPU ops in the background, once (the controller, not each xdist worker), while the
    in-process tests run. A launch that needs an op still being built waits on torch's build lock for it."""
    if hasattr(session.config, "workerinput"):
        return
    ext = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    missing = [builder for builder, name in OPS.items() if not (ext / name / f"{name}.so").exists()]
    if not missing:
        return
    ext.mkdir(parents=True, exist_ok=True)
    log = open(ext / "recipe-tests-build.log", "w")
    session.config._ops_build = subprocess.Popen([sys.executable, "-c", BUILD_OPS, *missing], stdout=log,
                                                 stderr=subprocess.STDOUT, env=os.environ.copy())


def pytest_sessionfinish(session):
    build = getattr(session.config, "_ops_build", None)
    if build is not None and build.poll() is None:
        build.wait(timeout=600)


# ── ports: each xdist worker its own range ───────────────────────────────────
# Below Linux's ephemeral range (32768-60999), so never a port the OS hands out for port 0 either (one-process
# runs pick theirs that way).
_PORTS = {"next": None}


def free_port() -> int:
    import socket

    if _PORTS["next"] is None:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
        _PORTS["next"] = 20000 + 1000 * (int(worker.removeprefix("gw")) % 12)
    while True:
        port = _PORTS["next"]
        _PORTS["next"] += 1
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port


# ── launching train_ds.py ────────────────────────────────────────────────────


def launch(args: list[str], results_dir: Path, nproc: int = 1, launcher: str = "python",
           env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run train_ds.py like a user: plain python, the deepspeed launcher, or torchrun."""
    cmd, full_env = command(args, results_dir, nproc, launcher, env)
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def command(args: list[str], results_dir: Path, nproc: int = 1, launcher: str = "python",
            env: dict | None = None) -> tuple[list[str], dict]:
    """The command line and environment launch() runs (for tests that start and kill it themselves)."""
    # what in-process tests leave behind (prepare_process's one-process env, an Accelerator's flags) is not passed on
    full_env = {k: v for k, v in os.environ.items() if k not in RANK_ENV and not k.startswith("ACCELERATE_")}
    full_env.update({"OMP_NUM_THREADS": "1" if nproc > 1 else "2", "PYTHONUNBUFFERED": "1",
                     "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    full_env.update(env or {})
    script = [str(ROOT / "train_ds.py"), *args, "--results_dir", str(results_dir)]
    bindir = Path(sys.executable).parent
    if launcher == "python":
        cmd = [sys.executable, *script]
    elif launcher == "deepspeed":
        ds = [str(bindir / "deepspeed")] if (bindir / "deepspeed").exists() else [sys.executable, "-m",
                                                                                  "deepspeed.launcher.runner"]
        cmd = [*ds, f"--num_gpus={nproc}", f"--master_port={free_port()}", *script]
    elif launcher == "torchrun":
        cmd = [str(bindir / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={free_port()}", *script]
    else:
        raise ValueError(launcher)
    return cmd, full_env


def start(args: list[str], results_dir: Path, nproc: int = 1, launcher: str = "python", env: dict | None = None):
    """launch() without waiting: the job in its own process group (so that killpg ends the launcher and its ranks),
    its output in <results_dir>.log. finish() waits for it."""
    cmd, full_env = command(args, results_dir, nproc, launcher, env)
    results_dir.parent.mkdir(parents=True, exist_ok=True)
    log = results_dir.with_name(results_dir.name + ".log").open("w")
    job = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    job.log = log
    return job


def finish(job, timeout: int = 600) -> subprocess.CompletedProcess:
    """Wait for a start()ed job; its output as stdout and stderr both (one interleaved log)."""
    try:
        job.wait(timeout=timeout)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        job.log.close()
    text = Path(job.log.name).read_text()
    return subprocess.CompletedProcess(job.args, job.returncode, text, text)


def load_script(path: Path):
    """A script (scripts/*.py, train_ds.py) imported as a module, for tests that call its functions."""
    import importlib.util

    name = f"script_{path.stem}"  # registered: dataclasses (train_ds.Run) look their module up in sys.modules
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def only_run_dir(results_dir: Path) -> Path:
    runs = [p for p in results_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def read_summary(results_dir: Path) -> dict:
    return json.loads((only_run_dir(results_dir) / "summary.json").read_text())


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def logged(run_dir: Path) -> dict[int, dict]:
    """The logged training records of a run, by step."""
    state = json.loads((run_dir / "checkpoints" / "trainer_state.json").read_text())
    return {r["step"]: r for r in state["log_history"] if "loss" in r}


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for _, r in sorted(logged(run_dir).items())]


def complete_checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*")
                  if (p / "checkpoint_complete.json").exists())


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from recipe.modeling import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def process():
    """What train_ds.py does before parsing (a world of one process, thread counts): in-process tests that parse
    arguments use this. Idempotent."""
    from recipe.hardware import prepare_process

    prepare_process()


# ── the shared 2-process ZeRO-2 run, its kill -9 twin and its cut-off copy ──
ZERO2_STEPS, ZERO2_SAVE = 12, 4
# 12 steps, checkpoints at 4, 8, 12 (the default recipe keeps the newest 2); global batch 4 on either process count
# (2 x micro 2 x accumulation 1 = 1 x micro 2 x accumulation 2), so a resume on 1 process continues the same maths
ZERO2 = ["--zero_stage", "2", "--max_steps", str(ZERO2_STEPS), "--save_strategy", "steps", "--save_steps",
         str(ZERO2_SAVE), "--logging_steps", "1", "--global_batch_size", "4", "--per_device_train_batch_size", "2",
         "--weight_decay", "0.1", "--max_train_samples", "128", "--eval_strategy", "no", "--eval_dataset_name",
         "data/test.jsonl", "--max_eval_samples", "64", "--heldout_eval", "false", "--report_to", "wandb",
         "--seed", "0"]
SECRETS = {"HF_TOKEN": "hf_SECRETtokenvalue123456", "WANDB_API_KEY": "wandbSECRETkey0123456789abcdef01234567",
           "MY_SERVICE_TOKEN": "svcSECRETtoken987", "OPENAI_API_KEY": "sk-SECRETkey42"}
ZERO2_GROUP = pytest.mark.xdist_group("zero2")


def not_logged_in(home: Path) -> dict:
    """No W&B login anywhere (a fresh HOME, no key): the run logs offline by itself."""
    home.mkdir(parents=True, exist_ok=True)
    return {"HOME": str(home), "WANDB_API_KEY": "", "WANDB_SILENT": "true"}


@pytest.fixture(scope="session")
def zero2_run(tmp_path_factory):
    """deepspeed --num_gpus=2 (2 CPU ranks), ZeRO-2, 12 steps; W&B logged in (a key) but its server unreachable;
    fake secrets in the environment of every rank."""
    root = tmp_path_factory.mktemp("zero2")
    (root / "home").mkdir()
    env = {**SECRETS, "HOME": str(root / "home"), "WANDB_SILENT": "true",
           "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    proc = launch(ZERO2, root / "results", nproc=2, launcher="deepspeed", env=env)
    check_ok(proc)
    return {"dir": only_run_dir(root / "results"), "proc": proc, "env": env}


@pytest.fixture(scope="session")
def killed_and_rerun(tmp_path_factory):
    """The zero2 command, not logged in to W&B, kill -9'd (the launcher and both ranks) once checkpoint-4 is
    complete; then the same command again."""
    root = tmp_path_factory.mktemp("zero2_killed")
    env = not_logged_in(root / "home")
    job = start(ZERO2, root / "results", nproc=2, launcher="deepspeed", env=env)
    marker, deadline = None, time.time() + 300
    while time.time() < deadline and job.poll() is None and marker is None:
        marker = next(iter((root / "results").glob(f"*/checkpoints/checkpoint-{ZERO2_SAVE}/checkpoint_complete.json")),
                      None)
        time.sleep(0.05)
    running = job.poll() is None
    os.killpg(job.pid, signal.SIGKILL)
    killed = finish(job)
    assert marker is not None and running, f"the job ended or never saved checkpoint-{ZERO2_SAVE}:\n" \
                                           f"{killed.stdout[-4000:]}"
    run_dir = marker.parents[2]
    after_kill = {"checkpoints": complete_checkpoints(run_dir), "summary": (run_dir / "summary.json").exists(),
                  "log": killed.stdout}
    proc = launch(ZERO2, root / "results", nproc=2, launcher="deepspeed", env=env)  # the same command again
    return {"dir": run_dir, "after_kill": after_kill, "proc": proc}


def cut_off(checkpoint: Path) -> None:
    """What a kill during a save leaves: no completion marker, a truncated optimizer shard."""
    (checkpoint / "checkpoint_complete.json").unlink()
    shard = next(checkpoint.glob("global_step*/*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])


@pytest.fixture(scope="session")
def cut_and_resumed_on_one(zero2_run, tmp_path_factory):
    """A copy of the zero2 run's folder whose newest checkpoint (12) was cut off mid-save; the same command on 1
    process: skips it, resumes from checkpoint-8 through DeepSpeed's universal checkpoint, saves 12 again."""
    results = tmp_path_factory.mktemp("zero2_cut") / "results"
    run_dir = results / zero2_run["dir"].name
    shutil.copytree(zero2_run["dir"], run_dir)
    cut_off(run_dir / "checkpoints" / f"checkpoint-{ZERO2_STEPS}")
    proc = launch(ZERO2, results, nproc=1, env=not_logged_in(results.parent / "home"))
    return {"dir": run_dir, "proc": proc}


# ── collection: gpu tests skipped without CUDA; the shared runs first, each on one worker ──
# groups by what they cost, most first: xdist (--dist loadgroup, --no-loadscope-reorder) sends them in this order
HEAVY_FIRST = ["zero2", "lora", "stages", "rank_death", "learn", "offload", "disk", "nan"]


def group_of(item) -> str | None:
    names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                    for m in item.iter_markers("xdist_group")})
    return "_".join(names) or None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA GPUs; skip them where there are none. Order: the shared runs' groups first,
    heaviest first, so that neither worker ends with a long run while the other idles."""
    import torch

    items.sort(key=lambda item: HEAVY_FIRST.index(group_of(item)) if group_of(item) in HEAVY_FIRST
               else len(HEAVY_FIRST))  # stable: collection order within a rank
    if getattr(config.option, "loadgroup", False):  # an xdist worker under --dist loadgroup
        # xdist 3.8 puts the group into the test id (test_x@zero2, which its scheduler groups by) through
        # item._nodeid, which pytest 9.2 no longer reads (ids live in item._id): without this, a group's tests
        # spread over both workers and each builds the shared run
        from _pytest.nodeid import NodeId

        for item in items:
            group = group_of(item)
            if group and not item.nodeid.endswith(f"@{group}"):
                item._id = NodeId.parse(f"{item.nodeid}@{group}")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
