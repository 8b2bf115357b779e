"""Merge a LoRA adapter into its base model: a plain HF model folder (safetensors) that from_pretrained loads.

    uv run python scripts/merge_lora.py results/<run>/model --out merged/          # base from the adapter or its run
    uv run python scripts/merge_lora.py adapter/ --out merged/ --base meta-llama/Llama-3.2-1B --dtype bf16
    uv run python scripts/merge_lora.py exported/ --out merged/ --base tiny --seed 42   # the embedded tiny default

The base is --base, else adapter_config.json's base_model_name_or_path, else the run's base_model/ or args.json
(for an adapter in results/<run>/model or results/<run>/checkpoints/checkpoint-N). The embedded tiny default has no
hub id: LoRA runs save its weights to results/<run>/base_model/ and the adapter names that folder (a relative path,
also looked up from the repo root and beside the adapter); adapters that record no base (null) get the tiny default
rebuilt from recipe/tiny_llama.json with the run's seed, as train_ds.py built it (--base tiny --seed N by hand).
A --random_init base (a config.json without weights) cannot be rebuilt: its weights were never saved.

Before anything is written the merge is checked: the loss on --eval_rows rows of --eval_file with base+adapter and
with the merged model must agree within the dtype's rounding (relative: fp32 1e-4, fp16 2e-3, bf16 1e-2); the base
alone is printed beside them. Evaluate the result with `train_ds.py --eval_only --model_name_or_path merged/`,
talk to it with `scripts/generate.py merged/`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# |loss(merged) - loss(base+adapter)| allowed, relative to the loss: merged weights are rounded to the dtype once
# (bf16 keeps 8 bits of mantissa, ~0.4% per weight), the unmerged path adds the LoRA term in fp32.
TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1e-2}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("adapter", help="a LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="the merged model folder to write (must not exist or be empty)")
    p.add_argument("--base", help="base model: hub id, local folder, or 'tiny' (the embedded default). "
                   "Default: the adapter's base_model_name_or_path, else its run's args.json")
    p.add_argument("--seed", type=int, help="seed of the tiny default's init (default: the run's args.json, else 42)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="dtype to merge and save in (auto: the base's own)")
    p.add_argument("--eval_file", default=str(ROOT / "data" / "test.jsonl"),
                   help="rows for the before/after loss check (any format train_ds.py reads from .jsonl)")
    p.add_argument("--eval_rows", type=int, default=8, help="rows used for the loss check")
    return p.parse_args(argv)


# ── the adapter and its base ──────────────────────────────────────────────────

def read_adapter_config(path: Path) -> dict:
    """adapter_config.json of a LoRA folder; SystemExit naming the fix for anything else."""
    if not path.exists():
        raise SystemExit(f"error: {path} does not exist. Pass a LoRA adapter folder (a LoRA run's "
                         "results/<run>/model, or one written by scripts/export.py).")
    if not path.is_dir():
        raise SystemExit(f"error: {path} is not a folder. Pass a LoRA adapter folder (with adapter_config.json).")
    if not (path / "adapter_config.json").exists():
        if (path / "config.json").exists() and any(p for g in WEIGHT_GLOBS for p in path.glob(g)):
            hint = "it is a full model folder: there is nothing to merge, load it directly"
        else:
            hint = ("for a training checkpoint or a run's checkpoints/ folder, run `uv run python scripts/export.py "
                    f"{path} --out exported/` first (a LoRA checkpoint becomes an adapter folder) and merge that")
        raise SystemExit(f"error: {path} has no adapter_config.json, so it is not a LoRA adapter; {hint}.")
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise SystemExit(f"error: {path} holds a {config.get('peft_type')} adapter; only LoRA adapters merge.")
    return config


def run_args(adapter: Path) -> dict | None:
    """args.json of the run that wrote the adapter (results/<run>/model, results/<run>/checkpoints/checkpoint-N)."""
    for folder in (adapter.parent, adapter.parent.parent):
        if (folder / "args.json").exists():
            return json.loads((folder / "args.json").read_text())
    return None


def run_base_folder(adapter: Path) -> Path | None:
    """results/<run>/base_model: the tiny default's weights, saved by train_ds.py for LoRA runs."""
    for folder in (adapter.parent, adapter.parent.parent):
        if (folder / "base_model" / "config.json").exists():
            return folder / "base_model"
    return None


