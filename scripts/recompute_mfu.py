"""Recompute the committed MFU / TFLOP/s figures from their measured tokens/s by recipe.metrics' convention.

MFU is a function of tokens/s, the model's shape, the method and the GPU's peak, so results measured with an
older FLOP count are brought to the current one without rerunning: per token 6·N_trained + 4·N_frozen +
6·L·h·s (causal attention, N without the input embedding; recipe/metrics.py). Rewrites, in place:

- results/benchmarks/**/results.json: tflops_per_gpu, mfu, mfu_convention of every row with tokens/s;
- the results.md beside each: the TFLOP/s/GPU and MFU cells of the rows of its first table (matched by run
  name, in order), and the convention line above that table; results.png (its bar labels are the MFU);
- results/memory/*/measured.json: mfu of every row, meta.mfu_convention (mfu_as_logged, where present, stays:
  what the run logged).

Shapes come from configs/models/<name>/config.json (random weights on the meta device), LoRA rows use the
recipe's default adapter (rank 16 on every linear layer). Tables written by hand (results.md sections after
the first table, README.md) are not touched: the script prints every row's old and new figures for them.

    uv run python scripts/recompute_mfu.py [--dry_run]
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recipe.metrics import (
    MFU_FORMULA,
    attention_width,
    flop_params,
    model_flops,
    peak_tflops,
)


@functools.cache
def shape(model_dir: str, method: str = "full") -> tuple[int, int, int, int]:
    """(trained, frozen, layers, attention width) of a model folder's shape, trained `method`-wise."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ROOT / "configs" / "models" / Path(model_dir).name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        if method in ("lora", "qlora"):  # the 4-bit base has the same parameter count (metrics.param_numel)
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
    trained, frozen = flop_params(model)
    return trained, frozen, config.num_hidden_layers, attention_width(config)


def rates(tokens_per_second: float, seq_len: int, model_dir: str, method: str, gpu: str) -> tuple[float, float | None]:
    """(TFLOP/s, MFU) of fixed-length sequences at tokens_per_second."""
    trained, frozen, layers, width = shape(model_dir, method)
    tflops = model_flops(1.0, seq_len, trained, layers, width, frozen) * tokens_per_second / 1e12
    peak = peak_tflops(gpu)
    return tflops, (tflops / peak if peak else None)


def dump(path: Path, data, like: str) -> str:
    """JSON in the indentation (and final newline) of the file it replaces."""
    second = like.splitlines()[1] if len(like.splitlines()) > 1 else ""
    indent = len(second) - len(second.lstrip(" ")) or 2
    return json.dumps(data, indent=indent, ensure_ascii=False) + ("\n" if like.endswith("\n") else "")


def model_of(command: str) -> str:
    match = re.search(r"--model(?:_name_or_path)?[ =](\S+)", command)
    if not match:
        raise SystemExit(f"no --model in: {command[:120]}")
    return match.group(1)


def fix_table(text: str, rows: list[dict]) -> str:
    """The first table's TFLOP/s/GPU and MFU cells from rows (by run name, in order); the convention above it."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("| run |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    col_tflops, col_mfu = header.index("TFLOP/s/GPU"), header.index("MFU")
    pending = list(rows)
    i = start + 2
    while i < len(lines) and lines[i].startswith("|"):
        cells = lines[i].strip().strip("|").split("|")
        name = cells[0].strip()
        row = next((r for r in pending if r["name"] == name), None)
        if row is not None:
            pending.remove(row)
            if row.get("tokens_per_second_per_gpu"):
                cells[col_tflops] = f" {row['tflops_per_gpu']:.0f} "
                cells[col_mfu] = f" {100 * row['mfu']:.1f}% " if row["mfu"] else " "
            lines[i] = "|" + "|".join(cells) + "|"
        i += 1
    note = f"{MFU_FORMULA}."
    if note not in text:
        lines[start:start] = [note, ""]
    return "\n".join(lines)


def benchmarks(dry_run: bool) -> None:
    for path in sorted((ROOT / "results" / "benchmarks").glob("**/results.json")):
        like = path.read_text()
        rows = json.loads(like)
        print(f"\n{path.relative_to(ROOT)}")
        for r in rows:
            if not r.get("tokens_per_second_per_gpu"):
                continue
            old = r.get("mfu")
            r["tflops_per_gpu"], r["mfu"] = rates(r["tokens_per_second_per_gpu"], r["seq_len"], model_of(r["command"]),
                                                  "full", r["gpu"])
            r["mfu_convention"] = MFU_FORMULA
            print(f"  {r['name']:28s} {r['tokens_per_second_per_gpu']:9,.0f} tok/s  MFU {100 * (old or 0):5.1f}% "
                  f"-> {100 * (r['mfu'] or 0):5.1f}%  ({r['tflops_per_gpu']:.0f} TFLOP/s)")
        md, png = path.with_name("results.md"), path.with_name("results.png")
        if not dry_run:
            path.write_text(dump(path, rows, like))
            if md.exists():
                md.write_text(fix_table(md.read_text(), rows))
                if png.exists():  # its bar labels are the MFU; its title is the table's heading
                    sys.path.insert(0, str(ROOT / "scripts"))
                    from benchmark import write_chart

                    write_chart(rows, png, md.read_text().splitlines()[0].lstrip("# "))


def memory(dry_run: bool) -> None:
    for path in sorted((ROOT / "results" / "memory").glob("*/measured.json")):
        like = path.read_text()
        data = json.loads(like)
        gpu = data["meta"]["gpu"]
        print(f"\n{path.relative_to(ROOT)} ({gpu})")
        for r in data["rows"]:
            if not r.get("tokens_per_second_per_device"):
                continue
            old = r.get("mfu")
            method = r.get("method", "full")
            _, r["mfu"] = rates(r["tokens_per_second_per_device"], r["seq_len"], r["model"], method, gpu)
            if "mfu_note" in r:
                r["mfu_note"] = ("recomputed from the measured tokens/s by meta.mfu_convention; mfu_as_logged is what "
                                 "the run logged (older code: frozen base at 6N, 4-bit weights counted packed, "
                                 "non-causal attention)")
            print(f"  {Path(r['model']).name:13s} {r['config']:15s} {method:5s} g{r['num_gpus']} b{r['batch_size']}"
                  f"{' gc' if r.get('gradient_checkpointing') else '   '} {r['tokens_per_second_per_device']:9,.0f} "
                  f"tok/s  MFU {100 * (old or 0):5.1f}% -> {100 * (r['mfu'] or 0):5.1f}%")
        data["meta"]["mfu_convention"] = MFU_FORMULA
        if not dry_run:
            path.write_text(dump(path, data, like))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry_run", action="store_true", help="print old and new figures, write nothing")
    a = p.parse_args(argv)
    benchmarks(a.dry_run)
    memory(a.dry_run)


if __name__ == "__main__":
    main()
