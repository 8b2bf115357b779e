"""Fine-tune a Llama-class causal LM with TRL's SFTTrainer on DeepSpeed ZeRO.

With no arguments it runs the embedded default (configs/default.yaml): a ~0.8M-parameter Llama
built from recipe/tiny_llama.json learns to reverse words from data/; no network, no GPU.

    uv run python train_ds.py                                   # default, 1 process (CPU or 1 GPU)
    uv run deepspeed --num_gpus=2 train_ds.py                   # default, 2 GPUs (2 CPU processes without GPUs)
    uv run deepspeed --num_gpus=8 train_ds.py --config configs/llama-3.2-1b.yaml
    uv run torchrun --nproc_per_node=2 train_ds.py --zero_stage 3 --max_steps 50
    scripts/train.sh --zero_stage 3 --config configs/llama-3.2-3b.yaml   # all local GPUs

DeepSpeed: --deepspeed ds_configs/<name>.json (default stage2.json) or --zero_stage 0|1|2|3|2_offload|
3_offload|3_nvme. Precision: bf16 where the GPU has it, else fp16; fp32 on CPU; --bf16/--fp16 override.
Everything lands in results/<run_name>/: args.json, ds_config.json, summary.json, loss.png, model/,
checkpoints/ and wandb/. Rerunning the same command resumes from the newest complete checkpoint (and the
same W&B run); --resume_from_checkpoint false starts over, a checkpoint path resumes from it.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from pathlib import Path

from recipe.config import ConfigError, TrainingError, parse_args

logger = logging.getLogger("train_ds")


def run_name_for(script_args, training_args, model_args) -> str:
    model = Path(model_args.model_name_or_path).name if model_args.model_name_or_path else "tiny-llama"
    data = Path(script_args.dataset_name).stem
    ds = Path(training_args.ds_config_path).stem if training_args.ds_config_path else (
        "eval" if training_args.eval_only else "custom-ds")
    method = "_qlora" if model_args.load_in_4bit else "_lora" if model_args.use_peft else ""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model}_{data}_{ds}{method}")


def what_trains(model_args) -> dict:
    """What a checkpoint's weights and optimizer state belong to, kept in its completion marker: a resume into
    another model or method (a LoRA run finding a full fine-tune's checkpoint) is refused by name."""
    peft, targets = bool(model_args.use_peft), model_args.lora_target_modules
    return {"model": Path(model_args.model_name_or_path or "tiny-llama").name,
            "method": "qlora" if model_args.load_in_4bit else "lora" if peft else "full",
            "lora_r": model_args.lora_r if peft else None,
            "lora_target_modules": (sorted(targets) if isinstance(targets, list) else targets) if peft else None}


def check_same_training(checkpoint: str | Path, trains: dict | None) -> None:
    from recipe.trainer import read_marker

    saved = read_marker(checkpoint).get("trains") if trains else None
    if not saved or saved == trains:  # markers from before this check carry no "trains"
        return
    differ = ", ".join(f"{k} {saved.get(k)!r} there, {trains.get(k)!r} here" for k in sorted(trains)
                       if saved.get(k) != trains.get(k))
    raise ConfigError([f"{checkpoint} was saved by a run that trains something else ({differ}); its weights and "
                       "optimizer state cannot be loaded into this one. Give this run its own folder with "
                       "--run_name <new name> (or --output_dir), or pass --resume_from_checkpoint false to start over "
                       "in this folder (its checkpoints are then replaced)."])


def resolve_resume(value: str | None, output_dir: str, is_main: bool, trains: dict | None = None) -> str | None:
    """'auto' (default), 'last', 'true' -> the newest complete checkpoint in output_dir, or None; a path stays.

    A checkpoint is complete when every rank finished writing it (recipe.trainer.CheckpointCompleteCallback
    leaves a marker); newer incomplete ones (a kill during a save) are skipped and renamed
    incomplete-checkpoint-N by rank 0 (a name the Trainer neither counts, rotates nor reuses).
    """
    from recipe.trainer import checkpoints, is_complete, last_complete

    if value is not None and value.lower() in ("", "false", "no", "none"):
        done = last_complete(output_dir)
        if done:
            logger.warning("--resume_from_checkpoint %s: starting over although %s holds %s; its checkpoints are "
                           "replaced as the new run reaches their steps (a new --run_name keeps them).",
                           value, output_dir, done.name)
        return None
    if value is None or value.lower() in ("last", "true", "yes", "auto"):
        found = checkpoints(output_dir)
        while found and not is_complete(found[-1]):
            broken = found.pop()
            logger.warning("skipping %s: incomplete (the run stopped while saving it)%s.", broken,
                           f"; kept as incomplete-{broken.name}" if is_main else "")
            if is_main:
                broken.rename(broken.with_name("incomplete-" + broken.name))
        if found:
            check_same_training(found[-1], trains)
            logger.info("resuming from %s (rerun with --resume_from_checkpoint false to start over).", found[-1])
            return str(found[-1])
        if value is not None and value.lower() != "auto":
            logger.warning("--resume_from_checkpoint %s: no complete checkpoint in %s, starting fresh.",
                           value, output_dir)
        return None
    if not Path(value).is_dir():
        raise ConfigError([f"--resume_from_checkpoint {value}: no such checkpoint folder. "
                           f"Use 'last' to take the newest complete one in {output_dir}."])
    if not is_complete(Path(value)):
        logger.warning("%s has no completion marker: it may be incomplete (resuming from it as asked).", value)
    check_same_training(value, trains)
    return value


def main(script_args, training_args, model_args) -> dict:
    from trl import get_peft_config

    from recipe import data, hardware, metrics, modeling, report, speed
    from recipe.trainer import (CheckpointCompleteCallback, HeldoutCallback, NonFiniteLossCallback, RecipeTrainer,
                                ReleaseShmBuffersCallback, RunInfoCallback, fault_callbacks)

    # ── logging and run folder ──────────────────────────────────────────────
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=training_args.get_process_log_level())
    is_main = training_args.process_index == 0
    for name in ("train_ds", "recipe"):
        logging.getLogger(name).setLevel(logging.INFO if is_main else logging.WARNING)
    training_args.run_name = training_args.run_name or run_name_for(script_args, training_args, model_args)
    run_dir = Path(script_args.results_dir) / training_args.run_name
    if training_args.output_dir_auto:
        training_args.output_dir = str(run_dir / "checkpoints")
    if is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / ".write_test").touch()
            (run_dir / ".write_test").unlink()
        except OSError as e:
            raise ConfigError([f"cannot write the run folder {run_dir}: {e.strerror}. Pass --results_dir <a writable "
                               "folder> (and --output_dir, if set, to one too)."]) from None
        report.write_json(run_dir / "args.json", report.args_dict(script_args, training_args, model_args))
    world = training_args.world_size
    precision = hardware.precision_name(training_args.bf16, training_args.fp16)
    logger.info("run %s: %d process(es), %s, DeepSpeed %s, global batch %d = %d per device x %d accumulation x %d",
                training_args.run_name, world, precision, training_args.ds_config_path,
                training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world,
                training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps, world)

    if training_args.dry_run:
        return dry_run(training_args, model_args, run_dir, is_main)

    # ── data ────────────────────────────────────────────────────────────────
    with training_args.main_process_first(desc="load and format the dataset"):
        train_ds, eval_ds, fmt = data.build_datasets(script_args, training_args.seed)
    logger.info("data: %d train rows, %s eval rows, format %s", len(train_ds),
                len(eval_ds) if eval_ds is not None else 0, fmt)
    if eval_ds is None and training_args.eval_strategy != "no":
        logger.warning("no eval set (no --eval_dataset_name, no test split, eval_split_ratio 0): evaluation off.")
        training_args.eval_strategy = "no"

    # ── tokenizer ───────────────────────────────────────────────────────────
    tokenizer = modeling.load_tokenizer(script_args.tokenizer_name_or_path or model_args.model_name_or_path,
                                        model_args.model_revision, training_args.trust_remote_code)

    # ── model (after TrainingArguments: under ZeRO-3 the weights are partitioned as they load) ──
    model = modeling.load_model(model_args, training_args, tokenizer, random_init=script_args.random_init)
    speed.apply_speed(model, training_args.speed)
    if model_args.use_peft:
        modeling.check_lora_targets(model, model_args.lora_target_modules)
        if model_args.model_name_or_path is None:  # the tiny default's weights exist nowhere else: keep them
            modeling.save_base(model, tokenizer, run_dir / "base_model", is_main)
        elif script_args.random_init:
            logger.warning("LoRA on random weights (--random_init): the adapter's base cannot be loaded again; "
                           "fine for benchmarks, not for merging.")
    logger.info("model: %s, %.2fM parameters, partitioned by ZeRO-3 at load: %s; speed options: %s",
                model_args.model_name_or_path or modeling.TINY_NAME, metrics.count_params(model) / 1e6,
                all(hasattr(p, "ds_id") for p in model.parameters()), training_args.speed)

    # ── trainer ─────────────────────────────────────────────────────────────
    heldout = None
    if eval_ds is not None and wants_heldout(script_args):
        rows = [eval_ds[i] for i in range(min(script_args.heldout_max_samples, len(eval_ds)))]
        heldout = HeldoutCallback(tokenizer, rows, script_args.heldout_max_new_tokens,
                                  synced_gpus=training_args.deepspeed_plugin is not None
                                  and training_args.deepspeed_plugin.zero_stage == 3 and world > 1)
    resume = None if training_args.eval_only else resolve_resume(training_args.resume_from_checkpoint,
                                                                    training_args.output_dir, is_main,
                                                                    what_trains(model_args))
    nonfinite = NonFiniteLossCallback()
    wandb_mode = report.setup_wandb(training_args, run_dir, is_main, resuming=resume is not None)
    commit = report.git_commit()
    run_info = RunInfoCallback(run_dir, {"script_args": report.args_dict(script_args, training_args, model_args),
                                         "git_commit": commit})
    trainer = RecipeTrainer(
        model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
        processing_class=tokenizer, peft_config=get_peft_config(model_args),
        callbacks=[cb for cb in (run_info, heldout, CheckpointCompleteCallback(what_trains(model_args)), nonfinite,
                                 ReleaseShmBuffersCallback()) if cb is not None] + fault_callbacks(),
    )
    trainer.meter = metrics.meter_for(model)
    check_prepared(trainer, train_ds, eval_ds, training_args, is_main)

    # ── train ───────────────────────────────────────────────────────────────
    train_metrics, train_loss_mean = {}, None
    if not training_args.eval_only:
        try:
            train_result = trainer.train(resume_from_checkpoint=resume)
        except torch_oom() as e:
            raise TrainingError(oom_message(training_args, model_args, e)) from None
        if nonfinite.bad_step is not None:
            raise TrainingError(nonfinite.message(training_args.output_dir, training_args.learning_rate))
        train_metrics, train_loss_mean = train_result.metrics, train_result.training_loss

    # ── save ────────────────────────────────────────────────────────────────
    if script_args.save_final_model and not training_args.eval_only:
        trainer.save_model(str(run_dir / "model"))  # ZeRO-3: 16-bit weights gathered (see stage3.json)
        if is_main:
            tokenizer.save_pretrained(run_dir / "model")

    # ── eval ────────────────────────────────────────────────────────────────
    eval_metrics = trainer.evaluate() if eval_ds is not None else {}
    if eval_metrics.get("eval_loss") is not None:
        eval_metrics["perplexity"] = math.exp(min(eval_metrics["eval_loss"], 700.0))
    if heldout is not None:
        if training_args.eval_only:
            heldout.scores["heldout_score"] = heldout.score(trainer.model)
        trainer.log(dict(heldout.scores))

    # ── report ──────────────────────────────────────────────────────────────
    history = trainer.state.log_history
    summary = {
        "run_name": training_args.run_name,
        "model": model_args.model_name_or_path or modeling.TINY_NAME,
        "dataset": script_args.dataset_name,
        "dataset_format": fmt,
        "ds_config": training_args.ds_config_path,
        "zero_stage": training_args.deepspeed_plugin.zero_stage if training_args.deepspeed_plugin else None,
        "world_size": world,
        "precision": precision,
        "per_device_batch_size": training_args.per_device_train_batch_size,
        "max_length": training_args.max_length,
        "packing": training_args.packing,
        **training_args.speed,
        "token_metrics": training_args.token_metrics,
        "gradient_checkpointing": bool(training_args.gradient_checkpointing),
        "global_batch_size": training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps * world,
        "global_step": trainer.state.global_step,
        "train_loss": report.last_logged(history, "loss"),
        "train_loss_mean": train_loss_mean,
        "eval_loss": eval_metrics.get("eval_loss"),
        "perplexity": eval_metrics.get("perplexity"),
        "train_runtime_s": train_metrics.get("train_runtime"),
        "resumed_from": resume,
        "resumed_from_world_size": trainer.resume_plan.saved_world_size if trainer.resume_plan else None,
        "wandb": wandb_mode,
        "git_commit": commit,
        "peak_memory_gib": None,
        **trainer.meter.averages(),
        "cpu_peak_rss_gib": report.peak_rss_gib(),  # this process (rank 0); offload keeps optimizer states here
        **(heldout.scores if heldout is not None else {}),
    }
    if is_main:
        report.write_json(run_dir / "summary.json", summary)
        report.plot_loss(history, run_dir / "loss.png")
        trainer.save_state()
        logger.info("results in %s:\n%s", run_dir, "\n".join(f"  {k}: {v}" for k, v in summary.items()))
    return summary


