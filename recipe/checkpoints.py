"""Checkpoints and resume: listing, the completion marker, the resume policy, disk space, the completion callback.

A checkpoint is `<output_dir>/checkpoint-N` (the Trainer's). It counts as complete once every rank has written it:
rank 0 then writes the completion marker (`checkpoint_complete.json`, `Marker`) into it. Resume trusts only marked
checkpoints; newer unmarked ones (a kill during a save) are set aside as `incomplete-checkpoint-N`, a name the
Trainer neither counts, rotates nor reuses. The marker also says what trained (model, method, LoRA rank and targets)
and on how many processes, so a resume into something else is refused by name and a resume on another process
count goes through DeepSpeed's universal checkpoint (recipe/universal.py converts).

Everything here runs before any weights load, except the callback and the save-failure message.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import re
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from recipe.errors import ConfigError

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
INCOMPLETE_PREFIX = "incomplete-"
_SHARD = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
OFF = ("", "false", "no", "none")
NEWEST = ("last", "true", "yes", "auto")


# ---------------------------------------------------------------- listing and the marker


def checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N folders in output_dir, oldest first."""
    out = Path(output_dir)
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()] \
        if out.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


@dataclasses.dataclass
class Marker:
    """What rank 0 writes into a checkpoint once every rank has written its part (the marker's one schema)."""

    global_step: int
    world_size: int | None = None  # how many processes wrote it
    trains: dict | None = None  # what_trains(): the model and method whose state it holds
    time: float = 0.0

    def write(self, checkpoint: str | Path) -> None:
        (Path(checkpoint) / COMPLETE_MARKER).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, checkpoint: str | Path) -> Marker | None:
        """The marker of a checkpoint, None without a readable one (unknown fields of a newer marker are ignored)."""
        try:
            data = json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("global_step"), int):
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def is_complete(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / COMPLETE_MARKER).exists()


def last_complete(output_dir: str | Path) -> Path | None:
    """The newest checkpoint in output_dir that every rank finished writing, if any."""
    return next((c for c in reversed(checkpoints(output_dir)) if is_complete(c)), None)


def what_trains(model_args) -> dict:
    """What a checkpoint's weights and optimizer state belong to, kept in its marker: a resume into another model or
    method (a LoRA run finding a full fine-tune's checkpoint) is refused by name."""
    peft, targets = bool(model_args.use_peft), model_args.lora_target_modules
    return {"model": Path(model_args.model_name_or_path or "tiny-llama").name,
            "method": "qlora" if model_args.load_in_4bit else "lora" if peft else "full",
            "lora_r": model_args.lora_r if peft else None,
            "lora_target_modules": (sorted(targets) if isinstance(targets, list) else targets) if peft else None}


# ---------------------------------------------------------------- what a checkpoint holds (DeepSpeed's files)


def ds_step_dir(checkpoint: str | Path) -> Path | None:
    """The DeepSpeed tag folder (global_stepN) of a Trainer checkpoint: the one `latest` names, else the only one."""
    ckpt = Path(checkpoint)
    latest = ckpt / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag and (ckpt / tag).is_dir():
            return ckpt / tag
    found = [p for p in ckpt.glob("global_step*") if p.is_dir() and p.name[len("global_step"):].isdigit()]
    return found[0] if len(found) == 1 else None


def zero_shard_ranks(checkpoint: str | Path) -> list[int]:
    """Data-parallel ranks with a ZeRO optimizer shard in the checkpoint (empty: not a ZeRO 1-3 checkpoint)."""
    step = ds_step_dir(checkpoint)
    if step is None:
        return []
    return sorted({int(m.group(1)) for f in step.iterdir() if (m := _SHARD.search(f.name))})


def saved_world_size(checkpoint: str | Path) -> int | None:
    """How many processes wrote the checkpoint: its ZeRO shards, else the marker, else the Trainer's per-process RNG
    files. None when nothing tells."""
    ckpt = Path(checkpoint)
    ranks = zero_shard_ranks(ckpt)
    if ranks:
        return max(ranks) + 1
    marker = Marker.read(ckpt)
    if marker is not None and isinstance(marker.world_size, int) and marker.world_size > 0:
        return marker.world_size
    rng = [p for p in ckpt.glob("rng_state_*.pth") if p.stem.rsplit("_", 1)[-1].isdigit()]
    if rng:
        return len(rng)
    return 1 if (ckpt / "rng_state.pth").is_file() else None


