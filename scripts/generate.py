"""Answer prompts with a saved model: a full model folder or a LoRA adapter folder, through the chat template.

    uv run python scripts/generate.py results/<run>/model --prompt "reverse: hello"       # a run's model (or adapter)
    uv run python scripts/generate.py merged/ --prompts_file data/test.jsonl --max_new_tokens 16
    uv run python scripts/generate.py adapter/ --prompt "Hi" --temperature 0.7 --top_p 0.9 --seed 0

A folder with adapter_config.json is a LoRA adapter: its base is found and loaded as scripts/merge_lora.py does
(--base, else the adapter's base_model_name_or_path, else the run's args.json; the embedded tiny default is rebuilt
from its seed). Anything else loads with from_pretrained (a run's model/, scripts/export.py or merge_lora.py output).
Each --prompt is one user turn; --prompts_file rows may be any chat/prompt format train_ds.py reads (the turns before
the last assistant turn are the prompt, that turn is shown as the reference). --temperature 0 (default) is greedy,
the same generation as the held-out score of train_ds.py; GPU when there is one, else CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("model", help="a model folder (config.json + weights + tokenizer) or a LoRA adapter folder")
    p.add_argument("--prompt", action="append", default=[], help="a user message (repeat for several)")
    p.add_argument("--prompts_file",
                   help=".jsonl rows: {'prompt': ...}, {'messages': [...]}, alpaca or prompt/completion")
    p.add_argument("--max_prompts", type=int, help="only the first N rows of --prompts_file")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampling")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--base", help="an adapter's base model (hub id, folder or 'tiny'), as in scripts/merge_lora.py")
    p.add_argument("--json", action="store_true", help="one JSON object per answer instead of 'prompt -> answer'")
    a = p.parse_args(argv)
    if not a.prompt and not a.prompts_file:
        p.error("give at least one --prompt or a --prompts_file")
    if a.temperature < 0:
        p.error("--temperature must be >= 0 (0 is greedy)")
    return a


def read_prompts(path: str, limit: int | None) -> list[dict]:
    """Rows {'prompt': str or messages, 'reference': str or None} from a .jsonl file."""
    from recipe.data import detect_format, to_sft_row

    if not Path(path).is_file():
        raise SystemExit(f"error: --prompts_file {path} does not exist.")
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        row, where = json.loads(line), f"{path} line {i + 1}"
        if "prompt" in row and "completion" not in row:  # prompts only, nothing to compare with
            rows.append({"prompt": row["prompt"], "reference": None})
        else:
            try:
                sft = to_sft_row(row, detect_format(list(row)), where)
            except Exception as e:
                raise SystemExit(f"error: {e}") from None
            if "prompt" not in sft:
                raise SystemExit(f"error: {where} is a plain-text/token row: it has no prompt to answer.")
            completion = sft["completion"]
            rows.append({"prompt": sft["prompt"],
                         "reference": completion[-1]["content"] if isinstance(completion, list) else completion})
        if limit is not None and len(rows) >= limit:
            break
    return rows


def load(path: str, base: str | None = None):
    """(model in eval mode on the GPU or CPU, tokenizer, description) for a model folder or a LoRA adapter folder."""
    folder = Path(path)
    if (folder / "adapter_config.json").exists():
        from merge_lora import load_peft_model

        model, tokenizer, base_desc = load_peft_model(folder, base)
        return model, tokenizer, f"LoRA adapter {path} on {base_desc}"
    if not folder.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise SystemExit(f"error: {path} does not exist. Pass a saved model folder (results/<run>/model, or the "
                         "output of scripts/export.py or scripts/merge_lora.py) or a LoRA adapter folder.")
    from merge_lora import load_base

    from recipe.errors import ConfigError
    from recipe.modeling import load_tokenizer

    try:
        tokenizer = load_tokenizer(path)
        model = load_base(path, tokenizer)
    except ConfigError as e:
        raise SystemExit(f"error: {e} A training checkpoint without weights: run scripts/export.py on it first.") \
            from None
    return model, tokenizer, f"model {path}"


def sample_answers(model, tokenizer, rows: list[dict], max_new_tokens: int, temperature: float, top_p: float,
                   seed: int) -> list[str]:
    """Sampled answers, one prompt at a time (no padding to get right)."""
    import torch
    from transformers import set_seed

    set_seed(seed)
    device = next(model.parameters()).device
    answers = []
    for r in rows:
        text = tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) \
            if isinstance(r["prompt"], list) else r["prompt"]
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                 top_p=top_p, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def answer(model, tokenizer, rows: list[dict], max_new_tokens: int = 64, temperature: float = 0.0,
           top_p: float = 1.0, seed: int = 0) -> list[str]:
    from recipe.task import generate_answers

    if temperature == 0:  # greedy, batched: what train_ds.py's held-out score runs
        return generate_answers(model, tokenizer, rows, max_new_tokens)
    return sample_answers(model, tokenizer, rows, max_new_tokens, temperature, top_p, seed)


def shown(prompt) -> str:
    return prompt[-1]["content"] if isinstance(prompt, list) else prompt


def main(argv=None) -> int:
    a = parse_args(argv)
    rows = [{"prompt": [{"role": "user", "content": p}], "reference": None} for p in a.prompt]
    if a.prompts_file:
        rows += read_prompts(a.prompts_file, a.max_prompts)
    model, tokenizer, what = load(a.model, a.base)
    print(f"{what}, {next(model.parameters()).device}, "
          f"{'greedy' if a.temperature == 0 else f'temperature {a.temperature}, top_p {a.top_p}'}", file=sys.stderr)
    answers = answer(model, tokenizer, rows, a.max_new_tokens, a.temperature, a.top_p, a.seed)
    for r, ans in zip(rows, answers):
        if a.json:
            print(json.dumps({"prompt": r["prompt"], "answer": ans, "reference": r["reference"]}))
        else:
            ref = f"   (reference: {r['reference']})" if r["reference"] is not None else ""
            print(f"{shown(r['prompt'])} -> {ans}{ref}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
