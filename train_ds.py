"""Fine-tune a Llama-class causal LM with TRL's SFTTrainer on DeepSpeed ZeRO.

With no arguments it runs the embedded default (configs/default.yaml): a ~0.8M-parameter Llama
built from recipe/tiny_llama.json learns to reverse words from data/; no network, no GPU.

    uv run python train_ds.py                                   # default, 1 process (CPU or 1 GPU)
    uv run deepspeed --num_gpus=2 train_ds.py                   # default, 2 GPUs (2 CPU processes without GPUs)
    uv run deepspeed --num_gpus=8 train_ds.py --config configs/llama-3.2-1b.yaml
    uv run torchrun --nproc_per_node=2 train_ds.py --zero_stage 3 --max_steps 50
    scripts/train.sh --zero_stage 3 --config configs/llama-3.2-3b.yaml   # all local GPUs

DeepSpeed: --deepspeed ds_configs/<name>.json (default stage2.json) or --zero_stage 0|1|2|3|2_offload|
3_offload|3_partial_offload|3_nvme. Precision: bf16 where the GPU has it, else fp16; fp32 on CPU; --bf16/--fp16 override.
Everything lands in results/<run_name>/: args.json, ds_config.json, summary.json, loss.png, model/,
checkpoints/ and wandb/. Rerunning the same command resumes from the newest complete checkpoint (and the
same W&B run); --resume_from_checkpoint false starts over, a checkpoint path resumes from it.

main() is a pipeline of named phases; each concern lives in one module of recipe/ (README's tree).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import sys
from pathlib import Path

from recipe.errors import ConfigError, TrainingError

logger = logging.getLogger("train_ds")


@dataclasses.dataclass
class Run:
    """What the phases share: the run folder, rank 0 or not, what trains, and the resume decision."""

    dir: Path
    is_main: bool
    trains: dict
    resume: object = None  # recipe.checkpoints.ResumePlan, or None for a fresh start
    wandb: str | None = None  # the W&B mode (online/offline), None when off


def main(script_args, training_args, model_args) -> dict:
    run = prepare_run(script_args, training_args, model_args)  # folder, args.json, resume: before any weights
    if training_args.dry_run:
        from recipe.preflight import dry_run

        return dry_run(training_args, model_args, run.dir, run.is_main)
    tokenizer = build_tokenizer(script_args, training_args, model_args)
    data = build_data(script_args, training_args, tokenizer)
    model = build_model(script_args, training_args, model_args, run, tokenizer)
    trainer, heldout = build_trainer(script_args, training_args, model_args, run, model, tokenizer, data)
    train_metrics, train_loss_mean = train_or_raise(trainer, training_args, model_args)
    return finish(script_args, training_args, model_args, run, trainer, tokenizer, heldout, data,
                  train_metrics, train_loss_mean)


# ── run folder and resume ─────────────────────────────────────────────────────


def run_name_for(script_args, training_args, model_args) -> str:
    model = Path(model_args.model_name_or_path).name if model_args.model_name_or_path else "tiny-llama"
    data = "mix" if script_args.dataset_mixture else Path(script_args.dataset_name).stem
    ds = training_args.ds.stem if training_args.ds else ("eval" if training_args.eval_only else "custom-ds")
    method = "_qlora" if model_args.load_in_4bit else "_lora" if model_args.use_peft else ""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model}_{data}_{ds}{method}")


def prepare_run(script_args, training_args, model_args) -> Run:
    from recipe import checkpoints, hardware, preflight, report

    logging.getLogger().setLevel(training_args.get_process_log_level())  # transformers' per-rank levels
    is_main = training_args.process_index == 0
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
    logger.info("run %s: %d process(es), %s, DeepSpeed %s, global batch %d = %d per device x %d accumulation x %d",
                training_args.run_name, world, hardware.precision_name(training_args.bf16, training_args.fp16),
                training_args.ds_config_path,
                training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world,
                training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps, world)
    trains = checkpoints.what_trains(model_args)
    resume = None if training_args.eval_only or training_args.dry_run else checkpoints.prepare_resume(
        training_args.resume_from_checkpoint, training_args.output_dir, trains, world, training_args.ds, is_main)
    preflight.before_weights(training_args, model_args)  # "auto" the model settles, NVMe buffers, host RAM (exit 2)
    return Run(run_dir, is_main, trains, resume)


# ── tokenizer and data ────────────────────────────────────────────────────────


def build_tokenizer(script_args, training_args, model_args):
    from recipe import modeling

    return modeling.load_tokenizer(script_args.tokenizer_name_or_path or model_args.model_name_or_path,
                                   model_args.model_revision, training_args.trust_remote_code)


def build_data(script_args, training_args, tokenizer):
    from recipe import data

    # rank 0 tokenises first; the others (and reruns) read datasets' cache
    with training_args.main_process_first(desc="load, tokenise and mask the dataset"):
        built = data.build_datasets(script_args, training_args.seed, tokenizer, training_args.dataset_num_proc)
    logger.info("data: %d train rows (%s), %s eval rows, format %s", len(built.train),
                ", ".join(f"{k}: {v}" for k, v in built.rows_per_source.items()),
                len(built.eval) if built.eval is not None else 0, built.fmt)
    if built.eval is None and training_args.eval_strategy != "no":
        logger.warning("no eval set (no --eval_dataset_name, no test split, eval_split_ratio 0): evaluation off.")
        training_args.eval_strategy = "no"
    return built


# ── model (after TrainingArguments: under ZeRO-3 the weights are partitioned as they load) ────────────────────


def build_model(script_args, training_args, model_args, run: Run, tokenizer):
    from recipe import metrics, modeling, speed

    if training_args.speed["varlen_attention"]:
        if model_args.attn_implementation is None:
            from recipe import attention

            model_args.attn_implementation = attention.register()
        else:  # the user's choice stands; the summary says what ran
            training_args.speed["varlen_attention"] = False
    model = modeling.load_model(model_args, training_args, tokenizer, random_init=script_args.random_init)
    if training_args.fp8:  # before the layers compile, so the casts fuse into them
        from recipe import fp8

        fp8.convert(model, training_args.fp8_recipe)
    speed.apply_speed(model, training_args.speed)
    if model_args.use_peft:
        modeling.check_lora_targets(model, model_args.lora_target_modules)
        if model_args.model_name_or_path is None:  # the tiny default's weights exist nowhere else: keep them
            modeling.save_base(model, tokenizer, run.dir / "base_model", run.is_main)
        elif script_args.random_init:
            logger.warning("LoRA on random weights (--random_init): the adapter's base cannot be loaded again; "
                           "fine for benchmarks, not for merging.")
    logger.info("model: %s, %.2fM parameters, ZeRO stage %s; speed options: %s",
                model_args.model_name_or_path or modeling.TINY_NAME, metrics.count_params(model) / 1e6,
                training_args.ds.stage if training_args.ds else None, training_args.speed)
    return model


# ── trainer ───────────────────────────────────────────────────────────────────


def build_trainer(script_args, training_args, model_args, run: Run, model, tokenizer, data):
    from trl import get_peft_config

    from recipe import metrics, report
    from recipe.checkpoints import CheckpointCompleteCallback
    from recipe.trainer import (HeldoutCallback, NonFiniteLossCallback, RecipeTrainer, ReleaseShmBuffersCallback,
                                RunInfoCallback, fault_callbacks)

    heldout = None
    if data.heldout_rows and wants_heldout(script_args):
        heldout = HeldoutCallback(tokenizer, data.heldout_rows, script_args.heldout_max_new_tokens,
                                  synced_gpus=bool(training_args.ds) and training_args.ds.stage == 3
                                  and training_args.world_size > 1)
    run.wandb = report.setup_wandb(training_args, run.dir, run.is_main, resuming=run.resume is not None)
    run_info = RunInfoCallback(run.dir, {"script_args": report.args_dict(script_args, training_args, model_args),
                                         "git_commit": report.git_commit()})
    trainer = RecipeTrainer(
        model=model, args=training_args, train_dataset=data.train, eval_dataset=data.eval,
        processing_class=tokenizer, peft_config=get_peft_config(model_args),
        callbacks=[cb for cb in (run_info, heldout, CheckpointCompleteCallback(run.trains), NonFiniteLossCallback(),
                                 ReleaseShmBuffersCallback()) if cb is not None] + fault_callbacks(),
    )
    trainer.meter = metrics.meter_for(model)
    trainer.resume_plan = run.resume
    check_prepared(trainer, data, training_args, run.is_main)
    return trainer, heldout


def check_prepared(trainer, data, training_args, is_main: bool) -> None:
    """What truncation to max_length left of each split (packing keeps every token)."""
    from recipe.data import check_truncation

    if training_args.packing:
        return
    errors = []
    for split, ours, after in (("train", data.train, trainer.train_dataset), ("eval", data.eval, trainer.eval_dataset)):
        if ours is None:
            continue
        split_errors, warnings = check_truncation(after, ours, training_args.max_length, split)
        errors += split_errors
        for warning in warnings if is_main else []:
            logger.warning(warning)
    if errors:
        raise ConfigError(errors)


def wants_heldout(script_args) -> bool:
    if script_args.heldout_eval == "auto":
        return Path(script_args.dataset_name).as_posix().endswith("data/train.jsonl")
    return script_args.heldout_eval == "true"


# ── train ─────────────────────────────────────────────────────────────────────


def train_or_raise(trainer, training_args, model_args) -> tuple[dict, float | None]:
    """Train (or not, --eval_only); out of GPU memory and a nan loss end in a TrainingError with what to do."""
    from recipe.preflight import oom_message, torch_oom
    from recipe.trainer import NonFiniteLossCallback

    if training_args.eval_only:
        return {}, None
    try:
        result = trainer.train()
    except torch_oom() as e:
        raise TrainingError(oom_message(training_args, model_args, e)) from None
    nonfinite = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NonFiniteLossCallback))
    if nonfinite.bad_step is not None:
        raise TrainingError(nonfinite.message(training_args.output_dir, training_args.learning_rate))
    return result.metrics, result.training_loss


# ── save, eval, report ────────────────────────────────────────────────────────


def finish(script_args, training_args, model_args, run: Run, trainer, tokenizer, heldout, data,
           train_metrics: dict, train_loss_mean) -> dict:
    from recipe import hardware, modeling, report

    if script_args.save_final_model and not training_args.eval_only:
        trainer.save_model(str(run.dir / "model"))  # ZeRO-3: 16-bit weights gathered (see stage3.json)
        if run.is_main:
            tokenizer.save_pretrained(run.dir / "model")
    eval_metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
    if eval_metrics.get("eval_loss") is not None:
        eval_metrics["perplexity"] = math.exp(min(eval_metrics["eval_loss"], 700.0))
    if heldout is not None:
        if training_args.eval_only:
            heldout.scores["heldout_score"] = heldout.score(trainer.model)
        trainer.log(dict(heldout.scores))
    history, world = trainer.state.log_history, training_args.world_size
    summary = {
        "run_name": training_args.run_name,
        "model": model_args.model_name_or_path or modeling.TINY_NAME,
        "dataset": script_args.dataset_mixture or script_args.dataset_name,
        "dataset_format": data.fmt,
        "rows_per_dataset": data.rows_per_source,
        "train_on_turns": script_args.train_on_turns,
        "ds_config": training_args.ds_config_path,
        "zero_stage": training_args.ds.stage if training_args.ds else None,
        "world_size": world,
        "precision": hardware.precision_name(training_args.bf16, training_args.fp16),
        "per_device_batch_size": training_args.per_device_train_batch_size,
        "max_length": training_args.max_length,
        "rope_scaling": model_args.rope_scaling,
        "packing": training_args.packing,
        "fp8": training_args.fp8_recipe if training_args.fp8 else None,
        **training_args.speed,
        "token_metrics": training_args.token_metrics,
        "loss_type": training_args.loss_type,
        "gradient_checkpointing": bool(training_args.gradient_checkpointing),
        "activation_offloading": bool(training_args.activation_offloading),
        "sequence_parallel_size": training_args.sequence_parallel_size,
        "global_batch_size": training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps * (world // training_args.sequence_parallel_size),
        "global_step": trainer.state.global_step,
        "train_loss": report.last_logged(history, "loss"),
        "train_loss_mean": train_loss_mean,
        "eval_loss": eval_metrics.get("eval_loss"),
        "perplexity": eval_metrics.get("perplexity"),
        "train_runtime_s": train_metrics.get("train_runtime"),
        "resumed_from": str(run.resume.checkpoint) if run.resume else None,
        "resumed_from_world_size": run.resume.saved_world_size if run.resume else None,
        "wandb": run.wandb,
        "git_commit": report.git_commit(),
        "peak_memory_gib": None,
        **trainer.meter.averages(),
        "cpu_peak_rss_gib": report.peak_rss_gib(),  # this process (rank 0); offload keeps optimizer states here
        "optimizer_state_dtypes": report.optimizer_state_dtypes(trainer),
        "disk_written_gib": report.disk_written_gib(),  # this process (rank 0); NVMe offload swaps through it
        "zenflow": report.zenflow_updates(trainer),
        **(heldout.scores if heldout is not None else {}),
    }
    if run.is_main:
        report.write_json(run.dir / "summary.json", summary)
        report.plot_loss(history, run.dir / "loss.png")
        trainer.save_state()
        logger.info("results in %s:\n%s", run.dir, "\n".join(f"  {k}: {v}" for k, v in summary.items()))
    return summary


if __name__ == "__main__":
    from recipe.hardware import prepare_process

    prepare_process()
    try:
        from recipe.config import parse_args

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
