"""Measure peak GPU memory (and speed) of short training runs, to check the memory estimator against.

Each job trains a model shape (random weights, random tokens of a fixed length) for a few steps with
one DeepSpeed config, micro-batch and GPU count, and records the peak allocated and reserved GPU
memory, rank 0's peak CPU memory and tokens/s. Jobs run in parallel on disjoint GPUs. Writes
<out>/measured.json (one row per job) and logs/. `scripts/estimate_memory.py --compare <measured.json>`
puts the estimates beside them.

    uv run python scripts/measure_memory.py --job configs/models/llama-3.2-1b:stage2:1:8 \\
        --job configs/models/llama-3.2-3b:stage3:2:4:gc
    # job = MODEL:CONFIG:GPUS:MICRO_BATCH[:gc][:lora|:qlora]   (gc: gradient checkpointing on)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--job", action="append", required=True, metavar="MODEL:CONFIG:GPUS:BATCH[:gc][:lora|:qlora]")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--max_steps", type=int, default=4)
    p.add_argument("--work_dir", default="/tmp/recipe-memory")
    p.add_argument("--out", default=None, help="default results/memory/<date>_<gpu>")
    p.add_argument("--extra", default="", help="more train_ds.py flags for every job")
    return p.parse_args(argv)


METHOD_FLAGS = {"full": [], "lora": ["--use_peft", "true"], "qlora": ["--use_peft", "true", "--load_in_4bit", "true"]}


def parse_job(spec: str) -> dict:
    parts = spec.split(":")
    options = set(parts[4:])
    if len(parts) < 4 or not options <= {"gc", *METHOD_FLAGS} or len(options & set(METHOD_FLAGS)) > 1:
        raise SystemExit(f"error: --job {spec}: expected MODEL:CONFIG:GPUS:BATCH[:gc][:lora|:qlora], e.g. "
                         "configs/models/llama-3.2-1b:stage2:1:8")
    return {"model": parts[0], "config": parts[1].removesuffix(".json"), "num_gpus": int(parts[2]),
            "batch_size": int(parts[3]), "gradient_checkpointing": "gc" in options,
            "method": next(iter(options & set(METHOD_FLAGS)), "full")}


def run_job(a, job: dict, gpu_ids: list[int], port: int, data: Path, logs: Path) -> dict:
    name = (f"{Path(job['model']).name}_{job['config']}_g{job['num_gpus']}_b{job['batch_size']}"
            + ("_gc" if job["gradient_checkpointing"] else "") + ("" if job["method"] == "full" else f"_{job['method']}"))
    results = Path(a.work_dir) / "runs"
    cmd = [str(ROOT / "scripts" / "train.sh"), "--gpus", ",".join(map(str, gpu_ids)), "--master_port", str(port),
           "--model_name_or_path", job["model"], "--random_init", "true", "--tokenizer_name_or_path", "tiny",
           "--dataset_name", str(data), "--eval_split_ratio", "0", "--eval_strategy", "no",
           "--deepspeed", f"ds_configs/{job['config']}.json", "--nvme_path", str(Path(a.work_dir) / "nvme"),
           "--per_device_train_batch_size", str(job["batch_size"]), "--gradient_accumulation_steps", "1",
           "--gradient_checkpointing", str(job["gradient_checkpointing"]).lower(),
           "--max_length", str(a.seq_len), "--max_steps", str(a.max_steps), "--logging_steps", "1",
           "--learning_rate", "1e-5", "--save_strategy", "no", "--save_final_model", "false",
           "--heldout_eval", "false", "--report_to", "none", "--seed", "0",
           "--results_dir", str(results), "--run_name", name, *METHOD_FLAGS[job["method"]], *a.extra.split()]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    row = {**job, "seq_len": a.seq_len, "status": "failed"}
    t0 = time.time()
    with (logs / f"{name}.log").open("w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    text = (logs / f"{name}.log").read_text(errors="replace")
    summary_path = results / name / "summary.json"
    if rc != 0 or not summary_path.exists():
        row["status"] = "out of GPU memory" if "out of memory" in text.lower() else f"exit {rc}"
        return row
    s = json.loads(summary_path.read_text())
    row.update({k: s.get(k) for k in ("peak_memory_gib", "peak_reserved_gib", "cpu_peak_rss_gib",
                                      "tokens_per_second_per_device", "mfu", "fused_loss", "compile_layers",
                                      "liger_kernels", "precision")},
               status="ok", seconds=round(time.time() - t0))
    with (logs.parent / "rows.jsonl").open("a") as f:  # kept even if a later job hangs
        f.write(json.dumps(row) + "\n")
    return row


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    import torch

    from benchmark import make_data
    from check_ds_configs import schedule
    from recipe.report import git_commit, write_json

    if not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU visible; this script measures GPU memory.")
    jobs = [parse_job(s) for s in a.job]
    total = torch.cuda.device_count()
    too_wide = [j for j in jobs if j["num_gpus"] > total]
    if too_wide:
        sys.exit(f"error: {len(too_wide)} job(s) need more than the {total} visible GPUs.")
    gpu = torch.cuda.get_device_name()
    out = Path(a.out or ROOT / "results" / "memory"
               / f"{dt.date.today().isoformat()}_{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-')}")
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (Path(a.work_dir) / "nvme").mkdir(parents=True, exist_ok=True)
    vocab = max(json.loads((ROOT / j["model"] / "config.json").read_text())["vocab_size"] for j in jobs)
    rows_needed = a.max_steps * max(j["batch_size"] * j["num_gpus"] for j in jobs)
    data = Path(a.work_dir) / f"tokens_{a.seq_len}_{vocab}_{rows_needed}.parquet"
    make_data(data, rows_needed, a.seq_len, vocab)
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i]["num_gpus"])  # widest first packs the GPUs best
    done = schedule([jobs[i] for i in order], total,
                    lambda job, ids, port: run_job(a, job, ids, port, data, logs), gpus_of=lambda j: j["num_gpus"])
    rows = [None] * len(jobs)
    for i, row in zip(order, done):
        rows[i] = row
    meta = {"gpu": gpu, "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
            "date": dt.date.today().isoformat(), "commit": git_commit(), "max_steps": a.max_steps,
            "command": "python scripts/measure_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    write_json(out / "measured.json", {"meta": meta, "rows": rows})
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "scripts"))
    main()
