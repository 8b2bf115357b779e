"""Throughput benchmark: ZeRO stages x GPU counts x batch sizes, beside the common-recipe baseline.

Runs train_ds.py through scripts/train.sh (random weights in a model's shape, random tokens,
fixed sequence length) and, with --baseline, scripts/baseline_hf_trainer.py (HF Trainer + the
guides' ZeRO-2 JSON) on the same data. Writes results/benchmarks/<date>_<gpu>/: results.md (the
table), results.png (the chart), results.json (one row per run) and logs/.

    uv run python scripts/benchmark.py --model configs/models/llama-3.2-1b --stages 2,3 --gpus 1 \\
        --batch_sizes 4,8,16 --baseline
    uv run python scripts/benchmark.py --gpus 1,2,4 --stages 2,3 --batch_sizes 8   # scaling
    uv run python scripts/benchmark.py --variant eager="--compile_layers false" --stages 2 --gpus 1
    uv run python scripts/benchmark.py --lengths chat --baseline --variant packed="--packing true" \
        --variant padded="--packing false"   # real lengths: effective (non-pad) tokens/s
    uv run python scripts/benchmark.py --tokens markov --max_steps 200 --variant bf16="" --variant fp8="--fp8 true" \
        --loss_reference bf16   # FP8 against bf16: loss curves on learnable tokens, losses.png

Throughput numbers are the means over logging intervals after the first (compilation, warm-up). Tokens are
real tokens (the meter counts the attention mask, or the packed position_ids), never padding.
--lengths chat draws row lengths from a long-tailed chat distribution (log-normal, median 300 tokens, sigma 1:
mean ~500, 1 in 200 rows past 4K, clipped to --seq_len); the baseline pads every row to --seq_len as the guides'
`padding="max_length"` does, ours pads each batch to its longest row or packs (--packing true).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recipe.metrics import MFU_FORMULA  # the runs' MFU convention, stated in every table


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--model", default="configs/models/llama-3.2-1b", help="folder with config.json (random weights)")
    p.add_argument("--stages", default="2",
                   help="comma list of ds_configs (0,1,2,3,2_offload,3_offload,3_nvme); none: only the baseline")
    p.add_argument("--gpus", default="1", help="comma list of GPU counts")
    p.add_argument("--batch_sizes", default="8", help="comma list of per-GPU micro-batch sizes")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--lengths", choices=["fixed", "chat"], default="fixed",
                   help="fixed: every row --seq_len tokens; chat: long-tailed real lengths (median 300)")
    p.add_argument("--tokens", choices=["random", "markov"], default="random",
                   help="random: uniform ids (speed only); markov: a fixed random chain (4 successors per token over "
                        "8192 ids, entropy ln 4), learnable, for loss curves")
    p.add_argument("--loss_reference", default=None, metavar="VARIANT",
                   help="compare every row's loss curve with this variant's at the same stage and batch: the largest "
                        "relative gap after --loss_warmup steps, and losses.png")
    p.add_argument("--loss_warmup", type=int, default=20)
    p.add_argument("--learning_rate", type=float, default=1e-5)
    p.add_argument("--max_steps", type=int, default=30)
    p.add_argument("--logging_steps", type=int, default=5)
    p.add_argument("--baseline", action="store_true", help="add the common recipe (HF Trainer + ZeRO-2 JSON)")
    p.add_argument("--baseline_batch_sizes", default="4,8,16,32,64",
                   help="comma list for the baseline rows, tried in increasing order until one runs out of GPU "
                        "memory; speed-ups are against the fastest that ran (the seed recipe at its best batch)")
    p.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                   help="extra train_ds.py flags as a named row set (repeatable); default: one set, no flags")
    p.add_argument("--out", default=None, help="default results/benchmarks/<date>_<gpu>")
    p.add_argument("--work_dir", default="/tmp/recipe-benchmark", help="data, model folder and run outputs")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                   help="no runs: combine earlier results.json files into one report in --out")
    p.add_argument("--title", default=None, help="report heading (with --merge)")
    return p.parse_args(argv)


def gpu_name() -> tuple[str, int]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", 0
    return torch.cuda.get_device_name(), torch.cuda.device_count()


CHAT_MEDIAN, CHAT_SIGMA, CHAT_MIN = 300, 1.0, 16


def chat_lengths(rows: int, seq_len: int, seed: int = 0):
    """Row lengths of a long-tailed chat distribution: log-normal, median 300 tokens, clipped to [16, seq_len]."""
    import numpy as np

    lengths = np.random.default_rng(seed).lognormal(np.log(CHAT_MEDIAN), CHAT_SIGMA, size=rows)
    return np.clip(lengths.round(), CHAT_MIN, seq_len).astype(np.int64)


def rows_for(tokens: int, batch_rows: int, seq_len: int, lengths: str) -> int:
    """Rows enough for `batch_rows` unpacked rows per step and, packed, `tokens` (steps x batch x seq_len)."""
    if lengths == "fixed":
        return batch_rows
    mean = float(chat_lengths(4096, seq_len).mean())
    return max(batch_rows, int(1.25 * tokens / mean) + 1)


MARKOV_STATES, MARKOV_SUCCESSORS = 8192, 4


def markov_rows(lengths, vocab: int, seed: int = 0) -> list:
    """Rows of a fixed random Markov chain: each of MARKOV_STATES ids (spread over the vocabulary) has
    MARKOV_SUCCESSORS equally likely successors. Learnable (the best loss is ln 4 = 1.39), unlike uniform ids."""
    import numpy as np

    rng = np.random.default_rng(seed)
    states = rng.choice(vocab, size=min(MARKOV_STATES, vocab), replace=False)
    successors = rng.integers(0, len(states), size=(len(states), MARKOV_SUCCESSORS))
    lengths = list(lengths)
    path = np.empty((len(lengths), max(lengths)), dtype=np.int64)
    path[:, 0] = rng.integers(0, len(states), size=len(lengths))
    for i in range(1, path.shape[1]):  # all rows a step at a time
        path[:, i] = successors[path[:, i - 1], rng.integers(0, MARKOV_SUCCESSORS, size=len(lengths))]
    return [states[row[:n]] for row, n in zip(path, lengths)]


def make_data(path: Path, rows: int, seq_len: int, vocab: int, lengths: str = "fixed", tokens: str = "random") -> None:
    """Token ids, fixed or chat-like lengths, uniform or a learnable chain: the benchmark needs no text."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = [seq_len] * rows if lengths == "fixed" else list(chat_lengths(rows, seq_len))
    if tokens == "markov":
        ids = markov_rows(sizes, vocab)
    elif lengths == "fixed":
        ids = list(rng.integers(0, vocab, size=(rows, seq_len), dtype=np.int64))
    else:
        ids = [rng.integers(0, vocab, size=n, dtype=np.int64) for n in sizes]
    pq.write_table(pa.table({"input_ids": ids}), path)


