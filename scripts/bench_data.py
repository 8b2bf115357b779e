"""Data preparation at scale: wall time and peak host RSS per rank for a generated JSON Lines file.

    uv run python scripts/bench_data.py --gib 1 --procs 1,2 --out results/benchmarks/<date>_data-prep/
    uv run python scripts/bench_data.py --gib 1 --procs 1,2 --repo /tmp/old-checkout   # the same for another commit

Generates (once, cached beside --out) multi-turn chat rows of realistic text lengths, then for each process count
starts that many ranks (RANK/WORLD_SIZE set like a launcher) that each run recipe.data.build_datasets under
main_process_first, as train_ds.py does: rank 0 validates and tokenises, the others wait and then read the cache.
Each rank reports its wall time and peak RSS (ru_maxrss); the datasets cache is emptied before each process count,
so every count pays its own tokenisation. CPU only; no model, no DeepSpeed engine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the of and to in is that for it as with was on be by this are or at from have an not which but what "
         "model data train token loss batch layer weight memory speed answer question reverse word letter").split()


def generate(path: Path, gib: float, seed: int = 0) -> None:
    """Chats of 1-4 exchanges, turn lengths long-tailed (median ~40 words, tail to ~600)."""
    rng = random.Random(seed)
    target, written = int(gib * 2**30), 0
    with open(path, "w") as f:
        while written < target:
            turns = []
            for _ in range(rng.randint(1, 4)):
                for role in ("user", "assistant"):
                    n = min(600, int(rng.lognormvariate(3.7, 0.8)))
                    turns.append({"role": role, "content": " ".join(rng.choices(WORDS, k=max(1, n)))})
            line = json.dumps({"messages": turns}) + "\n"
            f.write(line)
            written += len(line)


RANK_SCRIPT = r"""
import json, os, resource, sys, time
sys.path.insert(0, os.environ["BENCH_REPO"])
t0 = time.time()
from recipe.config import ScriptArguments
from recipe.modeling import build_tiny_tokenizer
import recipe.data as data
import torch.distributed as dist
import datetime
# the other ranks wait in a barrier while rank 0 tokenises (about 25 min for 1 GiB with the tiny character
# tokenizer on one core): longer than torch's default 30-minute collective timeout allows for larger files
dist.init_process_group("gloo", timeout=datetime.timedelta(hours=4))
args = ScriptArguments(dataset_name=os.environ["BENCH_FILE"], eval_dataset_name=None, eval_split_ratio=0.0)
tok = build_tiny_tokenizer()
rank = dist.get_rank()
if rank != 0:
    dist.barrier()  # main_process_first: rank 0 prepares, the others read its cache
start = time.time()
try:
    out = data.build_datasets(args, 0, tok)           # after: validates, tokenises and masks
    train = out.train
except TypeError:
    train = data.build_datasets(args, 0)[0]           # before: validates and formats (SFTTrainer tokenised later)
seconds = time.time() - start
if rank == 0:
    dist.barrier()
dist.barrier()
print(json.dumps({"rank": rank, "rows": len(train), "prepare_s": round(seconds, 1),
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                  "columns": train.column_names}), flush=True)
"""


def run(repo: Path, file: Path, procs: int, cache: Path) -> list[dict]:
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "BENCH_REPO": str(repo), "BENCH_FILE": str(file), "HF_DATASETS_CACHE": str(cache),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29600 + procs), "WORLD_SIZE": str(procs),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(procs)]
    rows = []
    for p in ranks:
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a rank failed (exit {p.returncode}):\n{err[-3000:]}")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=1.0, help="size of the generated JSONL file")
    p.add_argument("--procs", default="1,2", help="process counts")
    p.add_argument("--repo", default=str(ROOT), help="the checkout whose recipe/data.py to measure")
    p.add_argument("--label", default="this checkout")
    p.add_argument("--work", default="/tmp/bench_data", help="where the file and caches go")
    p.add_argument("--out", default=None, help="append rows to <out>/results.json and results.md")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    file = work / f"chats_{a.gib:g}gib.jsonl"
    if not file.exists():
        t = time.time()
        generate(file, a.gib)
        print(f"generated {file} ({file.stat().st_size / 2**30:.2f} GiB) in {time.time() - t:.0f} s", flush=True)
    results = []
    for procs in (int(x) for x in a.procs.split(",")):
        t = time.time()
        ranks = run(Path(a.repo), file, procs, work / "cache")
        results.append({"label": a.label, "procs": procs, "wall_s": round(time.time() - t, 1),
                        "file_gib": round(file.stat().st_size / 2**30, 2), "ranks": ranks})
        print(json.dumps(results[-1]), flush=True)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        old = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else []
        rows = old + results
        (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
        lines = ["| code | processes | file GiB | wall s | prepare s per rank | peak RSS GiB per rank | tokenised |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['label']} | {r['procs']} | {r['file_gib']} | {r['wall_s']} "
                         f"| {' / '.join(str(x['prepare_s']) for x in r['ranks'])} "
                         f"| {' / '.join(str(x['peak_rss_gib']) for x in r['ranks'])} "
                         f"| {'yes' if 'input_ids' in r['ranks'][0]['columns'] else 'no (SFTTrainer tokenises later)'} |")
        (out / "results.md").write_text("# Data preparation: wall time and peak host RSS per rank\n\n"
                                        "`scripts/bench_data.py` (generated multi-turn chats, tiny character "
                                        "tokenizer, CPU).\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
