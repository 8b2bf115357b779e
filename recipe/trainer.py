"""SFTTrainer with live throughput metrics, and the callbacks a run needs."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import Trainer, TrainerCallback
from trl import SFTTrainer

from recipe.report import write_json

logger = logging.getLogger(__name__)


class ThroughputMixin:
    """For any Trainer: tokens/s/device, TFLOP/s/device, MFU and peak memory in every training log."""

    meter = None  # a metrics.ThroughputMeter, set after construction

    def training_step(self, model, inputs, *args, **kwargs):
        if self.meter is not None:
            self.meter.add_batch(inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if self.meter is not None and "loss" in logs:
            logs.update(self.meter.report())
        super().log(logs, start_time)


class RecipeTrainer(ThroughputMixin, SFTTrainer):
    """SFTTrainer with live throughput metrics, the recipe's fused-loss choice, and resume on another process
    count (recipe.universal: a ZeRO checkpoint written by N processes is converted to DeepSpeed's universal
    checkpoint and loaded on M)."""

    resume_plan = None  # recipe.universal.ResumePlan of a DeepSpeed resume (world sizes, universal or not)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or resume_from_checkpoint
        self.resume_plan = None
        if isinstance(resume_from_checkpoint, (str, Path)) and self.is_deepspeed_enabled:
            from recipe.universal import prepare_resume

            self.resume_plan = prepare_resume(str(resume_from_checkpoint), self.args,
                                              self.accelerator.state.deepspeed_plugin)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        try:
            return super()._save_checkpoint(model, trial)
        except Exception as e:
            message = disk_full_message(e, self.args.output_dir, self.state.global_step)
            if message is None:
                raise
            from recipe.config import TrainingError

            raise TrainingError(message) from e

    def _load_optimizer_and_scheduler(self, checkpoint):
        # the Trainer calls this right after its DeepSpeed engine.load_checkpoint (transformers 5: _prepare_for_training)
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.resume_plan is not None and self.resume_plan.universal and checkpoint is not None:
            from recipe.universal import finish_load

            finish_load(self.resume_plan, self.model_wrapped, self.accelerator.state.deepspeed_plugin)

    def _load_rng_state(self, checkpoint):
        plan = self.resume_plan
        if plan is not None and checkpoint is not None and plan.saved_world_size not in (None, self.args.world_size):
            # rng_state_<rank>.pth belong to the old ranks (new ranks have none; CUDA states list the old GPUs);
            # the seeded generators stay. The data order does not depend on them (a seeded sampler); dropout would.
            logger.info("RNG states of %s not restored: written by %d process(es), this run has %d.",
                        Path(checkpoint).name, plan.saved_world_size, self.args.world_size)
            return
        super()._load_rng_state(checkpoint)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.token_metrics and self.args.speed.get("fused_loss") == "trl":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The model computes its own loss without full logits: Liger's fused linear cross-entropy
        # (recipe.speed patched the forward) or TRL's chunked head. Trainer.compute_loss passes
        # num_items_in_batch, so gradient accumulation averages over all tokens, with no host sync.
        inputs["use_cache"] = False
        if self.args.speed.get("fused_loss") == "trl":
            inputs["fused_lm_head"] = True
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)


class HeldoutCallback(TrainerCallback):
    """Exact-match score of greedy generations on held-out rows, before and after training.

    Runs on every rank (ZeRO-3 needs all ranks in each forward); the engine is set up by then.
    """

    def __init__(self, tokenizer, rows: list[dict], max_new_tokens: int, synced_gpus: bool):
        self.tokenizer, self.rows, self.max_new_tokens, self.synced_gpus = tokenizer, rows, max_new_tokens, synced_gpus
        self.scores: dict[str, float] = {}

    def score(self, model) -> float:
        from recipe.task import heldout_score

        return heldout_score(model, self.tokenizer, self.rows, self.max_new_tokens, synced_gpus=self.synced_gpus)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.scores["heldout_score_before"] = self.score(model)
        logger.info("held-out exact match before training: %.3f", self.scores["heldout_score_before"])

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.scores["heldout_score_after"] = self.score(model)
        logger.info("held-out exact match after training: %.3f", self.scores["heldout_score_after"])


COMPLETE_MARKER = "checkpoint_complete.json"


def checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N folders in output_dir, oldest first."""
    out = Path(output_dir)
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()] \
        if out.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def is_complete(checkpoint: Path) -> bool:
    return (Path(checkpoint) / COMPLETE_MARKER).exists()


