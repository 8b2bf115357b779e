"""SFTTrainer with live throughput metrics, and the callbacks a run needs."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback
from trl import SFTTrainer

from recipe.report import write_json

logger = logging.getLogger(__name__)


class RecipeTrainer(SFTTrainer):
    """Adds tokens/s/device, TFLOP/s/device, MFU and peak memory to every training log."""

    meter = None  # a metrics.ThroughputMeter, set by main()

    def training_step(self, model, inputs, *args, **kwargs):
        if self.meter is not None:
            self.meter.add_batch(inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if self.meter is not None and "loss" in logs:
            logs.update(self.meter.report())
        super().log(logs, start_time)


class HeldoutCallback(TrainerCallback):
    """Exact-match score of greedy generations on held-out rows, before and after training.

    Runs on every rank (ZeRO-3 needs all ranks in each forward); the engine is set up by then.
    """

    def __init__(self, tokenizer, rows: list[dict], max_new_tokens: int, synced_gpus: bool):
        self.tokenizer, self.rows, self.max_new_tokens, self.synced_gpus = tokenizer, rows, max_new_tokens, synced_gpus
        self.scores: dict[str, float] = {}

    def _score(self, model) -> float:
        from recipe.task import heldout_score

        return heldout_score(model, self.tokenizer, self.rows, self.max_new_tokens, synced_gpus=self.synced_gpus)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.scores["heldout_score_before"] = self._score(model)
        logger.info("held-out exact match before training: %.3f", self.scores["heldout_score_before"])

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.scores["heldout_score_after"] = self._score(model)
        logger.info("held-out exact match after training: %.3f", self.scores["heldout_score_after"])


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
