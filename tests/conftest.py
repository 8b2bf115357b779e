"""Shared fixtures: run the real entry point in subprocesses (1 or 2 ranks, gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# A few steps of the default recipe, small enough for 2 CPU cores.
FAST = ["--max_steps", "4", "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
        "--heldout_max_samples", "8", "--heldout_max_new_tokens", "8", "--report_to", "none"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], results_dir: Path, nproc: int = 1, launcher: str = "python",
           env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run train_ds.py like a user: plain python, the deepspeed launcher, or torchrun."""
    cmd, full_env = command(args, results_dir, nproc, launcher, env)
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def command(args: list[str], results_dir: Path, nproc: int = 1, launcher: str = "python",
            env: dict | None = None) -> tuple[list[str], dict]:
    """The command line and environment launch() runs (for tests that start and kill it themselves)."""
    # what in-process tests leave behind (parse_args's one-process env, an Accelerator's flags) is not passed on
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                             "WANDB_MODE") and not k.startswith("ACCELERATE_")}
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


def load_script(path: Path):
    """A script (scripts/*.py, train_ds.py) imported as a module, for tests that call its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def only_run_dir(results_dir: Path) -> Path:
    runs = [p for p in results_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def read_summary(results_dir: Path) -> dict:
    return json.loads((only_run_dir(results_dir) / "summary.json").read_text())


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def train_losses(run_dir: Path) -> list[float]:
    state = json.loads((run_dir / "checkpoints" / "trainer_state.json").read_text())
    return [r["loss"] for r in state["log_history"] if "loss" in r]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from recipe.modeling import build_tiny_tokenizer

    return build_tiny_tokenizer()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA GPUs; skip them where there are none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
