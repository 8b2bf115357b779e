"""The recipe users copy from the common migration guides, as the benchmark's baseline row.

Plain transformers.Trainer, bf16, the ZeRO-2 JSON below (verbatim from the guides), the model's
default attention (SDPA), full logits and PyTorch's cross-entropy, no compile, no fused kernels.
The only addition is recipe.metrics' throughput meter, the same one train_ds.py logs with, so both
rows are measured the same way. Launched by scripts/benchmark.py:

    deepspeed --num_gpus=1 scripts/baseline_hf_trainer.py --model configs/models/llama-3.2-1b \\
        --data tokens.parquet --batch_size 4 --max_steps 30 --run_dir /tmp/bench/baseline
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

COMMON_ZERO2 = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": True, "reduce_bucket_size": 5e8,
                          "allgather_bucket_size": 5e8, "reduce_scatter": True},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="folder with the model's config.json (random init)")
    parser.add_argument("--data", required=True, help="parquet of pre-tokenised rows (input_ids)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--logging_steps", type=int, default=5)
    parser.add_argument("--max_length", type=int, default=None,
                        help="rows of other lengths are padded to it (the guides' padding='max_length')")
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # from the deepspeed launcher
    args = parser.parse_args()

    import torch
    from datasets import load_dataset
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    from recipe.hardware import fix_cuda_arch_list
    from recipe.metrics import meter_for
    from recipe.report import write_json
    from recipe.trainer import ThroughputMixin

    fix_cuda_arch_list()  # so the baseline's FusedAdam builds on 9.0a images too
    cuda = torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=str(Path(args.run_dir) / "checkpoints"), per_device_train_batch_size=args.batch_size,
        max_steps=args.max_steps, logging_steps=args.logging_steps, learning_rate=1e-5, bf16=cuda,
        deepspeed=COMMON_ZERO2, report_to="none", save_strategy="no", use_cpu=not cuda, seed=0,
    )
    data = load_dataset("parquet", data_files=args.data, split="train")
    pad_to = args.max_length or max(len(ids) for ids in data["input_ids"])

    def pad(row):  # the guides' tokenizer(..., padding="max_length", truncation=True); labels -100 on padding
        ids = row["input_ids"][:pad_to]
        fill = pad_to - len(ids)
        return {"input_ids": ids + [0] * fill, "attention_mask": [1] * len(ids) + [0] * fill,
                "labels": ids + [-100] * fill}

    data = data.map(pad)
    data.set_format("torch")
    config = AutoConfig.from_pretrained(args.model)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)

    class BaselineTrainer(ThroughputMixin, Trainer):
        pass

    trainer = BaselineTrainer(model=model, args=training_args, train_dataset=data, data_collator=default_data_collator)
    trainer.meter = meter_for(model)
    result = trainer.train()
    if trainer.is_world_process_zero():
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        write_json(Path(args.run_dir) / "summary.json", {
            "run_name": "baseline", "ds_config": json.dumps(COMMON_ZERO2), "zero_stage": 2,
            "world_size": training_args.world_size, "per_device_batch_size": args.batch_size,
            "global_step": trainer.state.global_step, "train_loss": losses[-1] if losses else None,
            "train_runtime_s": result.metrics.get("train_runtime"), **trainer.meter.averages(),
        })


if __name__ == "__main__":
    main()
