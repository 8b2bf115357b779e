"""SFTTrainer with live throughput metrics, and the callbacks a run needs."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import Trainer, TrainerCallback
from trl import SFTTrainer

from recipe.checkpoints import disk_full_message, last_complete
from recipe.config import sft_loss_needed
from recipe.errors import TrainingError
from recipe.long_context import (resumable_under_sequence_parallel, sequence_parallel_active,
                                 sequence_parallel_loss)
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
            group = None
            if sequence_parallel_active(self.accelerator):
                from deepspeed.utils import groups

                group = groups._get_sequence_parallel_group()
            logs.update(self.meter.report(sp_group=group))
        super().log(logs, start_time)


def let_zenflow_own_the_boundary(accelerator) -> bool:
    """Under ZenFlow, DeepSpeed's engine decides which steps update every parameter (zenflow/engine.py
    is_zenflow_update_boundary: every update_interval) and takes engine.step() after every backward, the top-k
    columns stepping on the GPU in between. accelerate's DeepSpeedEngineWrapper.backward instead sets the boundary
    from its own accumulation and steps only there, which makes every step a full CPU update. Its backward is
    replaced (once) by the engine's own loop. Returns whether ZenFlow is on."""
    wrapper = getattr(accelerator, "deepspeed_engine_wrapped", None)
    engine = getattr(wrapper, "engine", None)
    if not getattr(engine, "zenflow", False):
        return False
    if not getattr(wrapper, "zenflow_loop", False):
        def backward(loss, sync_gradients=True, **kwargs):
            engine.backward(loss, **kwargs)
            engine.step()

        wrapper.backward, wrapper.zenflow_loop = backward, True
    return True


class RecipeTrainer(ThroughputMixin, SFTTrainer):
    """SFTTrainer with live throughput metrics, the recipe's fused-loss choice, and resume on another process
    count (recipe.universal: a ZeRO checkpoint written by N processes is converted to DeepSpeed's universal
    checkpoint and loaded on M). Set resume_plan (recipe.checkpoints.prepare_resume) before train()."""

    resume_plan = None  # recipe.checkpoints.ResumePlan, decided before the model loaded (None: fresh start)

    def train(self, *args, **kwargs):
        """Train from scratch, or resume as resume_plan says (through the universal checkpoint when it must)."""
        plan = self.resume_plan
        if plan is not None and plan.universal and self.is_deepspeed_enabled:
            from recipe.universal import begin_load

            begin_load(plan, self.args, self.accelerator.state.deepspeed_plugin)
        if plan is not None and getattr(self.args, "sequence_parallel_size", 1) > 1:
            resumable_under_sequence_parallel()
        return super().train(str(plan.checkpoint) if plan is not None else None, *args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        let_zenflow_own_the_boundary(self.accelerator)  # after accelerate's prepare, which made the wrapper
        return super().training_step(model, inputs, *args, **kwargs)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        # transformers hands accelerate one accumulation step (the Trainer accumulates itself) but writes the real
        # count into the DeepSpeed config, so accelerate's prepare() warns "Gradient accumulation steps mismatch ...
        # Using DeepSpeed's value" on every run that accumulates, and takes it. Take it here: same state, no warning
        # (the Trainer never calls accelerator.accumulate(), the only reader).
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        steps = plugin.get_value("gradient_accumulation_steps") if plugin is not None else None
        if isinstance(steps, int):
            self.accelerator.gradient_accumulation_steps = steps

    def _save_checkpoint(self, model, trial):
        try:
            return super()._save_checkpoint(model, trial)
        except Exception as e:
            message = disk_full_message(e, self.args.output_dir, self.state.global_step)
            if message is None:
                raise
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
        if self.args.speed.get("fused_loss") == "trl" and (self.args.token_metrics or sft_loss_needed(self.args)):
            # SFTTrainer's own loss: TRL's chunked head plus what it alone computes (DFT, label smoothing, token
            # metrics), at the price of a host sync per micro-batch (recipe.config.loss_option_problems refuses
            # these options with the Liger loss)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The model computes its own loss without full logits: Liger's fused linear cross-entropy
        # (recipe.speed patched the forward) or TRL's chunked head. Trainer.compute_loss passes
        # num_items_in_batch, so gradient accumulation averages over all tokens, with no host sync.
        inputs["use_cache"] = False
        inputs["return_dict"] = True  # Liger's forward otherwise reads config.use_return_dict, deprecated (a warning)
        if self.args.speed.get("fused_loss") == "trl":
            inputs["fused_lm_head"] = True
        if model.training and sequence_parallel_active(self.accelerator):
            return sequence_parallel_loss(model, inputs, return_outputs,  # the group's mean, each shard's gradient
                                          zero_stage=self.args.ds.stage if self.args.ds else None)
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


class ReleaseShmBuffersCallback(TrainerCallback):
    """CPU ranks: unlink DeepSpeed's /dev/shm all-reduce files (recipe.hardware.release_shm_buffers) once the engine,
    which creates them, is up."""

    def on_train_begin(self, args, state, control, **kwargs):
        from recipe.hardware import release_shm_buffers

        release_shm_buffers()


class NonFiniteLossCallback(TrainerCallback):
    """Stop at the first logged loss or gradient norm that is nan or inf, before anything is saved from the broken
    weights. (Our bf16 ZeRO-1/2 configs turn DeepSpeed's per-gradient overflow check off, as ZeRO-3 never runs it in
    bf16: a non-finite gradient is not skipped by DeepSpeed, so its norm is what shows it.)

    Every rank sees the same logged values (they are gathered), so all stop together; main() then exits with
    the step, the last good checkpoint and the usual causes.
    """

    def __init__(self):
        self.bad_step: int | None = None
        self.bad_value: float | None = None
        self.bad_name = "training loss"

    def on_log(self, args, state, control, logs=None, **kwargs):
        import math

        for key, name in (("loss", "training loss"), ("grad_norm", "gradient norm")):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                self.bad_step, self.bad_value, self.bad_name = state.global_step, value, name
                control.should_training_stop, control.should_save, control.should_evaluate = True, False, False
                return

    def message(self, output_dir: str, learning_rate: float) -> str:
        good = last_complete(output_dir)
        return (f"the {self.bad_name} became {self.bad_value} at step {self.bad_step}; training stopped and nothing "
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