def saved_zero_stage(checkpoint: str | Path) -> int | None:
    """3 (per-rank model state files), 2 for stages 1-2 (optimizer shards only; DeepSpeed's converter tells them
    apart itself), 0 (no ZeRO shards: the optimizer state is whole), None (no DeepSpeed folder)."""
    step = ds_step_dir(checkpoint)
    if step is None:
        return None
    if not zero_shard_ranks(checkpoint):
        return 0
    return 3 if any(step.glob("*zero_pp_rank_*_model_states.pt")) else 2


# ---------------------------------------------------------------- the resume policy (before any weights load)


@dataclasses.dataclass
class ResumePlan:
    """What a resume from `checkpoint` on `world_size` processes needs."""

    checkpoint: Path
    saved_world_size: int | None
    world_size: int
    saved_stage: int | None
    universal: bool  # convert and load through DeepSpeed's universal checkpoint (recipe/universal.py)

    @property
    def universal_dir(self) -> Path:
        step = ds_step_dir(self.checkpoint)
        return step.with_name(step.name + "_universal")


@dataclasses.dataclass
class ResumeChoice:
    """resolve_resume's answer: the checkpoint to resume from (None: start fresh) and the incomplete checkpoints
    newer than it, which rank 0 sets aside (set_aside) before training."""

    checkpoint: Path | None
    incomplete: list[Path]


def resolve_resume(value: str | None, output_dir: str | Path) -> ResumeChoice:
    """--resume_from_checkpoint: 'auto' (default), 'last', 'true' -> the newest complete checkpoint in output_dir, or
    none; 'false' -> start over; a path -> that checkpoint (it must exist). Reads only: nothing is renamed here."""
    if value is not None and value.lower() in OFF:
        done = last_complete(output_dir)
        if done:
            logger.warning("--resume_from_checkpoint %s: starting over although %s holds %s; its checkpoints are "
                           "replaced as the new run reaches their steps (a new --run_name keeps them).",
                           value, output_dir, done.name)
        return ResumeChoice(None, [])
    if value is None or value.lower() in NEWEST:
        found = checkpoints(output_dir)
        incomplete = []
        while found and not is_complete(found[-1]):
            incomplete.append(found.pop())
        if not found and value is not None and value.lower() != "auto":
            logger.warning("--resume_from_checkpoint %s: no complete checkpoint in %s, starting fresh.",
                           value, output_dir)
        return ResumeChoice(found[-1] if found else None, incomplete)
    if not Path(value).is_dir():
        raise ConfigError([f"--resume_from_checkpoint {value}: no such checkpoint folder. "
                           f"Use 'last' to take the newest complete one in {output_dir}."])
    if not is_complete(Path(value)):
        logger.warning("%s has no completion marker: it may be incomplete (resuming from it as asked).", value)
    return ResumeChoice(Path(value), [])


def set_aside(incomplete: list[Path], is_main: bool) -> None:
    """Rename checkpoints cut off mid-save to incomplete-checkpoint-N (rank 0; the others only say so)."""
    for broken in incomplete:
        logger.warning("skipping %s: incomplete (the run stopped while saving it)%s.", broken,
                       f"; kept as {INCOMPLETE_PREFIX}{broken.name}" if is_main else "")
        if is_main and broken.is_dir():
            broken.rename(broken.with_name(INCOMPLETE_PREFIX + broken.name))


def check_same_training(checkpoint: str | Path, trains: dict | None) -> None:
    """Refuse a checkpoint whose marker says another model or method trained it."""
    marker = Marker.read(checkpoint) if trains else None
    saved = marker.trains if marker else None
    if not saved or saved == trains:  # markers from before this check carry no "trains"
        return
    differ = ", ".join(f"{k} {saved.get(k)!r} there, {trains.get(k)!r} here" for k in sorted(trains)
                       if saved.get(k) != trains.get(k))
    raise ConfigError([f"{checkpoint} was saved by a run that trains something else ({differ}); its weights and "
                       "optimizer state cannot be loaded into this one. Give this run its own folder with "
                       "--run_name <new name> (or --output_dir), or pass --resume_from_checkpoint false to start over "
                       "in this folder (its checkpoints are then replaced)."])


