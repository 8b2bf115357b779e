"""Turn a training checkpoint into a Hugging Face model folder (safetensors) that from_pretrained loads.

Takes any checkpoint the recipe writes (results/<run>/checkpoints/checkpoint-N, ZeRO-2 or ZeRO-3, with
or without gathered 16-bit weights, full or LoRA) and writes config, weights and tokenizer to --out:
- full weights in the checkpoint (ZeRO-0/1/2, or ZeRO-3 with stage3_gather_16bit_weights_on_model_save):
  loaded and saved again as safetensors, in the checkpoint's dtype;
- no weights (ZeRO-3 without gathering), or --fp32: the fp32 master weights consolidated from the ZeRO
  shards with DeepSpeed's zero_to_fp32 (saved in fp32 with --fp32, else in the model's dtype);
- a LoRA adapter: the adapter folder (adapter_config.json + adapter_model.safetensors) and the tokenizer;
  load it with peft's AutoPeftModelForCausalLM, or merge it into the base model with scripts/merge_lora.py.

    uv run python scripts/export.py results/<run>/checkpoints/checkpoint-500 --out exported/
    uv run python scripts/export.py results/<run>/checkpoints/checkpoint-500 --out exported-fp32/ --fp32
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER = ("adapter_config.json",)
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "tokenizer.model", "generation_config.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("checkpoint", help="a checkpoint-N folder (or a run's checkpoints/ folder: its newest)")
    p.add_argument("--out", required=True, help="the HF model folder to write (must not exist or be empty)")
    p.add_argument("--fp32", action="store_true", help="the fp32 master weights (zero_to_fp32), saved in fp32")
    return p.parse_args(argv)


def pick_checkpoint(path: Path) -> Path:
    """A checkpoint folder as given, or the newest checkpoint-N inside a checkpoints/ folder."""
    if not path.is_dir():
        raise SystemExit(f"error: {path} is not a folder. Pass results/<run>/checkpoints/checkpoint-N.")
    if (path / "config.json").exists() or (path / "adapter_config.json").exists():
        return path
    from recipe.checkpoints import checkpoints

    found = checkpoints(path)
    if not found:
        raise SystemExit(f"error: {path} holds no config.json and no checkpoint-N folder: not a checkpoint.")
    return found[-1]


def has_zero_shards(ckpt: Path) -> bool:
    return (ckpt / "latest").exists() or any(ckpt.glob("global_step*"))


def copy_files(src: Path, out: Path, names) -> None:
    for name in names:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)


def export(ckpt: Path, out: Path, fp32: bool = False) -> str:
    """Write the HF folder; returns how the weights were obtained."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise SystemExit(f"error: {out} is not empty: choose a new --out folder (nothing is overwritten).")
    if (ckpt / "adapter_config.json").exists():
        if fp32:
            raise SystemExit("error: --fp32 is for full fine-tunes; a LoRA checkpoint's adapter is exported as saved.")
        copy_files(ckpt, out, ("adapter_config.json", "adapter_model.safetensors", "README.md", *TOKENIZER))
        return "lora adapter"
    has_weights = any((ckpt / w).exists() for w in WEIGHTS)
    if has_weights and not fp32:
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype="auto")
        how = "the weights saved in the checkpoint"
    else:
        if not has_zero_shards(ckpt):
            raise SystemExit(f"error: {ckpt} has neither model weights nor DeepSpeed ZeRO shards (global_step*/): "
                             "it was saved with save_only_model and no weights, or is incomplete.")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        config = AutoConfig.from_pretrained(ckpt)
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
        dtype = torch.float32 if fp32 else (getattr(config, "dtype", None) or torch.float32)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        tied = {k for k in missing if "lm_head" in k} if getattr(config, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise SystemExit(f"error: the ZeRO shards do not match the model config: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}.")
        model.tie_weights()
        model = model.to(dtype)
        how = f"fp32 master weights from the ZeRO shards (zero_to_fp32), saved as {str(dtype).removeprefix('torch.')}"
    model.save_pretrained(out, safe_serialization=True)
    copy_files(ckpt, out, TOKENIZER)
    return how


def main(argv=None) -> int:
    a = parse_args(argv)
    ckpt = pick_checkpoint(Path(a.checkpoint))
    how = export(ckpt, Path(a.out), a.fp32)
    print(json.dumps({"checkpoint": str(ckpt), "out": a.out, "weights": how}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
