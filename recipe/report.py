"""What a run leaves in results/<run_name>/: arguments, DeepSpeed config, summary, loss curve; W&B set-up."""

from __future__ import annotations

import dataclasses
import json
import logging
import netrc
import os
import subprocess
from pathlib import Path

from recipe import REPO_ROOT

logger = logging.getLogger(__name__)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def args_dict(script_args, training_args, model_args) -> dict:
    return {
        "script": dataclasses.asdict(script_args),
        "training": training_args.to_dict(),
        "model": dataclasses.asdict(model_args),
    }


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_reachable(timeout: float = 5.0) -> bool:
    """Whether the W&B server (WANDB_BASE_URL, default api.wandb.ai) accepts a connection: a compute node
    without internet otherwise stalls wandb.init for minutes and then fails the run."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
        return True
    except OSError:
        return False


def setup_wandb(training_args, run_dir: Path, is_main: bool, resuming: bool = False) -> str | None:
    """Online when logged in, else offline into the run folder. Returns the mode, None when off.

    The W&B run id lives in <run dir>/wandb_run_id: a resumed training continues the same W&B run
    (its curves go on from the checkpoint's step); a fresh start gets a new id.
    """
    if "wandb" not in (training_args.report_to or []):
        return None
    id_file = run_dir / "wandb_run_id"
    if "WANDB_RUN_ID" not in os.environ and is_main:
        if resuming and id_file.exists():
            os.environ["WANDB_RUN_ID"] = id_file.read_text().strip()
            os.environ.setdefault("WANDB_RESUME", "allow")
        else:
            import secrets

            os.environ["WANDB_RUN_ID"] = secrets.token_hex(4)
            run_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(os.environ["WANDB_RUN_ID"] + "\n")
    os.environ.setdefault("WANDB_PROJECT", "llama-ds-recipe")
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    if "WANDB_MODE" not in os.environ and not wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"
        if is_main:
            logger.warning(
                "W&B: not logged in (no WANDB_API_KEY, no `wandb login`), logging offline to %s/wandb. "
                "Upload later with `uv run wandb sync %s/wandb/offline-run-*`; --report_to none turns W&B off.",
                run_dir, run_dir,
            )
    elif os.environ.get("WANDB_MODE", "online") == "online" and is_main and not wandb_reachable():
        os.environ["WANDB_MODE"] = "offline"
        logger.warning(
            "W&B: logged in but %s does not answer (no network on this node?): logging offline to %s/wandb, "
            "training goes on. Upload later with `uv run wandb sync %s/wandb/offline-run-*`.",
            os.environ.get("WANDB_BASE_URL") or "api.wandb.ai", run_dir, run_dir,
        )
    (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
    return os.environ.get("WANDB_MODE", "online")


def plot_loss(log_history: list[dict], path: Path) -> bool:
    """Train and eval loss against step; False when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in log_history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in log_history if "eval_loss" in r]
    if not train and not evals:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def last_logged(log_history: list[dict], key: str):
    return next((r[key] for r in reversed(log_history) if key in r), None)


def peak_rss_gib() -> float:
    """Peak resident CPU memory of this process so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def disk_written_gib() -> float | None:
    """Bytes this process has sent to storage so far (/proc/self/io write_bytes: NVMe offload's swaps, checkpoints,
    logs; DeepSpeed's async-io threads are this process's), None where the kernel does not say."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1]) / 2**30
    except (OSError, ValueError, IndexError):
        pass
    return None


def optimizer_state_dtypes(trainer) -> dict | None:
    """The dtypes ZeRO's optimizer really keeps, read from the engine after training (not from the config): its
    master weights (fp32 unless bf16_master_weights_and_grads) and Adam's first moment (fp32 unless
    bf16_optimizer_states). None without a ZeRO optimizer."""
    zero = getattr(getattr(trainer, "deepspeed", None), "optimizer", None)
    master = getattr(zero, "master_weights_and_grads_dtype", None)
    if master is None:
        return None
    inner = getattr(zero, "optimizer", None)
    moments = next((state["exp_avg"].dtype for state in getattr(inner, "state", {}).values()
                    if isinstance(state, dict) and "exp_avg" in state), None)
    return {"master_weights": str(master).removeprefix("torch."),
            "adam_moments": str(moments).removeprefix("torch.") if moments is not None else None}


def zenflow_updates(trainer) -> dict | None:
    """Under ZenFlow: the configured interval and how many full (CPU) updates the engine took, against the Trainer's
    steps; None without ZenFlow."""
    engine = getattr(trainer, "deepspeed", None)
    if not getattr(engine, "zenflow", False):
        return None
    section = engine.zenflow_config()
    return {"update_interval": section.update_interval, "topk_ratio": section.topk_ratio,
            "full_updates": engine.global_steps, "steps": trainer.state.global_step}