def plan_resume(checkpoint: str | Path, world_size: int, ds) -> ResumePlan:
    """How to resume on world_size processes under `ds` (a recipe.ds_config.DsConfig or None); ConfigError for a
    process-count change that cannot be done."""
    ckpt = Path(checkpoint)
    saved, stage = saved_world_size(ckpt), saved_zero_stage(ckpt)
    plan = ResumePlan(ckpt, saved, world_size, stage, universal=False)
    if stage == 0 and saved not in (None, world_size):
        logger.info("%s was written by %d process(es), this run has %d: a stage-0 checkpoint holds the whole "
                    "optimizer state, so it loads as it is.", ckpt.name, saved, world_size)
    if saved is None or saved == world_size or stage is None or stage == 0:
        return plan  # same count (the normal resume), not a DeepSpeed checkpoint, or stage 0 (state whole)
    if ds is None or not ds.stage:
        raise ConfigError([
            f"{ckpt.name} was written by {saved} process(es) with ZeRO stage {'3' if stage == 3 else '1/2'}; this run "
            f"has {world_size} with ZeRO stage 0, which cannot load ZeRO-partitioned optimizer state. Resume with "
            f"--zero_stage 1, 2 or 3 (a different count works there), or on {saved} process(es)."])
    if ds.offload_optimizer == "nvme":
        raise ConfigError([
            f"{ckpt.name} was written by {saved} process(es); this run has {world_size} and offloads the optimizer to "
            "NVMe, where DeepSpeed cannot load a universal checkpoint. Resume on the same count, or with "
            "--zero_stage 3_offload (CPU) for this resume."])
    plan.universal = True
    return plan


def prepare_resume(value: str | None, output_dir: str | Path, trains: dict, world_size: int, ds,
                   is_main: bool) -> ResumePlan | None:
    """The whole resume decision, before any weights load: which checkpoint, is it the same training, can this
    process count load it. Sets aside incomplete checkpoints. None: start fresh."""
    choice = resolve_resume(value, output_dir)
    if choice.checkpoint is None:
        set_aside(choice.incomplete, is_main)
        return None
    check_same_training(choice.checkpoint, trains)
    plan = plan_resume(choice.checkpoint, world_size, ds)  # raises before anything is renamed
    set_aside(choice.incomplete, is_main)
    logger.info("resuming from %s (rerun with --resume_from_checkpoint false to start over).", choice.checkpoint)
    return plan


# ---------------------------------------------------------------- disk space


# how a full disk (or quota) surfaces from the writers a checkpoint goes through: OSError from Python's own files,
# torch.save's RuntimeError ("file write failed", or "unexpected pos" for a short write), safetensors'
# SafetensorError (StorageFull). And whatever the error says: a save that failed with almost no space left.
_DISK_FULL = ("No space left on device", "Disk quota exceeded", "StorageFull", "file write failed", "unexpected pos")
_NEARLY_FULL = 64 * 2**20


def tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def disk_full_message(error: BaseException, output_dir: str | Path, step: int) -> str | None:
    """The message for a checkpoint save that failed because the disk filled up, or None for any other failure."""
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


def space_warning(checkpoint: Path, args, state) -> str | None:
    """After a save: will the disk hold the checkpoints this run has still to write (net of --save_total_limit)?
    Said at the first checkpoint, from its measured size, rather than found out when a save fails hours later."""
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


# ---------------------------------------------------------------- the completion callback


class CheckpointCompleteCallback(TrainerCallback):
    """After every rank has written a checkpoint, rank 0 writes its Marker; resume trusts only marked ones."""

    def __init__(self, trains: dict | None = None):
        self.trains, self.warned = trains, False

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # every rank's shards are on disk
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and path.is_dir():
            Marker(state.global_step, args.world_size, self.trains, time.time()).write(path)
            warning = None if self.warned else space_warning(path, args, state)
            if warning:
                logger.warning(warning)
                self.warned = True
