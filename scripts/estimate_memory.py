"""Estimate per-GPU and per-node memory for every shipped DeepSpeed config, and recommend one.

For a model (hub id, local folder, config.json, or 'tiny') and hardware (detected, or given), prints
a table (model states from DeepSpeed's estimators, activations, loss head, buffers, the two phase
peaks, CPU per node, checkpoint size) and the fastest config that fits with its micro-batch.

    uv run python scripts/estimate_memory.py --model configs/models/llama-3.1-8b --gpus 8 --gpu_memory_gib 80
    uv run python scripts/estimate_memory.py --model meta-llama/Llama-3.2-3B --method qlora --json est.json
    uv run python scripts/estimate_memory.py --compare results/memory/*/measured.json      # estimate vs measured
    uv run python scripts/estimate_memory.py --requirements HARDWARE_REQUIREMENTS.md \\
        --measured results/memory/*/measured.json                                        # regenerate the file
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recipe import estimate as E  # noqa: E402

# HARDWARE_REQUIREMENTS.md: the shapes, GPU counts and GPU sizes it covers
SHAPES = ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b"]
GPU_COUNTS = [1, 2, 4, 8]
GPU_SIZES = {"24 GB": 23.6, "40 GB": 39.4, "80 GB": 79.2, "141 GB": 139.8}  # GiB as the cards report it
NODE_CPU_GIB = 1024  # assumed CPU memory of a GPU server, for the recommendation table
# Host RAM of the machines most users rent (1-4 GPUs): GiB a run can use on a host sold with that much (the issue's
# 128 GB single-H200 host had 125 GiB), for the host-limited recommendation tables
HOST_SIZES = {"64 GB": 62.0, "128 GB": 125.0, "256 GB": 250.0}
HOST_GPU_COUNTS = [1, 2, 4]
METHODS = ["full", "lora", "qlora"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--model", help="hub id, local model folder, config.json, or 'tiny' (the embedded default)")
    p.add_argument("--gpus", type=int, help="GPUs per node (default: this machine's)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu_memory_gib", type=float, help="per GPU (default: this machine's)")
    p.add_argument("--cpu_memory_gib", type=float,
                   help="host memory a run can use per node (default: this machine's MemAvailable, or its cgroup "
                   "limit when tighter; not MemTotal)")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--micro_batch", type=int, default=1, help="per-GPU micro-batch for the table")
    p.add_argument("--max_batch", type=int, default=16, help="largest micro-batch the recommendation tries")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--method", choices=METHODS, default="full")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--configs", help="comma list of ds_configs names (default: all shipped)")
    p.add_argument("--json", help="also write the estimates and the recommendation here")
    p.add_argument("--compare", nargs="+", metavar="MEASURED_JSON", help="estimates beside measured peaks")
    p.add_argument("--requirements", metavar="OUT_MD", help="write HARDWARE_REQUIREMENTS.md")
    p.add_argument("--measured", nargs="*", default=[], help="measured.json files for --requirements")
    return p.parse_args(argv)


def hardware(a) -> E.Hardware:
    detected = E.detect_hardware(a.gpus, a.nodes)
    gpus = a.gpus or (detected.gpus_per_node if detected else None)
    memory = a.gpu_memory_gib or (detected.gpu_memory_gib if detected else None)
    if not gpus or not memory:
        sys.exit("error: no CUDA GPU here: pass --gpus N and --gpu_memory_gib G (say --gpus 8 --gpu_memory_gib 80).")
    cpu = a.cpu_memory_gib  # unchecked when unknown; this machine's when its GPUs are the ones estimated for
    if cpu is None and detected and not a.gpu_memory_gib:
        cpu = detected.cpu_memory_gib  # what this node can give now (recipe.estimate.read_host_memory)
    name = detected.gpu_name if detected and not a.gpu_memory_gib else ""
    return E.Hardware(gpus, memory, a.nodes, cpu, name)


def measured_rows(paths: list[str]) -> list[dict]:
    """Rows of measured.json files, each with the estimate for the same run and the error."""
    configs = E.shipped_configs()
    out = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        meta = data["meta"]
        for r in data["rows"]:
            if r.get("status") != "ok":
                continue
            shape = E.load_shape(str(ROOT / r["model"]) if not Path(r["model"]).is_absolute() else r["model"])
            hw = E.Hardware(r["num_gpus"], meta["gpu_memory_gib"], gpu_name=meta["gpu"])
            work = E.Workload(seq_len=r["seq_len"], micro_batch=r["batch_size"],
                              gradient_checkpointing=r["gradient_checkpointing"], method=r.get("method", "full"))
            est = E.estimate(shape, configs[r["config"]], hw, work, r["config"])
            method = r.get("method", "full")
            out.append({**r, "model": Path(r["model"]).name + ("" if method == "full" else f" {method}"),
                        "gpu": meta["gpu"], "date": meta["date"],
                        "estimate_gib": est["gpu_peak"] / E.GiB, "cpu_estimate_gib": est["cpu_per_node"] / E.GiB,
                        "error": est["gpu_peak"] / E.GiB / r["peak_memory_gib"] - 1})
    return out


def compare_table(rows: list[dict]) -> str:
    def host_measured(r):  # rank 0's peak RSS; where the run wrote none, the host memory in use (MemAvailable)
        if r.get("cpu_peak_rss_gib") is not None:
            return f"{r['cpu_peak_rss_gib']:.0f}"
        used = r.get("host_in_use_gib_from_memavailable")
        return f"<= {used:.0f} (host in use)" if used is not None else "—"

    lines = ["| model | config | GPUs | micro-batch | ckpt | estimated GiB | measured GiB (allocated) | error "
             "| measured reserved | CPU est. / measured rank 0 (GiB) | tokens/s/GPU | GPU, date |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['config']} | {r['num_gpus']} | {r['batch_size']} "
                     f"| {'yes' if r['gradient_checkpointing'] else 'no'} | {r['estimate_gib']:.1f} "
                     f"| {r['peak_memory_gib']:.1f} | {100 * r['error']:+.1f}% | {r['peak_reserved_gib']:.1f} "
                     f"| {r['cpu_estimate_gib']:.0f} / {host_measured(r)} "
                     f"| {r['tokens_per_second_per_device']:,.0f} | {r['gpu']}, {r['date']} |")
    worst = max((abs(r["error"]) for r in rows), default=0)
    lines.append("")
    lines.append(f"{len(rows)} runs; largest difference {100 * worst:.1f}%.")
    return "\n".join(lines)


def requirements(a) -> str:
    """HARDWARE_REQUIREMENTS.md, generated."""
    configs = E.shipped_configs()
    measured = measured_rows(a.measured)
    seen = {(r["model"].split()[0], r["config"], r["num_gpus"], r.get("method", "full")) for r in measured}
    cmd = "python scripts/estimate_memory.py --requirements HARDWARE_REQUIREMENTS.md --measured " + " ".join(
        str(Path(p).resolve().relative_to(ROOT)) if Path(p).resolve().is_relative_to(ROOT) else p for p in a.measured)
    out = ["# Hardware requirements", "",
           f"Generated by `{cmd}` (edit the estimator, not this file). **Every number is an estimate** from "
           "`recipe/estimate.py` unless it is in a *measured* table (GPU and date given); a ✓ in a cell means that "
           "shape x config x GPU count was also measured (at a larger micro-batch, see the measured table).", "",
           f"Assumed: seq {a.seq_len}, micro-batch 1 per GPU, bf16 with fp32 master weights and AdamW (stage2_offload_bf16: "
           "bf16 master weights, gradients and Adam moments, 8 bytes per parameter on the host instead of 16), no gradient "
           "checkpointing, the recipe's GPU defaults (Liger fused loss or TRL's chunked head, compiled layers or "
           f"Liger kernels), LoRA rank {a.lora_r} on every linear, QLoRA nf4 with double quantisation. GPU figures "
           "are peak allocated GiB per GPU (what `torch.cuda.max_memory_allocated` reports); a GPU fits a config when "
           f"the estimate is below {E.USABLE_FRACTION:.0%} of its memory less {E.CONTEXT_GIB:.0f} GiB. CPU is GiB "
           "of host memory per node (DeepSpeed's estimator for the offloaded model states; for stage3_nvme "
           "DeepSpeed's pinned swap buffers as its code allocates them; for stage3_partial_offload the CPU share of "
           "the states plus a 16-bit copy of the weights; plus ~3 GiB per process) and a node fits when it is below "
           f"{E.HOST_USABLE_FRACTION:.0%} of what the node can give; checkpoint is GiB on "
           "disk per saved checkpoint (16-bit weights + fp32 master and Adam moments of what is trained); "
           "stage3_nvme also needs about the stage3_offload CPU figure as free space on the NVMe disk.", "",
           "Estimate your own case: `uv run python scripts/estimate_memory.py --model <id or folder> --gpus N "
           "--gpu_memory_gib G [--method lora] [--seq_len S]`, or `train_ds.py ... --dry_run` for the run as "
           "configured, or `--zero_stage auto` to let the run pick. Throughput (tokens/s, MFU) is measured in "
           "`results/benchmarks/`; the tokens/s below come from 4-step runs sharing a host, indicative only.", ""]
    if measured:
        out += ["## Estimate vs measured", "",
                "Short runs (4 steps, random weights, random tokens, seq 2048) of `scripts/measure_memory.py`; "
                "peak allocated GPU memory of rank 0 against the estimate for the same run. CPU: the estimate is per "
                "node, the measurement rank 0's peak RSS with random weights made on the GPU (nothing loaded from "
                "disk), so only the one-GPU offload rows compare like with like.", "",
                compare_table(measured), ""]
    shapes = {s: E.load_shape(str(ROOT / "configs" / "models" / s)) for s in SHAPES}
    out += ["## Recommended config per GPU", "",
            f"The fastest shipped config that fits, with the largest micro-batch up to {a.max_batch} (seq "
            f"{a.seq_len}); '+ckpt': with gradient checkpointing; 'r0.3': stage3_partial_offload's "
            "offload_optimizer.ratio, the share of the optimizer states on the CPU (the largest share the GPU can "
            "hold); host memory assumed "
            f"{NODE_CPU_GIB} GiB per node, as on GPU servers (the tables below: the hosts most rented machines "
            "have). '—': nothing fits.", ""]
    out += recommendation_table(shapes, configs, GPU_COUNTS, NODE_CPU_GIB, a)
    out += ["", "### Host RAM per node as the limit", "",
            f"The same choice on {', '.join(HOST_SIZES)} hosts with {', '.join(map(str, HOST_GPU_COUNTS))} GPUs: "
            "host memory is the limit that one-GPU machines with CPU offload hit first (an 8B full fine-tune with "
            "stage2_offload needs about 142 GiB per node, stage3_offload 173 GiB). A host fits a config when its "
            f"estimate is below {E.HOST_USABLE_FRACTION:.0%} of the host memory a run can use (GiB in each heading: "
            "the machine's MemAvailable at start, or its cgroup limit, is what `train_ds.py` compares and stops on "
            "before any weights load).", ""]
    for host, gib in HOST_SIZES.items():
        out += [f"#### {host} host ({gib:.0f} GiB usable)", ""]
        out += recommendation_table(shapes, configs, HOST_GPU_COUNTS, gib, a)
        out += [""]
    out.pop()
    for s, shape in shapes.items():
        out += ["", f"## {s} ({shape.n_params / 1e9:.2f}B parameters)", "",
                "GPU GiB per GPU / CPU GiB per node, micro-batch 1 (stage3_partial_offload at the ratio an 80 GB GPU "
                "allows; stage3_nvme's host memory from DeepSpeed's own pinned buffers, not measured).", "",
                "| method | GPUs | " + " | ".join(configs) + " | checkpoint GiB |",
                "|---|---|" + "---|" * (len(configs) + 1)]
        for method in METHODS:
            for g in GPU_COUNTS:
                hw = E.Hardware(g, 80.0)
                work = E.Workload(seq_len=a.seq_len, method=method, lora_rank=a.lora_r)
                ests = [E.estimate(shape, c, hw, work, n) for n, c in configs.items()]
                cells = [f"{e['gpu_peak'] / E.GiB:.1f} / {e['cpu_per_node'] / E.GiB:.0f}"
                         + (" ✓" if (s, e["config"], g, method) in seen else "") for e in ests]
                out.append(f"| {method} | {g} | " + " | ".join(cells) + f" | {ests[0]['checkpoint_disk'] / E.GiB:.0f} |")
    return "\n".join(out) + "\n"


def recommendation_table(shapes: dict, configs: dict, gpu_counts: list[int], host_gib: float, a) -> list[str]:
    """Rows model x method x GPUs per node, a cell per GPU size: the recommendation with this much host memory."""
    lines = ["| model | method | GPUs | " + " | ".join(GPU_SIZES) + " |", "|---|---|---|" + "---|" * len(GPU_SIZES)]
    for s, shape in shapes.items():
        for method in METHODS:
            for g in gpu_counts:
                cells = []
                for gib in GPU_SIZES.values():
                    rec = E.recommend(shape, configs, E.Hardware(g, gib, 1, host_gib),
                                      E.Workload(seq_len=a.seq_len, method=method, lora_rank=a.lora_r),
                                      max_batch=a.max_batch)
                    cells.append("—" if rec.config is None else cell(rec))
                lines.append(f"| {s} | {method} | {g} | " + " | ".join(cells) + " |")
    return lines


def cell(rec: E.Recommendation) -> str:
    ratio = rec.candidates[0]["offload_ratio"]
    return (f"{rec.config} b{rec.micro_batch}{' +ckpt' if rec.gradient_checkpointing else ''}"
            + (f" r{ratio:g}" if ratio is not None else ""))


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.compare:
        print(compare_table(measured_rows(a.compare)))
        return 0
    if a.requirements:
        Path(a.requirements).write_text(requirements(a))
        print(f"wrote {a.requirements}")
        return 0
    if not a.model:
        sys.exit("error: --model is required (a hub id, a local folder, a config.json, or 'tiny').")
    shape = E.load_shape(None if a.model == "tiny" else a.model)
    hw = hardware(a)
    work = E.Workload(seq_len=a.seq_len, micro_batch=a.micro_batch, gradient_checkpointing=a.gradient_checkpointing,
                      method=a.method, lora_rank=a.lora_r)
    configs = E.shipped_configs(a.configs.split(",") if a.configs else None)
    rows, rec = E.plan(shape, hw, work, configs, max_batch=a.max_batch)
    print(E.report(shape, hw, work, rows, rec))
    if a.json:
        Path(a.json).write_text(json.dumps(E.to_json(shape, hw, work, rows, rec), indent=2) + "\n")
    return 0 if rec.config else 1


if __name__ == "__main__":
    sys.exit(main())