def loss_curve(run_dir: Path) -> list:
    """[(step, loss)] from the run's trainer_state.json (train_ds.py and the baseline both save one)."""
    for state in sorted(run_dir.rglob("trainer_state.json")):
        return [(r["step"], r["loss"]) for r in json.loads(state.read_text())["log_history"] if "loss" in r]
    return []


def add_loss_gaps(rows: list[dict], reference: str, warmup: int) -> None:
    """loss_gap_vs_reference: the largest |loss - reference loss| / reference loss over the steps both logged after
    `warmup`, against the reference variant's row at the same ZeRO stage, GPU count and batch."""
    refs = {(r["zero_stage"], r["num_gpus"], r["batch_size"]): dict(map(tuple, r.get("loss_curve") or []))
            for r in rows if r["variant"] == reference}
    for r in rows:
        ref = refs.get((r["zero_stage"], r["num_gpus"], r["batch_size"]))
        gaps = [abs(loss - ref[step]) / abs(ref[step]) for step, loss in r.get("loss_curve") or []
                if ref and step > warmup and step in ref]
        r["loss_gap_vs_reference"] = max(gaps) if gaps and r["variant"] != reference else None


def write_loss_chart(rows: list[dict], path: Path, title: str) -> bool:
    """Loss curves side by side: one panel per model, ZeRO stage and batch (the rows a loss gap compares)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for r in rows:
        if r.get("loss_curve"):
            groups.setdefault((r.get("model"), r["zero_stage"], r["batch_size"]), []).append(r)
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, ((model, stage, batch), curves) in zip(axes[0], groups.items()):
        for r in curves:
            steps, losses = zip(*r["loss_curve"])
            gap = r.get("loss_gap_vs_reference")
            ax.plot(steps, losses, label=r["name"] + (f" (max gap {100 * gap:.2f}%)" if gap is not None else ""))
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.set_title(f"{model or ''} ZeRO-{stage}, batch {batch}", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def ours_cmd(model: Path, data: Path, stage: str, gpus: int, batch: int, a, run_dir: Path, extra: list[str]):
    return [str(ROOT / "scripts" / "train.sh"), "--num_gpus", str(gpus),
            "--model_name_or_path", str(model), "--random_init", "true", "--tokenizer_name_or_path", "tiny",
            "--dataset_name", str(data), "--eval_split_ratio", "0", "--eval_strategy", "no",
            *([] if "--deepspeed" in extra else ["--zero_stage", stage]), "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", "1",
            "--max_length", str(a.seq_len), "--max_steps", str(a.max_steps), "--logging_steps", str(a.logging_steps),
            "--learning_rate", str(a.learning_rate), "--save_strategy", "no", "--save_final_model", "false",
            "--heldout_eval", "false", "--report_to", "none", "--seed", "0",
            "--results_dir", str(run_dir.parent), "--run_name", run_dir.name, *extra]


def baseline_cmd(model: Path, data: Path, gpus: int, batch: int, a, run_dir: Path):
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner"]
    return [*launcher, f"--num_gpus={gpus}", f"--master_port={29600 + gpus}",
            str(ROOT / "scripts" / "baseline_hf_trainer.py"), "--model", str(model), "--data", str(data),
            "--batch_size", str(batch), "--max_steps", str(a.max_steps), "--logging_steps", str(a.logging_steps),
            "--max_length", str(a.seq_len), "--run_dir", str(run_dir)]


def run_one(name: str, cmd: list[str], run_dir: Path, log_dir: Path, timeout: int) -> tuple[dict | None, str]:
    log = log_dir / f"{name}.log"
    print(f"+ {shlex.join(cmd)}", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    with log.open("w") as f:  # its own process group: a timeout ends the launcher and its ranks (and frees the port)
        job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = job.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
            if (run_dir / "summary.json").exists():  # it trained and reported; the limit fell in its shutdown
                summary = json.loads((run_dir / "summary.json").read_text())
                return summary, f"ok (its summary written, then the {timeout}s limit)"
            return None, f"timeout after {timeout}s"
    summary = run_dir / "summary.json"
    if rc == 0 and summary.exists():
        return json.loads(summary.read_text()), "ok"
    text = log.read_text(errors="replace")
    if "out of memory" in text.lower():
        return None, "out of GPU memory"
    errors = [line for line in text.splitlines() if re.search(r"Error|error:", line)]
    return None, f"exit {rc}: {errors[-1][:200] if errors else 'see log'}"


def accumulation_of(words: list[str]) -> int:
    """The gradient accumulation a command line asks for: its last --gradient_accumulation_steps (as argparse
    takes it, `--gradient_accumulation_steps N` or `=N`), 1 without."""
    value = 1
    for i, word in enumerate(words):
        if word == "--gradient_accumulation_steps" and i + 1 < len(words):
            value = int(words[i + 1])
        elif word.startswith("--gradient_accumulation_steps="):
            value = int(word.split("=", 1)[1])
    return value


def max_accumulation(variants: list[list[str]]) -> int:
    """The largest accumulation among the variants' flags: each optimizer step reads that many micro-batches, so the
    data must hold max_steps x batch x accumulation rows (with fewer, the Trainer ends each epoch early and an
    optimizer step sees fewer tokens than asked)."""
    return max(accumulation_of(shlex.split(flags)) for _, flags in variants)


def model_of(cmd: list[str]) -> str | None:
    """The model folder a row's command trains (ours: --model_name_or_path, the baseline: --model)."""
    for flag in ("--model_name_or_path", "--model"):
        if flag in cmd and cmd.index(flag) + 1 < len(cmd):
            return Path(cmd[cmd.index(flag) + 1]).name
    return None


