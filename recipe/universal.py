"""Resume on a different number of processes through DeepSpeed's universal checkpoint.

A ZeRO checkpoint holds the optimizer state (stage 3: the weights too) partitioned over the processes that wrote
it, one `*zero_pp_rank_<r>_*optim_states.pt` per data-parallel rank, and DeepSpeed's engine.load_checkpoint (which
the Trainer calls) refuses another count: "The checkpoint being loaded used a DP world size of 2 but the current
world size is 1". When a resumed run's world size differs from its checkpoint's, `prepare_resume` (RecipeTrainer.
train, before the engine is built):

1. converts the checkpoint once with DeepSpeed's converter (deepspeed.checkpoint.ds_to_universal) on rank 0 into
   `checkpoint-N/global_stepN_universal/` and `checkpoint-N/latest_universal`, the other ranks waiting; a
   conversion cut off midway is redone, a finished one reused. The Trainer's checkpoints lack the
   universal_checkpoint_info that Megatron-DeepSpeed writes and the converter asserts for stages 1-2:
   --inject_missing_state supplies it.
2. sets `checkpoint.load_universal` in the config dict of accelerate's DeepSpeedPlugin, which is what
   deepspeed.initialize gets, so the Trainer's engine.load_checkpoint reads `latest_universal` and
   re-partitions weights and optimizer state for this world size.

`finish_load` (RecipeTrainer, right after the Trainer's DeepSpeed load) turns load_universal off again (a later
load, e.g. load_best_model_at_end, reads normal checkpoints) and repairs two slips of DeepSpeed's ZeRO-3 universal
loader (repair_zero3_optimizer). The rest of the Trainer's state is world-size independent once the global batch
is kept (--global_batch_size): global step (trainer_state.json), lr scheduler (inside DeepSpeed's model states,
copied into the universal folder), data position (accelerate's seeded sampler; k batches skipped on each of 2
processes are the 2k micro-batches 1 process skips). Per-process RNG files of ranks that did not exist are missing:
the Trainer says so and goes on (only dropout would differ).

Stage 0 checkpoints hold the optimizer state whole (not partitioned): they resume on any count as they are.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

UNIVERSAL_SUFFIX = "_universal"
DONE_MARKER = "universal_conversion.json"  # written into global_stepN_universal/ once the conversion finished
_SHARD = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


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
    """How many processes wrote the checkpoint: its ZeRO shards, else the completion marker (world_size, written
    by CheckpointCompleteCallback), else the Trainer's per-process RNG files. None when nothing tells."""
    ckpt = Path(checkpoint)
    ranks = zero_shard_ranks(ckpt)
    if ranks:
        return max(ranks) + 1
    from recipe.trainer import read_marker

    world = read_marker(ckpt).get("world_size")
    if isinstance(world, int) and world > 0:
        return world
    rng = [p for p in ckpt.glob("rng_state_*.pth") if p.stem.rsplit("_", 1)[-1].isdigit()]
    if rng:
        return len(rng)
    return 1 if (ckpt / "rng_state.pth").is_file() else None


def saved_zero_stage(checkpoint: str | Path) -> int | None:
    """3 (per-rank model state files), 1 or 2 (optimizer shards only; the converter tells them apart itself),
    0 (no ZeRO shards: the optimizer state is whole), None (no DeepSpeed folder)."""
    step = ds_step_dir(checkpoint)
    if step is None:
        return None
    if not zero_shard_ranks(checkpoint):
        return 0
    return 3 if any(step.glob("*zero_pp_rank_*_model_states.pt")) else 2


@dataclass
class ResumePlan:
    """What a resume from `checkpoint` on `world_size` processes needs."""

    checkpoint: Path
    saved_world_size: int | None
    world_size: int
    saved_stage: int | None
    universal: bool  # convert and load through the universal checkpoint

    @property
    def universal_dir(self) -> Path:
        step = ds_step_dir(self.checkpoint)
        return step.with_name(step.name + UNIVERSAL_SUFFIX)


def plan_resume(checkpoint: str | Path, world_size: int, zero_stage: int | None, ds_config: dict | None = None
                ) -> ResumePlan:
    """Decide how to resume; raise ConfigError for a world-size change that cannot be done."""
    from recipe.config import ConfigError

    ckpt = Path(checkpoint)
    saved = saved_world_size(ckpt)
    stage = saved_zero_stage(ckpt)
    plan = ResumePlan(ckpt, saved, world_size, stage, universal=False)
    if saved is None or saved == world_size or stage is None or stage == 0:
        return plan  # same count (the normal resume), not a DeepSpeed checkpoint, or stage 0 (state whole)
    if not zero_stage:
        raise ConfigError([
            f"{ckpt.name} was written by {saved} process(es) with ZeRO stage {'3' if stage == 3 else '1/2'}; this run "
            f"has {world_size} with ZeRO stage 0, which cannot load ZeRO-partitioned optimizer state. Resume with "
            f"--zero_stage 1, 2 or 3 (a different count works there), or on {saved} process(es)."])
    from recipe.ds_check import offload_device

    if offload_device(ds_config or {}, "offload_optimizer") == "nvme":
        raise ConfigError([
            f"{ckpt.name} was written by {saved} process(es); this run has {world_size} and offloads the optimizer to "
            "NVMe, where DeepSpeed cannot load a universal checkpoint. Resume on the same count, or with "
            "--zero_stage 3_offload (CPU) for this resume."])
    plan.universal = True
    return plan