def last_complete(output_dir: str | Path) -> Path | None:
    """The newest checkpoint in output_dir that every rank finished writing, if any."""
    return next((c for c in reversed(checkpoints(output_dir)) if is_complete(c)), None)


def read_marker(checkpoint: str | Path) -> dict:
    """What CheckpointCompleteCallback wrote into a checkpoint ({} without a readable marker)."""
    import json

    try:
        marker = json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


# how a full disk (or quota) surfaces from the writers a checkpoint goes through: OSError from Python's own files,
# torch.save's RuntimeError ("file write failed", or "unexpected pos" for a short write), safetensors'
# SafetensorError (StorageFull). And whatever the error says: a save that failed with almost no space left.
_DISK_FULL = ("No space left on device", "Disk quota exceeded", "StorageFull", "file write failed", "unexpected pos")
_NEARLY_FULL = 64 * 2**20


def disk_full_message(error: BaseException, output_dir: str | Path, step: int) -> str | None:
    """The message for a checkpoint save that failed because the disk filled up, or None for any other failure."""
    import errno
    import shutil

    chain, seen = [], error
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    try:
        usage = shutil.disk_usage(output_dir)
    except OSError:
        usage = None
    full = any(getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(m in str(e) for m in _DISK_FULL)
               for e in chain)
    if not full and not (usage and usage.free < _NEARLY_FULL):
        return None
    last = last_complete(output_dir)
    space = f"{usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.2f} GiB" if usage else "free space unknown"
    need = f"; a checkpoint here takes {tree_size(last) / 2**30:.2f} GiB" if last else ""
    kept = (f"{last.name} is complete and untouched: rerunning the same command resumes from it once there is room"
            if last else "no earlier checkpoint was complete: rerunning starts over")
    return (f"the disk filled up while saving checkpoint-{step} in {output_dir} ({space}{need}). checkpoint-{step} is "
            f"incomplete and will be skipped; {kept}. Free space (delete old runs or checkpoints; --save_total_limit N "
            "keeps only the newest N), or point --results_dir (or --output_dir) at a larger disk.")


def tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def space_warning(checkpoint: Path, args, state) -> str | None:
    """After a save: will the disk hold the checkpoints this run has still to write (net of --save_total_limit)?
    Said at the first checkpoint, from its measured size, rather than found out when a save fails hours later."""
    import math
    import shutil

    if args.save_strategy != "steps" or not args.save_steps or state.max_steps <= 0:
        return None
    every = int(args.save_steps) if args.save_steps >= 1 else math.ceil(args.save_steps * state.max_steps)
    left = (state.max_steps - state.global_step) // every
    limit = args.save_total_limit
    # the Trainer deletes the oldest beyond the limit after writing the new one: limit + 1 at the peak
    more = min(left, max(0, limit + 1 - len(checkpoints(args.output_dir)))) if limit else left
    size, free = tree_size(checkpoint), shutil.disk_usage(checkpoint).free
    if more <= 0 or not size or free >= more * size:
        return None
    kept = f" at once (--save_total_limit {limit})" if limit else ""
    return (f"{args.output_dir} has {free / 2**30:.2f} GiB free; {checkpoint.name} takes {size / 2**30:.2f} GiB and "
            f"this run needs room for {more} more checkpoint(s){kept}: the disk fills at checkpoint-"
            f"{state.global_step + (free // size + 1) * every}. Free space, set --save_total_limit N (keeps the newest "
            "N), or use a larger --results_dir. (A save cut off by a full disk stops the run; the checkpoint before "
            "it stays usable.)")


