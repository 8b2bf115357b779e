"""Resume on a different number of processes through DeepSpeed's universal checkpoint.

A ZeRO checkpoint holds the optimizer state (stage 3: the weights too) partitioned over the processes that wrote
it, one `*zero_pp_rank_<r>_*optim_states.pt` per data-parallel rank, and DeepSpeed's engine.load_checkpoint (which
the Trainer calls) refuses another count: "The checkpoint being loaded used a DP world size of 2 but the current
world size is 1". When a resumed run's world size differs from its checkpoint's, `prepare_resume` (RecipeTrainer.
train, before the engine is built; recipe.checkpoints.plan_resume decided before any weights loaded that the
checkpoint needs it):

1. converts the checkpoint once with DeepSpeed's converter (`python -m deepspeed.checkpoint.ds_to_universal`, its public entry point) on
   rank 0 into
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
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from recipe.checkpoints import ResumePlan, ds_step_dir

logger = logging.getLogger(__name__)

DONE_MARKER = "universal_conversion.json"  # written into global_stepN_universal/ once the conversion finished


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
            run_converter(source, out, workers)
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


def converter_command(source: Path, out: Path, workers: int) -> list[str]:
    """DeepSpeed's converter as its documentation runs it. --inject_missing_state: the Trainer's checkpoints carry
    no universal_checkpoint_info (Megatron-DeepSpeed writes it; the converter asserts it for stages 1-2)."""
    return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
            "--output_folder", str(out), "--num_extract_workers", str(workers), "--num_merge_workers", str(workers),
            "--inject_missing_state"]


def run_converter(source: Path, out: Path, workers: int) -> None:
    start = time.time()
    logger.info("converting %s to a universal checkpoint in %s (DeepSpeed ds_to_universal)...", source, out)
    # one process: the converter's own pools, and no accelerator it needs (it works on CPU tensors)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run(converter_command(source, out, workers), capture_output=True, text=True, env=env)
    if done.returncode != 0:
        logger.error("ds_to_universal failed (exit %d); its output:\n%s%s", done.returncode, done.stdout[-4000:],
                     done.stderr[-4000:])
        raise RuntimeError(f"DeepSpeed's ds_to_universal could not convert {source} (exit {done.returncode}); its "
                           "output is in the log above. The checkpoint itself is untouched: resume on the process "
                           "count that wrote it.")
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


def begin_load(plan: ResumePlan, args, ds_plugin) -> None:
    """Before trainer.train builds the engine (plan.universal): convert once, turn on load_universal."""
    logger.warning("%s was written by %d process(es), this run has %d: resuming through DeepSpeed's universal "
                   "checkpoint (weights and optimizer state re-partitioned for %d).", plan.checkpoint.name,
                   plan.saved_world_size, args.world_size, args.world_size)
    convert(plan, args.process_index == 0)
    enable_universal_load(ds_plugin, True)


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