def convert(plan: ResumePlan, is_main: bool, workers: int = 1) -> Path:
    """Rank 0: DeepSpeed's ds_to_universal into <checkpoint>/global_stepN_universal (once; a finished conversion
    is reused, a partial one redone). Every rank returns once it is on disk."""
    source, out = ds_step_dir(plan.checkpoint), plan.universal_dir
    group = _long_group()  # made by every rank before rank 0 starts: making it waits on the others
    if is_main:
        done = out / DONE_MARKER
        if done.is_file():
            logger.info("universal checkpoint %s already converted: reusing it.", out)
        else:
            if out.exists():
                logger.warning("removing %s: a conversion that did not finish.", out)
                shutil.rmtree(out)
            _run_converter(source, out, workers)
            done.write_text(json.dumps({"source": source.name,
                                        "source_world_size": plan.saved_world_size,
                                        "zero_stage": plan.saved_stage, "time": time.time()}, indent=2) + "\n")
        # what engine.load_checkpoint reads with load_universal (the converter writes it too)
        (plan.checkpoint / "latest_universal").write_text(out.name)
    if group is not None:
        import torch.distributed as dist

        dist.barrier(group=group)
        dist.destroy_process_group(group)
    return out


def _run_converter(source: Path, out: Path, workers: int) -> None:
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(input_folder=str(source), output_folder=str(out), num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # the Trainer's checkpoints carry no Megatron info
    start = time.time()
    logger.info("converting %s to a universal checkpoint in %s (DeepSpeed ds_to_universal)...", source, out)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            ds_to_universal(args)
    except BaseException:
        logger.error("ds_to_universal failed; its output:\n%s", printed.getvalue())
        raise
    logger.info("converted in %.1f s.", time.time() - start)


def _long_group():
    """A gloo group whose barrier waits long enough for rank 0 to convert a large checkpoint (the default group's
    timeout may be 30 min); None in one process."""
    import datetime

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=6))


def enable_universal_load(ds_plugin, on: bool) -> None:
    """Set (or remove) checkpoint.load_universal in the config dict the DeepSpeed engine is built from."""
    config = ds_plugin.deepspeed_config
    if on:
        config.setdefault("checkpoint", {})["load_universal"] = True
        return
    section = config.get("checkpoint")
    if isinstance(section, dict):
        section.pop("load_universal", None)
        if not section:
            config.pop("checkpoint")


def prepare_resume(checkpoint: str, args, ds_plugin) -> ResumePlan:
    """Before trainer.train builds the engine: detect a world-size change, convert, turn on load_universal."""
    plan = plan_resume(checkpoint, args.world_size, ds_plugin.zero_stage, ds_plugin.deepspeed_config)
    if not plan.universal:
        if plan.saved_stage == 0 and plan.saved_world_size not in (None, args.world_size):
            logger.info("%s was written by %d process(es), this run has %d: a stage-0 checkpoint holds the whole "
                        "optimizer state, so it loads as it is.", plan.checkpoint.name, plan.saved_world_size,
                        args.world_size)
        return plan
    logger.warning("%s was written by %d process(es), this run has %d: resuming through DeepSpeed's universal "
                   "checkpoint (weights and optimizer state re-partitioned for %d).", plan.checkpoint.name,
                   plan.saved_world_size, args.world_size, args.world_size)
    convert(plan, args.process_index == 0)
    enable_universal_load(ds_plugin, True)
    return plan


def finish_load(plan: ResumePlan, engine, ds_plugin) -> None:
    """After the engine loaded the universal checkpoint: load_universal off again, ZeRO-3's optimizer repaired."""
    engine._config.load_universal_checkpoint = False
    enable_universal_load(ds_plugin, False)
    if engine.zero_optimization_partition_weights():
        repair_zero3_optimizer(plan.universal_dir, engine.optimizer.optimizer)
    logger.info("resumed from %s on %d process(es) (written by %d) at step %s.", plan.checkpoint.name,
                plan.world_size, plan.saved_world_size, engine.global_steps)


def repair_zero3_optimizer(universal_dir: Path, optimizer) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal loader (stage_1_and_2's loader has neither) in the base
    optimizer (torch's or DeepSpeed's, holding ZeRO-3's flat fp32 partitions):

    - it gives every param group the hyperparameters of group 0: the Trainer's no-weight-decay group (norms,
      biases; made when the DeepSpeed config has no optimizer) would be decayed. Each group gets its own back,
      as saved.
    - it gives every sub-group's state one and the same `step` tensor: an optimizer that counts steps in place
      (torch's AdamW) then advances it once per group per step, and Adam's bias correction drifts. Each state
      gets its own copy.
    """
    import torch

    saved = torch.load(universal_dir / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    groups = saved.get("param_groups") or saved.get("optimizer_state_dict", {}).get("param_groups")
    live = optimizer.param_groups
    if groups and len(groups) == len(live):
        for group, old in zip(live, groups):
            for key, value in old.items():
                if key != "params":
                    group[key] = value
    else:
        logger.warning("cannot restore the optimizer param groups from %s (%s saved, %d live): every group keeps "
                       "group 0's settings.", universal_dir, len(groups or []), len(live))
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
