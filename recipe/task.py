"""The default task (reverse a 3-6 letter word) and held-out scoring by greedy generation."""

from __future__ import annotations

import random
import string

PROMPT = "reverse: {}"


def make_examples(n: int, rng: random.Random, exclude: set[str]) -> list[dict]:
    """n distinct random lowercase words (3-6 letters) not in `exclude`, as chat rows."""
    rows, seen = [], set(exclude)
    while len(rows) < n:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        if word in seen:
            continue
        seen.add(word)
        rows.append({"messages": [{"role": "user", "content": PROMPT.format(word)},
                                  {"role": "assistant", "content": word[::-1]}]})
    return rows


def reference(row: dict) -> str:
    completion = row["completion"]
    return (completion[-1]["content"] if isinstance(completion, list) else completion).strip()


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not references:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def generate_answers(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int = 64,
                     synced_gpus: bool = False) -> list[str]:
    """Greedy answers to each row's prompt through the chat template (left-padded batches)."""
    import torch

    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            texts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
                     if isinstance(r["prompt"], list) else r["prompt"] for r in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                     synced_gpus=synced_gpus)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return answers


def heldout_score(model, tokenizer, rows: list[dict], max_new_tokens: int, synced_gpus: bool = False) -> float:
    answers = generate_answers(model, tokenizer, rows, max_new_tokens, synced_gpus=synced_gpus)
    return exact_match(answers, [reference(r) for r in rows])
