"""The memory estimator's uses around a run: --dry_run before launch, and the out-of-memory message after.

Both read the model's config only (no weights) and the GPUs this launch has.
"""

from __future__ import annotations

import logging
from pathlib import Path

from recipe import estimate, report

logger = logging.getLogger(__name__)


def dry_run(training_args, model_args, run_dir: Path, is_main: bool) -> dict:
    """--dry_run: the configuration has passed its checks; estimate memory, recommend, stop. No weights load."""
    shape = estimate.load_shape(model_args.model_name_or_path, model_args.model_revision,
                                training_args.trust_remote_code)
    work = estimate.run_workload(training_args, model_args)
    configs = estimate.shipped_configs()
    this = training_args.ds.stem if training_args.ds and training_args.ds.path else "this run"
    configs.setdefault(this, training_args.deepspeed)  # a user's own file is estimated too
    hw = estimate.run_hardware()
    if hw is None:  # estimates per GPU still hold; whether they fit needs a GPU's memory
        hw = estimate.Hardware(training_args.world_size, 0.0, gpu_name="(no CUDA GPU here)")
        rows = [estimate.estimate(shape, c, hw, work, n) for n, c in configs.items()]
        rec = estimate.Recommendation(None, 0, False, "no CUDA GPU here, so no GPU memory to fit: run "
                                      "scripts/estimate_memory.py --model ... --gpus N --gpu_memory_gib G")
        text = estimate.format_table(rows) + f"\n\nRecommended: {rec.reason}."
    else:
        rows, rec = estimate.plan(shape, hw, work, configs)
        text = estimate.report(shape, hw, work, rows, rec)
    result = estimate.to_json(shape, hw, work, rows, rec)
    result["this_run"] = next(estimate.gib_row(r) for r in rows if r["config"] == this)
    if is_main:
        report.write_json(run_dir / "memory_estimate.json", result)
        logger.info("dry run: %s with %s\n%s\nThis run (%s): %.1f GiB per GPU. Written: %s",
                    shape.name, this, text, this, result["this_run"]["gpu_peak"], run_dir / "memory_estimate.json")
    return result


def torch_oom():
    import torch

    return torch.cuda.OutOfMemoryError


def oom_message(training_args, model_args, error: Exception) -> str:
    """Out of GPU memory: what this run needs by the estimator, and what would fit on these GPUs."""
    first = str(error).splitlines()[0][:200]
    try:
        shape = estimate.load_shape(model_args.model_name_or_path, model_args.model_revision,
                                    training_args.trust_remote_code)
        work = estimate.run_workload(training_args, model_args)
        hw = estimate.run_hardware()
        name = training_args.ds.stem if training_args.ds and training_args.ds.path else "this config"
        need = estimate.estimate(shape, training_args.deepspeed or {}, hw, work, name)["gpu_peak"] / 2**30
        rec = estimate.recommend(shape, estimate.shipped_configs(), hw, work, max_batch=work.micro_batch)
        fit = f"{' '.join(rec.flags)} ({rec.reason})" if rec.config else rec.reason
        return (f"out of GPU memory ({first}). This run ({name}, micro-batch {work.micro_batch}, seq {work.seq_len}) "
                f"needs about {need:.1f} GiB per GPU by the estimate, of {hw.usable_gib:.0f} usable. What would fit: "
                f"{fit}. Or rerun with --zero_stage auto. Checkpoints already saved are intact; rerunning resumes.")
    except Exception as estimate_error:  # the message must not hide the OOM itself
        return (f"out of GPU memory ({first}). Lower --per_device_train_batch_size, turn on "
                f"--gradient_checkpointing, or use --zero_stage 3 / 3_offload (estimate failed: {estimate_error}).")