def row_from(name, variant, summary, status, gpu, gpus, stage, batch, seq_len, cmd, lengths="fixed") -> dict:
    s = summary or {}
    tps = s.get("tokens_per_second_per_device")
    return {
        "name": name, "variant": variant, "model": model_of(cmd), "gpu": gpu, "num_gpus": gpus, "zero_stage": stage,
        "batch_size": batch,
        "seq_len": seq_len, "lengths": lengths,
        "tokens_per_second_per_gpu": tps, "tflops_per_gpu": s.get("tflops_per_device"), "mfu": s.get("mfu"),
        "mfu_convention": MFU_FORMULA,
        "peak_memory_gib": s.get("peak_memory_gib"), "host_peak_rss_gib": s.get("cpu_peak_rss_gib"),
        "disk_written_gib": s.get("disk_written_gib"),
        "step_time_s": batch * accumulation_of(cmd) * seq_len / tps if tps and lengths == "fixed" else None,
        "loss": s.get("train_loss"), "status": status,
        "options": {k: s.get(k) for k in ("fused_loss", "compile_layers", "liger_kernels", "varlen_attention",
                                          "zero3_leaf_layers", "tiled_mlp", "fp8", "packing",
                                          "gradient_checkpointing", "activation_offloading",
                                          "sequence_parallel_size", "rope_scaling") if k in s},
        "command": shlex.join(cmd),
    }


