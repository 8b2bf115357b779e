"""The memory estimator's uses around a run: before any weights load (the "auto" values the model settles, NVMe
buffers, host memory), --dry_run, and the out-of-memory message after.

All read the model's config only (no weights) and the GPUs this launch has.

    before_weights(training_args, model_args)        # prepare_run, after the resume decision; ConfigError (exit 2)
    host_check(shape, config, name, hw, work, host)  # the host-memory verdict, testable with a made-up HostMemory
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

from recipe import estimate, report
from recipe.errors import ConfigError

logger = logging.getLogger(__name__)
GiB = estimate.GiB
# scripts/train.sh points this at a file; local rank 0 writes the start-up host-memory verdict there, which train.sh
# prints if the run later dies by SIGKILL (the kernel's out-of-memory killer says nothing to the run itself)
HOST_REPORT_ENV = "RECIPE_HOST_MEMORY_REPORT"


# ---------------------------------------------------------------- before any weights load


def before_weights(training_args, model_args) -> dict | None:
    """After the resume decision, before any weights load: fill the "auto" values only the model settles (NVMe
    offload_param.buffer_size, partial offload's ratio), check NVMe swap buffers against the largest parameter, and
    the host memory this run needs per node against what this node can give (--dry_run reports that itself). Every
    problem at once, as a ConfigError (exit 2); --check_host_memory false turns the host verdict into a warning.
    Returns the host check (None when the model's config cannot be read and nothing needed it)."""
    from recipe.ds_check import nvme_buffer_problems
    from recipe.ds_config import model_autos

    ds = training_args.ds
    autos = model_autos(ds.config) if ds is not None else []
    try:
        shape = estimate.load_shape(model_args.model_name_or_path, model_args.model_revision,
                                    training_args.trust_remote_code)
    except Exception as e:  # no config.json (a LoRA adapter folder), an offline hub id, a shape it cannot read
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if autos:
            raise ConfigError([f"{ds.name} leaves {', '.join(autos)} \"auto\", which this recipe fills from the "
                               f"model's config, and {model_args.model_name_or_path} has none it can read ({first}): "
                               "point --model_name_or_path at a folder with config.json, or set the values in the "
                               "file."]) from None
        logger.info("host memory not checked: cannot read a model config from %s (%s)", model_args.model_name_or_path,
                    first)
        return None
    problems = []
    settle_tiled_mlp(training_args, model_args, shape)
    if ds is not None:
        fill_autos(training_args, model_args, shape)
        problems += nvme_buffer_problems(training_args.ds.config, ds.name, shape.largest_param,
                                         training_args.world_size, shape.largest_param_name, shape.n_params)
    check = None
    if not training_args.dry_run:
        check = run_host_check(training_args, model_args, shape)
        problems += enforced(check, training_args)
    if problems:
        raise ConfigError(problems)
    return check


def settle_tiled_mlp(training_args, model_args, shape: estimate.ModelShape,
                     hw: estimate.Hardware | None = None) -> bool | None:
    """--tiled_mlp auto, on by length (TILED_MLP_AUTO_LENGTH), stays on only where the run does not fit the GPU
    without it by the estimate: untiled, the layers compile, which is faster (1B shape on one H200, 32K tokens:
    30.7k tokens/s untiled, 27.5k tiled). Updates training_args.speed; returns the choice (None: nothing to
    settle, no GPU to fit, or another flag than auto)."""
    if training_args.tiled_mlp != "auto" or not training_args.speed.get("tiled_mlp") or training_args.ds is None:
        return None
    hw = hw or estimate.run_hardware()
    if hw is None:
        return None
    untiled = replace(estimate.run_workload(training_args, model_args), tiled_mlp=False)
    gpu = estimate.estimate(shape, training_args.ds.config, hw, untiled, training_args.ds.stem)["gpu_peak"] / GiB
    if gpu > hw.usable_gib:
        why = f"needs {gpu:.1f} GiB per GPU untiled, above the {hw.usable_gib:.0f} usable"
        keep = True
    else:
        training_args.speed, _ = training_args.speed_choices(tiled_mlp=False)
        why = f"fits untiled ({gpu:.1f} of {hw.usable_gib:.0f} usable GiB per GPU), where the layers compile"
        keep = False
    if getattr(training_args, "process_index", 0) == 0:
        logger.info("--tiled_mlp auto: %s at %d tokens: the run %s, by the estimate.", "on" if keep else "off",
                    training_args.max_length, why)
    return keep


def fill_autos(training_args, model_args, shape: estimate.ModelShape) -> list[str]:
    """fill_model_autos on the config this run hands DeepSpeed: TrainingArguments' dict and HF's deep copy of it
    (hf_deepspeed_config, which accelerate's DeepSpeedPlugin and deepspeed.initialize read). The partial-offload
    ratio is the estimator's (partial_offload_ratio) for these GPUs and this micro-batch; 1.0 without a GPU."""
    from recipe.ds_config import DsConfig, fill_model_autos, model_autos

    config, ds = training_args.deepspeed, training_args.ds
    if not model_autos(config):
        return []
    ratio, why = None, ""
    if DsConfig(config).offload_ratio == "auto":
        hw = estimate.run_hardware() or _cpu_hardware(training_args)
        work = estimate.run_workload(training_args, model_args)
        ratio = estimate.partial_offload_ratio(shape, config, hw, work)
        est = estimate.estimate(shape, config, hw, work, ds.stem, ratio=ratio)
        gpu = est["gpu_peak"] / GiB
        if hw.gpu_memory_gib <= 0:
            why = "no GPU here, so every optimizer state goes to the CPU"
        elif gpu > hw.usable_gib:
            why = (f"even with all of them on the CPU the estimate is {gpu:.1f} GiB per GPU, above the "
                   f"{hw.usable_gib:.0f} usable: lower --per_device_train_batch_size or turn on "
                   "--gradient_checkpointing")
        else:
            why = (f"the largest share the GPU can hold at micro-batch {work.micro_batch}"
                   f"{' with gradient checkpointing' if work.gradient_checkpointing else ''}: {gpu:.1f} of "
                   f"{hw.usable_gib:.0f} usable GiB per GPU, {est['cpu_per_node'] / GiB:.0f} GiB of host memory per "
                   "node, by the estimate")
    hf = getattr(training_args, "hf_deepspeed_config", None)
    targets = [config] + ([hf.config] if hf is not None and hf.config is not config else [])
    filled = [fill_model_autos(t, largest_param=shape.largest_param, world_size=training_args.world_size,
                               offload_ratio=ratio) for t in targets][0]
    if training_args.process_index == 0:
        for item in filled:
            if "buffer_size" in item:
                logger.info("%s: %s: what one process holds of the largest parameter, %s: %s elements on %d "
                            "process(es), rounded up to a multiple of 2^20", ds.name, item, shape.largest_param_name,
                            f"{shape.largest_param:,}", training_args.world_size)
            else:
                share = "all of the optimizer states" if ratio >= 1 else f"{ratio:.0%} of the optimizer states " \
                    "(the rest on the GPU)"
                logger.info("%s: %s: %s on the CPU; %s.", ds.name, item, share, why)
    return filled


def _cpu_hardware(training_args) -> estimate.Hardware:
    """This launch without a CUDA GPU: its processes per node and nodes, no GPU memory."""
    from recipe.hardware import local_world_size

    local = local_world_size()
    return estimate.Hardware(local, 0.0, max(1, training_args.world_size // local), gpu_name="(no CUDA GPU here)")


def run_host_check(training_args, model_args, shape: estimate.ModelShape,
                   host: estimate.HostMemory | None = None) -> dict:
    """host_check for this run, on this node; local rank 0 writes its line where scripts/train.sh asked
    ($RECIPE_HOST_MEMORY_REPORT), and the log says it once."""
    from recipe.hardware import local_world_size

    host = host or estimate.read_host_memory()
    hw = estimate.run_hardware() or _cpu_hardware(training_args)
    hw.cpu_memory_gib = host.usable(local_world_size()) / GiB
    ds = training_args.ds
    name = ds.name if ds is not None else "no DeepSpeed (one process)"
    check = host_check(shape, ds.config if ds is not None else {}, name, hw,
                       estimate.run_workload(training_args, model_args), host)
    target = os.environ.get(HOST_REPORT_ENV)
    if target and os.environ.get("LOCAL_RANK", "0") == "0":
        try:
            Path(target).write_text(check["line"] + "\n")
        except OSError as e:
            logger.warning("cannot write the host-memory report to %s: %s", target, e.strerror)
    if training_args.process_index == 0:
        (logger.info if check["fits"] else logger.warning)("%s", check["line"])
    return check


def enforced(check: dict | None, training_args) -> list[str]:
    """The host check's problems, unless --check_host_memory false (then they are only logged)."""
    if check is None or check["fits"]:
        return []
    if not getattr(training_args, "check_host_memory", True):
        if training_args.process_index == 0:
            logger.warning("--check_host_memory false: starting anyway.")
        return []
    return check["problems"]


def host_check(shape: estimate.ModelShape, config: dict, name: str, hw: estimate.Hardware,
               work: estimate.Workload, host: estimate.HostMemory, configs: dict[str, dict] | None = None) -> dict:
    """Whether this node can give the run (config `name`, on hw: processes per node, nodes, GPU memory when known)
    the host memory the estimator says it needs per node; hw.cpu_memory_gib must already be what the node can give
    (host.usable for the run's processes). When it cannot: what would (shipped configs, NVMe, LoRA, a smaller
    micro-batch or checkpointing, from the estimate), in `problems`. Pure: tests hand it a made-up HostMemory."""
    est = estimate.estimate(shape, config, hw, work, Path(name).stem)
    need, usable = host_need(est, hw) / GiB, hw.cpu_memory_gib
    limit = estimate.HOST_USABLE_FRACTION * usable
    fits = need <= limit
    share = est["offload_ratio"]
    ratio = f", {share:.0%} of the optimizer states on the CPU" if share is not None else ""
    size = f"{shape.n_params / 1e9:.2f}B" if shape.n_params >= 1e8 else f"{shape.n_params / 1e6:.1f}M"
    cpu_only = "; no CUDA GPU here, so what it would hold on a GPU is host memory too" if hw.gpu_memory_gib <= 0 else ""
    what = (f"{name} with {shape.name} ({size} parameters, {method_name(work)}, micro-batch "
            f"{work.micro_batch}{', gradient checkpointing' if work.gradient_checkpointing else ''}{ratio}, "
            f"{hw.gpus_per_node} process(es) per node{cpu_only})")
    where = f"{usable:.1f} GiB ({host.describe()})"
    out = {"config": name, "need_gib": round(need, 1), "usable_gib": round(usable, 1), "limit_gib": round(limit, 1),
           "host": host.describe(), "fits": fits, "alternatives": [], "problems": []}
    if fits:
        out["line"] = (f"host memory at start: {what} needs about {need:.1f} GiB of host RAM per node by the "
                       f"estimate; this node can give {where}.")
        return out
    alternatives = host_alternatives(shape, name, hw, work, configs)
    out["alternatives"] = alternatives
    on = "on these GPUs" if hw.gpu_memory_gib > 0 else "on this machine"
    fit = (f"What fits in that {on}, by the estimate: " + "; ".join(alternatives) + "."
           if alternatives else "Nothing shipped fits in that by the estimate: use a machine with more host memory "
           "per node, or more nodes (ZeRO shards the offloaded states across them).")
    out["problems"] = [
        f"host memory: {what} needs about {need:.1f} GiB of host RAM per node by the estimate, and this node can give "
        f"{where}; the estimate must stay below {estimate.HOST_USABLE_FRACTION:.0%} of that ({limit:.1f} GiB). "
        "Started anyway, the kernel's out-of-memory killer would end it with SIGKILL (DeepSpeed's launcher says "
        "only \"exits with return code = -9\") while the weights or the optimizer states load. " + fit
        + " Or free host memory on this node, or pass --check_host_memory false if you know this machine can."]
    out["line"] = ("host memory at start: " + out["problems"][0].removeprefix("host memory: "))
    return out


def host_need(est: dict, hw: estimate.Hardware) -> float:
    """Host bytes per node: the estimate's, plus, without a GPU (training on the CPU), each process's "GPU" part
    less DeepSpeed's communication buckets (allocated empty, so only the pages they touch count: 1.9 GiB of stage 2
    buckets would otherwise make the tiny default "need" 10 GiB on 2 CPU processes)."""
    if hw.gpu_memory_gib > 0:
        return est["cpu_per_node"]
    return est["cpu_per_node"] + hw.gpus_per_node * (est["gpu_peak"] - est["buffers"])


def method_name(work: estimate.Workload) -> str:
    return {"full": "full fine-tune", "lora": f"LoRA r{work.lora_rank}",
            "qlora": f"QLoRA r{work.lora_rank}"}.get(work.method, work.method)


def host_alternatives(shape: estimate.ModelShape, name: str, hw: estimate.Hardware, work: estimate.Workload,
                      configs: dict[str, dict] | None = None) -> list[str]:
    """Runs that fit this node's host memory (and the GPUs, when their memory is known): the three fastest shipped
    configs at the best micro-batch up to this run's (checkpointing if it must; this run's own config included),
    NVMe if it fits and is not among them, and for a full fine-tune the fastest LoRA. Configs whose ops cannot build
    here say what they need."""
    from recipe.ds_config import DsConfig, shipped

    all_configs = configs if configs is not None else {n: ds.config for n, ds in shipped().items()}
    gpu_known = hw.gpu_memory_gib > 0

    def options(trial: estimate.Workload) -> list[dict]:
        found = [_fitting_option(shape, cname, config, hw, trial, gpu_known) for cname, config in all_configs.items()]
        return sorted((o for o in found if o is not None), key=lambda o: -o["score"])

    same = options(work)
    chosen = same[:3] + [o for o in same[3:] if "nvme" in DsConfig(all_configs[o["config"]]).offloads][:1]
    if work.method == "full":
        chosen += options(estimate.Workload(**{**estimate.asdict(work), "method": "lora"}))[:1]
    return [o["text"] for o in chosen]


def _fitting_option(shape, cname: str, config: dict, hw: estimate.Hardware, work: estimate.Workload,
                    gpu_known: bool) -> dict | None:
    """The best run of one config that fits host (and GPU, when known) memory, as flags and what it needs."""
    from recipe.ds_config import DsConfig

    if gpu_known:
        rec = estimate.recommend(shape, {cname: config}, hw, work, max_batch=work.micro_batch)
        if rec.config is None:
            return None
        best = rec.candidates[0]
        flags = rec.flags
        trial = estimate.Workload(**{**estimate.asdict(work), "micro_batch": rec.micro_batch,
                                     "gradient_checkpointing": rec.gradient_checkpointing})
    else:
        trial = work
        est = estimate.estimate(shape, config, hw, work, cname)
        if host_need(est, hw) / GiB > estimate.HOST_USABLE_FRACTION * hw.cpu_memory_gib or est["problems"]:
            return None
        best = {"cpu_per_node_gib": host_need(est, hw) / GiB, "gpu_peak_gib": None,
                "offload_ratio": est["offload_ratio"], "score": estimate.throughput_score(cname, work)}
        flags = ["--zero_stage", cname.removeprefix("stage")]
    if work.method == "lora":
        flags = ["--use_peft", "true", *flags]
    if "nvme" in DsConfig(config).offloads:
        flags += ["--nvme_path", "/local_nvme"]
    parts = [f"{best['cpu_per_node_gib']:.0f} GiB host"]
    if best["gpu_peak_gib"] is not None:
        parts.append(f"{best['gpu_peak_gib']:.1f} GiB per GPU")
    if best["offload_ratio"] is not None:
        parts.append(f"{best['offload_ratio']:.0%} of the optimizer states on the CPU")
    if gpu_known and trial.micro_batch < work.micro_batch:
        parts.append(f"micro-batch {trial.micro_batch}: raise --gradient_accumulation_steps to keep the global batch")
    needs = _needs(DsConfig(config))
    if needs:
        parts.append(f"needs {needs}")
    return {"config": cname, "score": best["score"], "text": f"{' '.join(flags)} ({', '.join(parts)})"}


def _needs(ds) -> str:
    """What a config needs that this machine lacks (libaio for NVMe, CPUAdam for offload), or ''."""
    if not ds.offloads or ds.runnable_here():
        return ""
    from recipe.ds_config import aio_available

    if "nvme" in ds.offloads and not aio_available():
        return "libaio, absent here: apt install libaio-dev"
    return "DeepSpeed's CPUAdam op, which cannot build here: apt install g++ python3-dev"


def lengths_text(longest: dict[str, int]) -> str:
    return ", ".join(f"{n} {v // 1024}K" if v else f"{n} none" for n, v in longest.items())


def dry_run(training_args, model_args, run_dir: Path, is_main: bool) -> dict:
    """--dry_run: the configuration has passed its checks; estimate memory, recommend, stop. No weights load."""
    shape = estimate.load_shape(model_args.model_name_or_path, model_args.model_revision,
                                training_args.trust_remote_code)
    work = estimate.run_workload(training_args, model_args)
    configs = estimate.shipped_configs()
    this = training_args.ds.stem if training_args.ds and training_args.ds.path else "this run"
    configs.setdefault(this, training_args.deepspeed)  # a user's own file is estimated too
    check = run_host_check(training_args, model_args, shape)
    hw = estimate.run_hardware()
    if hw is not None:
        hw.cpu_memory_gib = check["usable_gib"]  # what this node can give, as the check read it
    if hw is None:  # estimates per GPU still hold; whether they fit needs a GPU's memory
        hw = estimate.Hardware(training_args.world_size, 0.0, gpu_name="(no CUDA GPU here)")
        rows = [estimate.estimate(shape, c, hw, work, n) for n, c in configs.items()]
        rec = estimate.Recommendation(None, 0, False, "no CUDA GPU here, so no GPU memory to fit: run "
                                      "scripts/estimate_memory.py --model ... --gpus N --gpu_memory_gib G")
        text = estimate.format_table(rows) + f"\n\nRecommended: {rec.reason}."
        longest, longer = {}, {}
    else:
        rows, rec = estimate.plan(shape, hw, work, configs)
        text = estimate.report(shape, hw, work, rows, rec)
        longest = {n: estimate.longest_sequence(shape, c, hw, work, n) for n, c in configs.items()}
        text += ("\n\nLongest sequence that fits here by the estimate (micro-batch %d, gradient checkpointing %s): %s."
                 % (work.micro_batch, "on" if work.gradient_checkpointing else "off", lengths_text(longest)))
        longer = {}
        if not (work.gradient_checkpointing and work.tiled_mlp and work.activation_offload):  # levers left off
            levers = replace(work, gradient_checkpointing=True, tiled_mlp=True, activation_offload=True)
            longer = {n: estimate.longest_sequence(shape, c, hw, levers, n) for n, c in configs.items()}
            text += ("\nWith --gradient_checkpointing true --tiled_mlp true --activation_offloading true (checkpoints "
                     f"in host memory; past the model's positions add --rope_scaling): {lengths_text(longer)}.")
    result = estimate.to_json(shape, hw, work, rows, rec)
    result["longest_sequence"] = longest
    result["longest_sequence_with_long_context_levers"] = longer
    result["this_run"] = next(estimate.gib_row(r) for r in rows if r["config"] == this)
    result["host_memory"] = check
    if is_main:
        report.write_json(run_dir / "memory_estimate.json", result)
        logger.info("dry run: %s with %s\n%s\nThis run (%s): %.1f GiB per GPU, %.1f GiB of host memory per node "
                    "(this node can give %.1f). Written: %s", shape.name, this, text, this,
                    result["this_run"]["gpu_peak"], check["need_gib"], check["usable_gib"],
                    run_dir / "memory_estimate.json")
    problems = enforced(check, training_args)
    if problems:  # the run itself would stop here: so does its dry run (exit 2), after writing the estimate
        raise ConfigError(problems)
    return result


def torch_oom():
    import torch

    return torch.cuda.OutOfMemoryError


def oom_message(training_args, model_args, error: Exception) -> str:
    """Out of GPU memory: what this run needs by the estimator, and what would fit on these GPUs."""
    first = str(error).splitlines()[0][:200]
    try:
        shape = estimate.load_shape(model_args.model_name_or_path, model_args.model_revision,
                                    training_args.trust_remote_code)
        work = estimate.run_workload(training_args, model_args)
        hw = estimate.run_hardware()
        name = training_args.ds.stem if training_args.ds and training_args.ds.path else "this config"
        need = estimate.estimate(shape, training_args.deepspeed or {}, hw, work, name)["gpu_peak"] / 2**30
        rec = estimate.recommend(shape, estimate.shipped_configs(), hw, work, max_batch=work.micro_batch)
        fit = f"{' '.join(rec.flags)} ({rec.reason})" if rec.config else rec.reason
        return (f"out of GPU memory ({first}). This run ({name}, micro-batch {work.micro_batch}, seq {work.seq_len}) "
                f"needs about {need:.1f} GiB per GPU by the estimate, of {hw.usable_gib:.0f} usable. What would fit: "
                f"{fit}. Or rerun with --zero_stage auto. Checkpoints already saved are intact; rerunning resumes.")
    except Exception as estimate_error:  # the message must not hide the OOM itself
        return (f"out of GPU memory ({first}). Lower --per_device_train_batch_size, turn on "
                f"--gradient_checkpointing, or use --zero_stage 3 / 3_offload (estimate failed: {estimate_error}).")