def locate(recorded: str, adapter: Path) -> str:
    """A recorded base as given, else relative to the repo (train_ds.py records results/<run>/base_model relative
    to where it ran), else the run's base_model/ beside the adapter; a hub id stays as it is."""
    for candidate in (Path(recorded), ROOT / recorded):
        if candidate.exists():
            return str(candidate)
    if Path(recorded).name == "base_model" and run_base_folder(adapter) is not None:
        return str(run_base_folder(adapter))
    return recorded


def resolve_base(adapter: Path, config: dict, base: str | None, seed: int | None) -> tuple[str | None, int, str]:
    """(base to load: a hub id or folder, None for the tiny default rebuilt from its seed; seed; where it came from)."""
    args = run_args(adapter)
    run_seed = args["training"]["seed"] if args else None
    seed = seed if seed is not None else run_seed if run_seed is not None else 42
    if base is not None:
        return (None if base == "tiny" else base), seed, "--base"
    recorded = config.get("base_model_name_or_path")
    if args and args["script"].get("random_init"):
        raise SystemExit(f"error: {adapter} was trained on a --random_init model ({recorded or 'the run model'}); its "
                         "random weights were never saved, so the base cannot be reconstructed and the adapter cannot "
                         "be merged. Train with full fine-tuning (no --use_peft) to keep such a model.")
    if recorded:
        return locate(recorded, adapter), seed, "adapter_config.json"
    if run_base_folder(adapter) is not None:
        return str(run_base_folder(adapter)), seed, "the run's base_model/"
    if args and args["model"].get("model_name_or_path"):
        return args["model"]["model_name_or_path"], seed, "the run's args.json"
    if args:
        return None, seed, "the run's args.json (the embedded tiny default)"
    raise SystemExit(f"error: {adapter}/adapter_config.json records no base model (base_model_name_or_path is null: "
                     "an adapter trained on the embedded tiny default, whose weights are a seeded random init), and "
                     "no run args.json is beside it. Pass --base tiny --seed <the run's seed, 42 by default>, or "
                     "--base <hub id or folder>.")


def check_base(base: str) -> None:
    """A config-only folder (a --random_init shape, configs/models/*) has no weights to merge into."""
    path = Path(base)
    folder = path.parent if path.name == "config.json" else path
    if (folder / "config.json").exists() and not any(p for g in WEIGHT_GLOBS for p in folder.glob(g)):
        raise SystemExit(f"error: base {base} is a model shape (config.json, no weights), as used with --random_init: "
                         "random weights are not saved, so this base cannot be reconstructed. Pass --base <the "
                         "folder or hub id holding the weights the adapter was trained on>.")
    if not path.exists() and (base.startswith((".", "/", "~")) or base.count("/") > 1):
        raise SystemExit(f"error: base model {base} not found. Pass --base <hub id or folder with the base weights>, "
                         "or --base tiny for the embedded default.")


def load_base(name: str | None, tokenizer, seed: int = 42, dtype: str = "auto", revision: str = "main"):
    """A model as train_ds.py loads it (None: the tiny default from its seed), in fp32/bf16/fp16 or as saved."""
    import torch

    from recipe.config import ModelArguments
    from recipe.modeling import load_model

    model_args = ModelArguments(model_name_or_path=name, dtype=DTYPES.get(dtype, dtype), model_revision=revision)
    # load_model reads the seed (tiny default) and, for quantised loads only, the precision flags
    training_args = SimpleNamespace(seed=seed, trust_remote_code=False, bf16=False, fp16=False)
    model = load_model(model_args, training_args, tokenizer)
    if dtype != "auto":
        model = model.to(getattr(torch, DTYPES.get(dtype, dtype)))  # the tiny default is built in fp32 regardless
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def load_tokenizer_for(adapter: Path, base: str | None):
    """The tokenizer saved with the adapter (as trained), else the base's."""
    from recipe.modeling import load_tokenizer

    has_own = any((adapter / f).exists() for f in TOKENIZER_FILES)
    return load_tokenizer(str(adapter) if has_own else base)