def add_ratios(rows: list[dict]) -> None:
    """Scaling (per-GPU tokens/s over the same row set on 1 GPU) and speed-up over the baseline at its best batch
    (the fastest baseline row of the same model per GPU count: the recipe a user would tune to their GPU, not the
    guides' batch 4)."""
    for r in rows:  # rows of an older results.json: the model from the command
        r.setdefault("model", model_of(shlex.split(r.get("command", ""))))
    one = {(r["model"], r["variant"], r["zero_stage"], r["batch_size"]): r["tokens_per_second_per_gpu"]
           for r in rows if r["num_gpus"] == 1 and r["tokens_per_second_per_gpu"]}
    base = {}  # the fastest baseline row per model and GPU count
    for r in rows:
        if r["variant"] == "baseline" and r["tokens_per_second_per_gpu"]:
            key = (r["model"], r["num_gpus"])
            base[key] = max(base.get(key, 0.0), r["tokens_per_second_per_gpu"])
    for r in rows:
        tps = r["tokens_per_second_per_gpu"]
        ref = one.get((r["model"], r["variant"], r["zero_stage"], r["batch_size"]))
        r["scaling_vs_1gpu"] = tps / ref if tps and ref and r["num_gpus"] > 1 else None
        b = base.get((r["model"], r["num_gpus"]))
        r["speedup_vs_baseline"] = tps / b if tps and b else None


def fmt(v, spec):
    return "" if v is None else format(v, spec)


def write_table(rows: list[dict], path: Path, header: str) -> None:
    lines = [header, "", f"{MFU_FORMULA}.", "",
             "| run | GPUs | ZeRO | batch/GPU | seq | step (s) | tokens/s/GPU | TFLOP/s/GPU | MFU | peak mem (GiB) "
             "| host peak RSS (GiB) | loss | vs best baseline | scaling vs 1 GPU | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['num_gpus']} | {r['zero_stage']} | {r['batch_size']} | {r['seq_len']} "
            f"| {fmt(r['step_time_s'], '.3f')} | {fmt(r['tokens_per_second_per_gpu'], ',.0f')} "
            f"| {fmt(r['tflops_per_gpu'], '.0f')} | {fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} "
            f"| {fmt(r['peak_memory_gib'], '.1f')} | {fmt(r.get('host_peak_rss_gib'), '.1f')} | {fmt(r['loss'], '.3f')} "
            f"| {fmt(r['speedup_vs_baseline'], '.2f')}{'x' if r['speedup_vs_baseline'] else ''} "
            f"| {fmt(r['scaling_vs_1gpu'] and 100 * r['scaling_vs_1gpu'], '.1f')}{'%' if r['scaling_vs_1gpu'] else ''} "
            f"| {r['status']} |")
    path.write_text("\n".join(lines) + "\n")


