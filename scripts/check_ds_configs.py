"""Every shipped DeepSpeed config, end to end on this machine's GPUs: train, save, reload, same eval loss.

For each ds_config x GPU count: scripts/train.sh trains a model shape (random weights, the shipped
data) for a few steps and saves model/; then `train_ds.py --eval_only` reloads that folder with
from_pretrained (one process, no DeepSpeed) and evaluates the same rows. The two eval losses must
agree. A config that cannot run here must stop at start with a clear message (status 'refused').
Runs go in parallel on disjoint GPUs. Writes <out>/ds_configs.md and ds_configs.json.

    uv run python scripts/check_ds_configs.py --model configs/models/llama-3.2-1b --gpus 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOLERANCE = 0.02  # relative: bf16 weights evaluated with and without DeepSpeed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--model", default="configs/models/llama-3.2-1b")
    p.add_argument("--configs", default=None, help="comma list; default: every ds_configs/*.json")
    p.add_argument("--gpus", default="1,2", help="comma list of GPU counts per run")
    p.add_argument("--max_steps", type=int, default=10)
    p.add_argument("--work_dir", default="/tmp/recipe-ds-check")
    p.add_argument("--out", default=str(ROOT / "results" / "ds_config_check"))
    p.add_argument("--extra", default="", help="more train_ds.py flags for every run")
    return p.parse_args(argv)


def train_cmd(a, stage: str, gpu_ids: list[int], port: int, results: Path, name: str) -> list[str]:
    return [str(ROOT / "scripts" / "train.sh"), "--gpus", ",".join(map(str, gpu_ids)), "--master_port", str(port),
            "--model_name_or_path", a.model, "--random_init", "true", "--tokenizer_name_or_path", "tiny",
            "--zero_stage", stage, "--nvme_path", str(Path(a.work_dir) / "nvme"),
            "--max_steps", str(a.max_steps), "--logging_steps", "1", "--learning_rate", "1e-4",
            "--per_device_train_batch_size", "8", "--global_batch_size", str(8 * len(gpu_ids)),
            "--eval_dataset_name", "data/test.jsonl", "--max_eval_samples", "64", "--eval_strategy", "no",
            "--save_strategy", "no",
            "--heldout_eval", "false", "--report_to", "none", "--results_dir", str(results), "--run_name", name,
            *a.extra.split()]


def eval_cmd(a, model_dir: Path, results: Path, name: str) -> list[str]:
    return [sys.executable, str(ROOT / "train_ds.py"), "--eval_only", "--model_name_or_path", str(model_dir),
            "--eval_dataset_name", "data/test.jsonl", "--max_eval_samples", "64", "--heldout_eval", "false",
            "--report_to", "none", "--results_dir", str(results), "--run_name", name, *a.extra.split()]


def run_job(a, stage: str, gpu_ids: list[int], port: int) -> dict:
    name = f"stage{stage}_g{len(gpu_ids)}"
    results = Path(a.work_dir) / "runs"
    log = Path(a.out) / "logs" / f"{name}.log"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpu_ids)), "PYTHONUNBUFFERED": "1",
           "TQDM_DISABLE": "1"}
    row = {"config": f"ds_configs/stage{stage}.json", "num_gpus": len(gpu_ids), "status": "failed"}
    t0 = time.time()
    with log.open("w") as f:
        env_train = {k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"}  # train.sh --gpus picks them
        rc = subprocess.run(train_cmd(a, stage, gpu_ids, port, results, name), cwd=ROOT, env=env_train,
                            stdout=f, stderr=subprocess.STDOUT).returncode
        summary_path = results / name / "summary.json"
        if rc != 0 or not summary_path.exists():
            text = log.read_text(errors="replace")
            errors = [line for line in text.splitlines() if line.startswith("error:") or line.startswith("  - ")]
            row["status"] = "refused" if rc == 2 and errors else f"failed (exit {rc})"
            row["message"] = " ".join(errors)[:400] if errors else text[-400:]
            return row
        trained = json.loads(summary_path.read_text())
        env_eval = {**env, "CUDA_VISIBLE_DEVICES": str(gpu_ids[0])}
        f.write("\n==== eval_only reload\n")
        f.flush()
        rc = subprocess.run(eval_cmd(a, results / name / "model", results, name + "_reload"), cwd=ROOT,
                            env=env_eval, stdout=f, stderr=subprocess.STDOUT).returncode
    reload_path = results / f"{name}_reload" / "summary.json"
    reloaded = json.loads(reload_path.read_text()) if rc == 0 and reload_path.exists() else {}
    first = trained.get("eval_loss")
    again = reloaded.get("eval_loss")
    row.update(steps=trained.get("global_step"), train_loss=trained.get("train_loss"), eval_loss=first,
               eval_loss_reloaded=again, peak_memory_gib=trained.get("peak_memory_gib"),
               seconds=round(time.time() - t0))
    same = first is not None and again is not None and abs(first - again) <= TOLERANCE * abs(first)
    row["status"] = "ok" if same and trained.get("global_step") == a.max_steps else "mismatch"
    return row


def schedule(jobs: list, total_gpus: int, run, gpus_of=lambda job: job[1]) -> list[dict]:
    """run(job, gpu_ids, port) for every job on disjoint GPU sets, as many at once as fit; rows in job order."""
    from concurrent.futures import ThreadPoolExecutor
    import threading

    free = list(range(total_gpus))
    cond = threading.Condition()
    ports = iter(range(29510, 29700))

    def worker(job):
        n = gpus_of(job)
        with cond:
            cond.wait_for(lambda: len(free) >= n)
            ids = [free.pop(0) for _ in range(n)]
            port = next(ports)
        try:
            print(f"start {job} on GPUs {ids}", flush=True)
            row = run(job, ids, port)
            print(f"done  {job}: {json.dumps(row)}", flush=True)
            return row
        finally:
            with cond:
                free.extend(ids)
                cond.notify_all()

    with ThreadPoolExecutor(max_workers=max(1, total_gpus)) as pool:
        return list(pool.map(worker, jobs))


def main(argv=None):
    a = parse_args(argv)
    import torch

    from recipe.ds_config import ds_config_names
    from recipe.report import git_commit, write_json

    total = torch.cuda.device_count()
    if total == 0:
        sys.exit("error: no CUDA GPU visible; this check needs GPUs.")
    (Path(a.out) / "logs").mkdir(parents=True, exist_ok=True)
    (Path(a.work_dir) / "nvme").mkdir(parents=True, exist_ok=True)
    stages = a.configs.split(",") if a.configs else [n.removeprefix("stage") for n in ds_config_names()]
    counts = [int(g) for g in a.gpus.split(",") if int(g) <= total]
    jobs = sorted(((s, n) for s in stages for n in counts), key=lambda j: -j[1])  # widest first
    rows = schedule(jobs, total, lambda job, ids, port: run_job(a, job[0], ids, port))
    gpu = torch.cuda.get_device_name()
    write_json(Path(a.out) / "ds_configs.json", rows)
    lines = [f"# Every ds_config on {gpu}: train {a.max_steps} steps, save, reload, same eval loss", "",
             f"model `{a.model}` (random weights), shipped data, commit `{git_commit()}`, "
             f"{time.strftime('%Y-%m-%d')}. Reload: `train_ds.py --eval_only` (from_pretrained, no DeepSpeed); "
             f"'ok' = eval losses within {TOLERANCE:.0%}.", "",
             "| config | GPUs | steps | train loss | eval loss | eval loss reloaded | peak GiB | s | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["config"], r["num_gpus"])):
        def f(k, spec=".4f"):
            return "" if r.get(k) is None else format(r[k], spec)
        lines.append(f"| {r['config']} | {r['num_gpus']} | {r.get('steps', '')} | {f('train_loss')} | {f('eval_loss')} "
                     f"| {f('eval_loss_reloaded')} | {f('peak_memory_gib', '.1f')} | {r.get('seconds', '')} "
                     f"| {r['status']}{': ' + r['message'] if r.get('message') else ''} |")
    (Path(a.out) / "ds_configs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["status"] in ("ok", "refused") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