def load_peft_model(adapter: Path, base: str | None = None, seed: int | None = None, dtype: str = "auto"):
    """(PeftModel in eval mode on the GPU or CPU, tokenizer, description of the base)."""
    config = read_adapter_config(adapter)
    base, seed, source = resolve_base(adapter, config, base, seed)
    if base is not None:
        check_base(base)
    from peft import PeftModel

    from recipe.errors import ConfigError
    from recipe.modeling import TINY_NAME

    try:
        tokenizer = load_tokenizer_for(adapter, base)
        model = load_base(base, tokenizer, seed, dtype, config.get("revision") or "main")
    except ConfigError as e:
        raise SystemExit(f"error: base model: {e}. Pass --base <hub id or folder with the base weights>.") from None
    peft_model = PeftModel.from_pretrained(model, str(adapter))
    peft_model.eval()
    what = f"{TINY_NAME} (rebuilt, seed {seed})" if base is None else base
    return peft_model, tokenizer, f"{what}, from {source}"


# ── the check ─────────────────────────────────────────────────────────────────

def eval_texts(tokenizer, path: str, n: int) -> list[str]:
    """The first n rows of a .jsonl file, rendered as the model sees them (chat rows through the chat template)."""
    from recipe.data import detect_format, to_sft_row

    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()][:n]
    if not rows:
        raise SystemExit(f"error: --eval_file {path} has no rows.")
    texts = []
    for i, row in enumerate(rows):
        try:
            sft = to_sft_row(row, detect_format(list(row)), where=f"{path} row {i + 1}")
        except Exception as e:
            raise SystemExit(f"error: {e}") from None
        if "text" in sft:
            texts.append(sft["text"])
        elif "input_ids" in sft:
            texts.append(tokenizer.decode(sft["input_ids"]))
        elif isinstance(sft["prompt"], list):
            texts.append(tokenizer.apply_chat_template(sft["prompt"] + sft["completion"], tokenize=False))
        else:
            texts.append(sft["prompt"] + sft["completion"])
    return texts


def lm_loss(model, tokenizer, texts: list[str], max_length: int = 512) -> float:
    """Mean next-token loss over every token of the texts."""
    import torch

    device = next(model.parameters()).device
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                    add_special_tokens=False).to(device)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss.item()


def merge(adapter: Path, out: Path, base: str | None = None, seed: int | None = None, dtype: str = "auto",
          eval_file: str = str(ROOT / "data" / "test.jsonl"), eval_rows: int = 8) -> dict:
    """Merge, check, save; returns the losses. SystemExit (nothing written) when the check fails."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} is not empty: choose a new --out folder (nothing is overwritten).")
    peft_model, tokenizer, base_desc = load_peft_model(adapter, base, seed, dtype)
    texts = eval_texts(tokenizer, eval_file, eval_rows)
    loss_adapter = lm_loss(peft_model, tokenizer, texts)
    with peft_model.disable_adapter():
        loss_base = lm_loss(peft_model, tokenizer, texts)
    merged = peft_model.merge_and_unload()
    loss_merged = lm_loss(merged, tokenizer, texts)
    dtype_name = str(next(merged.parameters()).dtype).removeprefix("torch.")
    tol = TOLERANCE.get(dtype_name, 1e-2)
    result = {"adapter": str(adapter), "base": base_desc, "out": str(out), "dtype": dtype_name,
              "eval": f"{len(texts)} rows of {eval_file}", "loss_base": loss_base,
              "loss_base_plus_adapter": loss_adapter, "loss_merged": loss_merged, "tolerance": tol}
    print(f"base {base_desc}\nloss on {result['eval']} ({dtype_name}):\n"
          f"  base alone      {loss_base:.6f}\n  base + adapter  {loss_adapter:.6f}  (before merging)\n"
          f"  merged          {loss_merged:.6f}  (after)")
    if abs(loss_merged - loss_adapter) > tol * max(1.0, abs(loss_adapter)):
        raise SystemExit(f"error: the merged model's loss {loss_merged:.6f} differs from base+adapter's "
                         f"{loss_adapter:.6f} by more than {dtype_name} rounding ({tol:g} relative): the merge is "
                         f"wrong; nothing was written to {out}. Try --dtype fp32.")
    if abs(loss_adapter - loss_base) <= tol * max(1.0, abs(loss_base)):
        print("warning: the adapter barely changes the loss (an untrained adapter, lora_B still zero?).")
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(json.dumps(result))
    return result


def main(argv=None) -> int:
    a = parse_args(argv)
    merge(Path(a.adapter), Path(a.out), a.base, a.seed, a.dtype, a.eval_file, a.eval_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