def write_chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["tokens_per_second_per_gpu"]]
    if not done:
        return
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(done) + 2), 4.5))
    colors = ["tab:gray" if r["variant"] == "baseline" else "tab:blue" for r in done]
    bars = ax.bar(range(len(done)), [r["tokens_per_second_per_gpu"] / 1e3 for r in done], color=colors)
    for bar, r in zip(bars, done):
        if r["mfu"]:
            ax.annotate(f"{100 * r['mfu']:.0f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(done)), [r["name"] for r in done], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("thousand tokens/s per GPU (label: MFU, causal)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge(a) -> list[dict]:
    """One report from several runs of this script (say, one per machine size), ratios recomputed."""
    from recipe.report import write_json

    rows = [r for path in a.merge for r in json.loads(Path(path).read_text())]
    stale = [r["name"] for r in rows if r.get("mfu") and r.get("mfu_convention") != MFU_FORMULA]
    if stale:
        print(f"warning: MFU of {', '.join(stale)} was counted by another convention than the table states: "
              "run scripts/recompute_mfu.py on their results.json first.", file=sys.stderr)
    add_ratios(rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", rows)
    header = a.title or f"# Benchmark: {', '.join(sorted({r['gpu'] for r in rows}))}"
    write_table(rows, out / "results.md", header)
    write_chart(rows, out / "results.png", header.lstrip("# ").splitlines()[0])
    write_loss_chart(rows, out / "losses.png", header.lstrip("# ").splitlines()[0])
    return rows


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    if a.merge:
        return merge(a)
    from recipe.report import git_commit, write_json

    gpu, visible = gpu_name()
    stages = [] if a.stages == "none" else a.stages.split(",")  # none: the baseline rows only
    gpu_counts = [int(g) for g in a.gpus.split(",")]
    batches = [int(b) for b in a.batch_sizes.split(",")]
    base_batches = sorted(int(b) for b in a.baseline_batch_sizes.split(",")) if a.baseline else []
    if visible and max(gpu_counts) > visible:
        sys.exit(f"error: --gpus asks for {max(gpu_counts)} GPUs but {visible} are visible.")
    variants = [v.split("=", 1) for v in a.variant] or [["ours", ""]]
    date = dt.date.today().isoformat()
    out = Path(a.out or ROOT / "results" / "benchmarks" / f"{date}_{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-')}")
    work = Path(a.work_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    model = (ROOT / a.model).resolve() if not Path(a.model).is_absolute() else Path(a.model)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    batch_rows = a.max_steps * max(batches + base_batches) * max(gpu_counts) * max_accumulation(variants)
    rows_needed = rows_for(batch_rows * a.seq_len, batch_rows, a.seq_len, a.lengths)
    data = work / f"{a.tokens}_{a.lengths}_{a.seq_len}_{vocab}_{rows_needed}.parquet"
    make_data(data, rows_needed, a.seq_len, vocab, a.lengths, a.tokens)

    rows = []
    plan = [("baseline", None, g, b, []) for g in gpu_counts for b in base_batches]
    plan += [(name, s, g, b, shlex.split(flags)) for name, flags in variants
             for s in stages for g in gpu_counts for b in batches]
    baseline_oom = set()  # GPU counts whose baseline ran out of memory: larger batches would too
    for name, stage, gpus, batch, extra in plan:
        if stage is None and gpus in baseline_oom:
            continue
        run_name = f"{name}_z{stage or 2}_g{gpus}_b{batch}"
        run_dir = work / "runs" / run_name
        cmd = (baseline_cmd(model, data, gpus, batch, a, run_dir) if stage is None
               else ours_cmd(model, data, stage, gpus, batch, a, run_dir, extra))
        summary, status = run_one(run_name, cmd, run_dir, out / "logs", a.timeout)
        if stage is None and status == "out of GPU memory":
            baseline_oom.add(gpus)
        row = row_from(run_name, name, summary, status, gpu, gpus, stage or "2", batch, a.seq_len, cmd, a.lengths)
        row["loss_curve"] = loss_curve(run_dir) if summary else []
        rows.append(row)
        print(f"  {run_name}: {status}, {fmt(row['tokens_per_second_per_gpu'], ',.0f')} tokens/s/GPU, "
              f"MFU {fmt(row['mfu'], '.3f')}, peak {fmt(row['peak_memory_gib'], '.1f')} GiB", flush=True)
    add_ratios(rows)
    if a.loss_reference:
        add_loss_gaps(rows, a.loss_reference, a.loss_warmup)
    commit = git_commit()
    shape = (f"seq {a.seq_len}" if a.lengths == "fixed" else f"chat lengths (median {CHAT_MEDIAN}, up to {a.seq_len}; "
             "tokens/s counts real tokens, not padding)")
    header = (f"# Benchmark {date}: {gpu}\n\nmodel shape `{a.model}` (random weights), {a.tokens} tokens, {shape}, "
              f"{a.max_steps} steps (means over logging intervals after the first), commit `{commit}`.\n\n"
              f"Command: `python scripts/benchmark.py {shlex.join(sys.argv[1:] if argv is None else argv)}`")
    write_json(out / "results.json", rows)
    write_table(rows, out / "results.md", header)
    write_chart(rows, out / "results.png", f"{gpu}, {Path(a.model).name}, seq {a.seq_len}, {date}")
    if a.loss_reference:
        gaps = [f"- {r['name']}: largest loss gap against {a.loss_reference} after step {a.loss_warmup}: "
                f"{fmt(r['loss_gap_vs_reference'] and 100 * r['loss_gap_vs_reference'], '.2f')}%"
                for r in rows if r["variant"] != a.loss_reference]
        with (out / "results.md").open("a") as f:
            f.write("\n" + "\n".join(gaps) + "\n")
        write_loss_chart(rows, out / "losses.png", f"{gpu}, {Path(a.model).name}, {a.tokens} tokens, {date}")
    print((out / "results.md").read_text())
    return rows


if __name__ == "__main__":
    main()