class CheckpointCompleteCallback(TrainerCallback):
    """After every rank has written a checkpoint, rank 0 marks it complete; resume trusts only marked ones.
    The marker also says what trained (train_ds.what_trains), so that a resume into something else is refused."""

    def __init__(self, trains: dict | None = None):
        self.trains, self.warned = trains, False

    def on_save(self, args, state, control, **kwargs):
        import time

        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's shards are on disk
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and path.is_dir():
            # world_size: how many processes wrote it (recipe.universal resumes it on another count)
            write_json(path / COMPLETE_MARKER, {"global_step": state.global_step, "time": time.time(),
                                                "world_size": args.world_size, "trains": self.trains})
            warning = None if self.warned else space_warning(path, args, state)
            if warning:
                logger.warning(warning)
                self.warned = True


class ReleaseShmBuffersCallback(TrainerCallback):
    """CPU ranks: unlink DeepSpeed's /dev/shm all-reduce files (recipe.hardware.release_shm_buffers) once the engine,
    which creates them, is up."""

    def on_train_begin(self, args, state, control, **kwargs):
        from recipe.hardware import release_shm_buffers

        release_shm_buffers()


class NonFiniteLossCallback(TrainerCallback):
    """Stop at the first logged loss that is nan or inf, before anything is saved from the broken weights.

    Every rank sees the same logged loss (it is gathered), so all stop together; main() then exits with
    the step, the last good checkpoint and the usual causes.
    """

    def __init__(self):
        self.bad_step: int | None = None
        self.bad_value: float | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        import math

        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.bad_step, self.bad_value = state.global_step, loss
            control.should_training_stop, control.should_save, control.should_evaluate = True, False, False

    def message(self, output_dir: str, learning_rate: float) -> str:
        good = last_complete(output_dir)
        return (f"the training loss became {self.bad_value} at step {self.bad_step}; training stopped and nothing "
                f"was saved from the broken weights. Last good checkpoint: {good or 'none'}. "
                f"Usual causes: a learning rate too high (now {learning_rate:g}; try 10x lower), fp16 overflow "
                "(use --bf16 where the GPU has it), no gradient clipping (--max_grad_norm 1.0), or rows with nothing "
                "to learn. Fix one and rerun the same command: it resumes from that checkpoint.")


class FaultCallback(TrainerCallback):
    """Test-only fault injection, how the tests check the failure paths: RECIPE_FAULT="raise:<rank>:<step>"
    raises in that rank at that step (one rank dies); "nan:<rank>:<step>" puts a NaN into the first weight on
    every rank at that step (the loss diverges)."""

    def __init__(self, spec: str):
        kind, rank, step = spec.split(":")
        self.kind, self.rank, self.step = kind, int(rank), int(step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.kind == "raise" and state.global_step == self.step and args.process_index == self.rank:
            raise RuntimeError(f"injected fault (RECIPE_FAULT) on rank {self.rank} at step {self.step}")

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.kind == "nan" and state.global_step == self.step:
            import torch

            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))


def fault_callbacks() -> list[TrainerCallback]:
    import os

    spec = os.environ.get("RECIPE_FAULT")
    return [FaultCallback(spec)] if spec else []


class RunInfoCallback(TrainerCallback):
    """On rank 0 at train start: save the fully resolved DeepSpeed config; add it and the run info to W&B."""

    def __init__(self, run_dir: Path, extra_config: dict):
        self.run_dir, self.extra_config = run_dir, extra_config
        self.ds_config: dict | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        hf_ds = getattr(args, "hf_deepspeed_config", None)
        self.ds_config = hf_ds.config if hf_ds is not None else None
        if not state.is_world_process_zero:
            return
        if self.ds_config is not None:
            write_json(self.run_dir / "ds_config.json", self.ds_config)
        if "wandb" in (args.report_to or []):
            import wandb

            if wandb.run is not None:
                wandb.config.update({**self.extra_config, "ds_config_resolved": self.ds_config},
                                    allow_val_change=True)