def check_prepared(trainer, train_ds, eval_ds, training_args, is_main: bool) -> None:
    """What tokenisation and truncation to max_length left of each split (packing keeps every token)."""
    from recipe.data import check_truncation

    if training_args.packing:
        return
    errors = []
    for split, before, after in (("train", train_ds, trainer.train_dataset), ("eval", eval_ds, trainer.eval_dataset)):
        if before is None:
            continue
        split_errors, warnings = check_truncation(after, len(before), training_args.max_length, split)
        errors += split_errors
        for warning in warnings if is_main else []:
            logger.warning(warning)
    if errors:
        raise ConfigError(errors)


def torch_oom():
    import torch

    return torch.cuda.OutOfMemoryError


def oom_message(training_args, model_args, error: Exception) -> str:
    """Out of GPU memory: what this run needs by the estimator, and what would fit on these GPUs."""
    from recipe import estimate

    first = str(error).splitlines()[0][:200]
    try:
        shape = estimate.load_shape(model_args.model_name_or_path, model_args.model_revision,
                                    training_args.trust_remote_code)
        work = estimate.run_workload(training_args, model_args)
        hw = estimate.run_hardware()
        name = Path(training_args.ds_config_path or "this config").stem
        need = estimate.estimate(shape, training_args.deepspeed or {}, hw, work, name)["gpu_peak"] / 2**30
        rec = estimate.recommend(shape, estimate.shipped_configs(), hw, work, max_batch=work.micro_batch)
        fit = f"{' '.join(rec.flags)} ({rec.reason})" if rec.config else rec.reason
        return (f"out of GPU memory ({first}). This run ({name}, micro-batch {work.micro_batch}, seq {work.seq_len}) "
                f"needs about {need:.1f} GiB per GPU by the estimate, of {hw.usable_gib:.0f} usable. What would fit: "
                f"{fit}. Or rerun with --zero_stage auto. Checkpoints already saved are intact; rerunning resumes.")
    except Exception as estimate_error:  # the message must not hide the OOM itself
        return (f"out of GPU memory ({first}). Lower --per_device_train_batch_size, turn on "
                f"--gradient_checkpointing, or use --zero_stage 3 / 3_offload (estimate failed: {estimate_error}).")


def dry_run(training_args, model_args, run_dir: Path, is_main: bool) -> dict:
    """--dry_run: the configuration has passed its checks; estimate memory, recommend, stop. No weights load."""
    from recipe import estimate, report

    shape = estimate.load_shape(model_args.model_name_or_path, model_args.model_revision,
                                training_args.trust_remote_code)
    work = estimate.run_workload(training_args, model_args)
    configs = estimate.shipped_configs()
    this = Path(training_args.ds_config_path).stem if training_args.ds_config_path else "this run"
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


def wants_heldout(script_args) -> bool:
    if script_args.heldout_eval == "auto":
        return Path(script_args.dataset_name).as_posix().endswith("data/train.jsonl")
    return script_args.heldout_eval == "true"


if __name__ == "__main__":
    try:
        main(*parse_args())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
