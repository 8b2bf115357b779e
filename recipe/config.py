"""Arguments: our dataclasses beside TRL's, the parser, and the DeepSpeed-config resolution.

Three dataclasses reach main(): ScriptArguments (data, run, reports), TrainConfig (TRL's
SFTConfig plus the DeepSpeed shorthands) and ModelArguments (TRL's ModelConfig: model,
LoRA, quantisation).
`--config recipe.yaml` sets defaults; CLI flags win; an unknown key in either is an error.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, SFTConfig, TrlParser

from recipe import REPO_ROOT
from recipe.ds_check import check_ds_config
from recipe.hardware import (ensure_distributed_env, fix_cuda_arch_list, local_world_size, master_port_problem,
                             resolve_precision)
from recipe.speed import resolve_speed

logger = logging.getLogger(__name__)
DS_CONFIG_DIR = REPO_ROOT / "ds_configs"
DEFAULT_RECIPE = REPO_ROOT / "configs" / "default.yaml"
DEFAULT_DS_CONFIG = DS_CONFIG_DIR / "stage2.json"


class ConfigError(ValueError):
    """One or more problems with the user's configuration, each with its remedy."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) with the configuration:\n{lines}")


class TrainingError(RuntimeError):
    """Training stopped for a reason the user can fix; the message says how. Exit code 3."""


@dataclass
class ScriptArguments:
    """Data, run naming and reporting. Model flags come from TRL's ModelConfig."""

    dataset_name: str = field(
        default="data/train.jsonl",
        metadata={"help": "Local .json/.jsonl/.csv/.parquet file or directory, or a hub dataset id."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(
        default="test", metadata={"help": "Split to evaluate on when the dataset has one (hub datasets)."}
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Evaluation file or hub id. Unset: the dataset's test split, else eval_split_ratio of train."},
    )
    eval_split_ratio: float = field(
        default=0.02, metadata={"help": "Fraction of train held out for eval when no eval set is given (0: no eval)."}
    )
    dataset_format: str = field(
        default="auto",
        metadata={
            "help": "Row format; 'auto' detects it from the columns.",
            "choices": ["auto", "messages", "alpaca", "prompt_completion", "text", "tokens"],
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N eval rows."})
    results_dir: str = field(default="results", metadata={"help": "Run outputs go to <results_dir>/<run_name>/."})
    save_final_model: bool = field(
        default=True, metadata={"help": "Save the final model (HF format, safetensors) to <run dir>/model."}
    )
    heldout_eval: str = field(
        default="auto",
        metadata={
            "help": "Score exact-match generation on the eval set before and after training. "
            "'auto': only for the default task (the shipped data).",
            "choices": ["auto", "true", "false"],
        },
    )
    heldout_max_samples: int = field(default=200, metadata={"help": "Eval rows scored by generation."})
    heldout_max_new_tokens: int = field(default=16, metadata={"help": "Generation budget per held-out answer."})
    random_init: bool = field(
        default=False,
        metadata={"help": "Build the model from --model_name_or_path's config.json with random weights "
                  "(benchmarks, training from scratch); no weight files needed."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use when it differs from the model's; 'tiny': the built-in "
                                "character tokenizer."},
    )


@dataclass
class TrainConfig(SFTConfig):
    """TRL's SFTConfig with the DeepSpeed shorthands and hardware-chosen precision.

    Resolved before TrainingArguments initialises the device: the DeepSpeed file (from
    --deepspeed or --zero_stage), precision (bf16 unset = chosen from the hardware), use_cpu.
    """

    zero_stage: str | None = field(
        default=None,
        metadata={
            "help": "Shorthand for --deepspeed ds_configs/stage<N>.json (and replacing it): 0, 1, 2, 3, "
            "2_offload, 3_offload, 3_nvme; 'auto': the fastest that fits this model on these GPUs (memory "
            "estimate), lowering the micro-batch or turning on gradient checkpointing if it must, and saying why."
        },
    )
    nvme_path: str | None = field(
        default=None,
        metadata={"help": "NVMe directory for ZeRO-Infinity (stage3_nvme). Default: $DS_NVME_PATH."},
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={"help": "Sequences per optimizer step over all processes; sets gradient_accumulation_steps "
                  "= global / (per-device batch x processes), so a recipe trains the same on any GPU count."},
    )
    fused_loss: str = field(
        default="auto",
        metadata={"help": "LM-head loss without full logits: 'liger' (fused linear cross-entropy, one pass), "
                  "'trl' (TRL's chunked head; works under ZeRO-3; logs token accuracy). auto: liger on CUDA "
                  "below ZeRO-3, else trl.", "choices": ["auto", "liger", "trl"]},
    )
    compile_layers: str = field(
        default="auto",
        metadata={"help": "torch.compile each decoder layer. auto: on with CUDA below ZeRO-3.",
                  "choices": ["auto", "true", "false"]},
    )
    liger_kernels: str = field(
        default="auto",
        metadata={"help": "Liger's fused RMSNorm/SwiGLU/RoPE kernels. auto: on with CUDA when layers are not compiled.",
                  "choices": ["auto", "true", "false"]},
    )
    token_metrics: bool = field(
        default=False,
        metadata={"help": "Log TRL's mean token accuracy and entropy (with --fused_loss trl); costs a host sync "
                  "and a gather per micro-batch."},
    )
    eval_only: bool = field(
        default=False,
        metadata={"help": "Evaluate --model_name_or_path (a saved run's model/ folder, say) on the eval set: eval "
                  "loss, perplexity and, for the default task, the held-out score. No training, no DeepSpeed."},
    )
    dry_run: bool = field(
        default=False,
        metadata={"help": "Preflight: check the configuration, estimate GPU and CPU memory of this run under every "
                  "shipped DeepSpeed config, recommend one, write <run dir>/memory_estimate.json and stop. No "
                  "weights load, nothing trains."},
    )
    speed: dict = field(default_factory=dict, init=False)  # the resolved speed choices (recorded in the summary)
    ds_config_path: str | None = field(default=None, init=False)  # the DeepSpeed file in use
    output_dir_auto: bool = field(default=False, init=False)  # main() puts checkpoints in the run folder
    # Defaults that differ from SFTConfig's, each with its reason.
    output_dir: str | None = field(
        default=None, metadata={"help": "Checkpoints. Default: <results_dir>/<run_name>/checkpoints."}
    )
    gradient_checkpointing: bool | None = field(
        default=None,  # off: ~30% slower when on; transformers 5 also calls it activation_checkpointing
        metadata={"help": "Recompute activations in backward: ~30%% slower, far less activation memory."},
    )
    report_to: str | list[str] = field(
        default="wandb", metadata={"help": "'wandb' (online if logged in, else offline) or 'none'."}
    )
    save_only_model: bool = field(default=False, metadata={"help": "Checkpoints without optimizer state (no resume)."})
    logging_nan_inf_filter: bool = field(
        default=False,  # HF's default (True) logs a nan/inf loss as the interval's earlier average: hides divergence
        metadata={"help": "Hide nan/inf losses in the logs (HF's default). Off here: a nan loss stops the run with "
                  "the step and the last good checkpoint."},
    )
    resume_from_checkpoint: str | None = field(
        default="auto",
        metadata={"help": "'auto' (default): continue from the newest complete checkpoint in output_dir when there "
                  "is one, so rerunning a killed command resumes it; 'false': start over; or a checkpoint path."},
    )

    def __post_init__(self):
        fix_cuda_arch_list()
        ensure_distributed_env()
        problems = [p for p in [master_port_problem()] if p]
        self.output_dir_auto = self.output_dir is None
        if self.global_batch_size is not None:
            world = int(os.environ["WORLD_SIZE"])
            per_step = self.per_device_train_batch_size * world
            if self.global_batch_size % per_step:
                problems.append(
                    f"--global_batch_size {self.global_batch_size} is not a multiple of per-device batch "
                    f"{self.per_device_train_batch_size} x {world} processes = {per_step}: change one of them."
                )
            else:
                self.gradient_accumulation_steps = self.global_batch_size // per_step
        if self.eval_only:
            # a saved model, one process, no optimizer: DeepSpeed has nothing to do (and its stage-2
            # engine cannot evaluate without training)
            if int(os.environ["WORLD_SIZE"]) > 1:
                problems.append("--eval_only runs in one process: start it with `python train_ds.py --eval_only ...`, "
                                "not a multi-process launcher.")
            self.deepspeed, self.ds_config_path, self.compile_layers = None, None, "false"
            # accelerate (`accelerate launch --use_deepspeed`, or an Accelerator made earlier in this process)
            # leaves ACCELERATE_USE_DEEPSPEED=true, which would bring DeepSpeed back without a config
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        else:
            # 'auto' is settled in parse_args, which sees the model; until then stage 2 stands in
            stage = "2" if self.zero_stage == "auto" else self.zero_stage
            self.deepspeed, self.ds_config_path = resolve_ds_config(self.deepspeed, stage, self.nvme_path, problems)
        import torch

        cuda = torch.cuda.is_available()
        if not cuda:
            # One process per CPU rank: accelerate must not fill "auto" batch sizes for one process.
            self.use_cpu = True
            if "OMP_NUM_THREADS" not in os.environ:
                # share the cores between the local ranks instead of oversubscribing them
                threads = max(1, (os.cpu_count() or 1) // local_world_size())
                os.environ["OMP_NUM_THREADS"] = str(threads)
                torch.set_num_threads(threads)
        self.bf16, self.fp16, precision_problems = resolve_precision(
            self.bf16, self.fp16, cuda, cuda and torch.cuda.is_bf16_supported()
        )
        problems += precision_problems
        problems += nvme_problems(self.deepspeed)
        if self.deepspeed:
            errors, warnings = check_ds_config(self.deepspeed, Path(self.ds_config_path or "ds_config.json").name, {
                "bf16": self.bf16, "fp16": self.fp16, "optim": str(getattr(self.optim, "value", self.optim)),
                "lr_scheduler_type": str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)),
                "per_device_train_batch_size": self.per_device_train_batch_size,
                "gradient_accumulation_steps": self.gradient_accumulation_steps,
                "world_size": int(os.environ["WORLD_SIZE"])})
            problems += errors
            for warning in warnings if int(os.environ.get("RANK", "0")) == 0 else []:
                logger.warning(warning)
        zero = self.deepspeed.get("zero_optimization", {}).get("stage", 0) if self.deepspeed else None
        self.speed, speed_problems = resolve_speed(self.fused_loss, self.compile_layers, self.liger_kernels,
                                                   zero, cuda)
        problems += speed_problems
        if problems:
            raise ConfigError(problems)
        super().__post_init__()


QUANT_FLAGS = ("load_in_4bit", "load_in_8bit")


@dataclass
class ModelArguments(ModelConfig):
    """TRL's ModelConfig (model, LoRA, quantisation) with Llama-sensible LoRA/QLoRA defaults.

    LoRA (--use_peft) targets every linear layer of the decoder; QLoRA (--use_peft --load_in_4bit) stores the
    frozen base in nf4 with double quantisation, in a storage dtype equal to the compute dtype so ZeRO-3 can
    partition it like any bf16 tensor.
    """

    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "LoRA target modules (names of linear layers, e.g. q_proj v_proj). Default all-linear: "
                  "q/k/v/o and gate/up/down of every layer, not lm_head."},
    )
    use_bnb_nested_quant: bool = field(
        default=True, metadata={"help": "QLoRA: double quantisation (the quantisation constants quantised too)."})
    bnb_4bit_quant_storage: str | None = field(
        default=None, metadata={"help": "QLoRA: dtype the 4-bit weights are stored in. Default: the compute dtype "
                                "(bf16 on GPUs that have it), which ZeRO-3 needs to partition them."})

    def __post_init__(self):
        super().__post_init__()
        problems = []
        quantized = [f"--{k}" for k in QUANT_FLAGS if getattr(self, k)]
        if quantized and not self.use_peft:
            problems.append(f"{quantized[0]} quantises the frozen base model, which only LoRA can train: add "
                            "--use_peft true (QLoRA), or drop it for a full fine-tune.")
        if quantized:
            import importlib.util

            import torch

            if not torch.cuda.is_available():
                problems.append(f"{quantized[0]} (QLoRA) needs a CUDA GPU: bitsandbytes' 4/8-bit kernels run there. "
                                "On this machine use LoRA without quantisation (--use_peft true, no "
                                f"{quantized[0]}).")
            elif importlib.util.find_spec("bitsandbytes") is None:
                problems.append(f"{quantized[0]} needs bitsandbytes: `uv sync` installs it (pip install bitsandbytes).")
        if problems:
            raise ConfigError(problems)


def ds_config_names() -> list[str]:
    return sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))


def load_json_file(path: Path, what: str) -> dict:
    """json.load with an error that names the file, line and column."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError([f"cannot read {what} {path}: {e.strerror}."]) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            [f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. Fix the file."]
        ) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{what} {path} must hold a JSON object, not {type(data).__name__}."])
    return data


def resolve_ds_config(
    deepspeed: str | dict | None, zero_stage: str | None, nvme_path: str | None, problems: list[str]
) -> tuple[dict | None, str | None]:
    """Turn --deepspeed/--zero_stage into a loaded config dict and the file it came from."""
    if isinstance(deepspeed, dict):
        return deepspeed, None
    if zero_stage is not None and str(zero_stage) != "":
        name = f"stage{zero_stage}"
        path = DS_CONFIG_DIR / f"{name}.json"
        if not path.exists():
            hint = difflib.get_close_matches(name, ds_config_names(), n=1)
            problems.append(
                f"--zero_stage {zero_stage}: there is no {path.relative_to(REPO_ROOT)}. "
                f"Choose one of {', '.join(n.removeprefix('stage') for n in ds_config_names())}"
                + (f" (did you mean {hint[0].removeprefix('stage')}?)" if hint else "")
                + ", or pass your own file with --deepspeed."
            )
            return None, None
        # the shorthand wins over a recipe's `deepspeed:` so `--zero_stage 3` works with any recipe
        deepspeed = str(path.relative_to(REPO_ROOT))
    if deepspeed is None or deepspeed == "":
        deepspeed = str(DEFAULT_DS_CONFIG)
    path = Path(deepspeed)
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    if not path.exists():
        problems.append(
            f"DeepSpeed config {deepspeed} does not exist. Shipped configs: "
            f"{', '.join(f'ds_configs/{n}.json' for n in ds_config_names())}."
        )
        return None, None
    try:
        config = load_json_file(path, "DeepSpeed config")
    except ConfigError as e:
        problems.extend(e.problems)
        return None, None
    zero = config.get("zero_optimization", {})
    uses_nvme = any(
        isinstance(zero.get(k), dict) and zero[k].get("device") == "nvme" for k in ("offload_optimizer", "offload_param")
    )
    if uses_nvme:
        nvme = nvme_path or os.environ.get("DS_NVME_PATH")
        for key in ("offload_optimizer", "offload_param"):
            section = zero.get(key)
            if isinstance(section, dict) and section.get("device") == "nvme" and section.get("nvme_path") in (None, "auto"):
                if not nvme:
                    problems.append(
                        f"{path.name} offloads to NVMe but no path is set: pass --nvme_path /local_nvme "
                        "or export DS_NVME_PATH=/local_nvme (a directory on a fast local NVMe disk)."
                    )
                    return None, None
                section["nvme_path"] = nvme
    path = path.resolve()
    return config, str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)


def aio_available() -> bool:
    """Whether DeepSpeed's async_io op (NVMe offload) can build here: it needs libaio."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return bool(AsyncIOBuilder().is_compatible(verbose=False))


def nvme_problems(config: dict | None, aio=aio_available) -> list[str]:
    """NVMe offload needs libaio and a writable directory: say so before any weights load."""
    zero = (config or {}).get("zero_optimization", {})
    paths = {zero[k]["nvme_path"] for k in ("offload_optimizer", "offload_param")
             if isinstance(zero.get(k), dict) and zero[k].get("device") == "nvme" and zero[k].get("nvme_path")}
    if not paths:
        return []
    problems = []
    for path in sorted(paths):
        if not Path(path).is_dir() or not os.access(path, os.W_OK):
            problems.append(f"NVMe offload path {path} is not a writable directory: create it "
                            f"(mkdir -p {path}) on a local NVMe disk, or pass another --nvme_path.")
    if not aio():
        problems.append("NVMe offload needs DeepSpeed's async_io op, which needs libaio: install it "
                        "(apt install libaio-dev, or conda install -c conda-forge libaio) and rerun, or use "
                        "--zero_stage 3_offload (CPU memory instead of NVMe).")
    return problems


def make_parser() -> TrlParser:
    parser = TrlParser((ScriptArguments, TrainConfig, ModelArguments))
    parser.allow_abbrev = False  # a typo such as --learning_rat must fail, not match --learning_rate
    return parser


def default_recipe_argv(argv: list[str]) -> list[str]:
    """With no --config and no model, run the embedded default recipe (configs/default.yaml)."""
    if "--config" in argv or any(a.split("=")[0] == "--model_name_or_path" for a in argv):
        return argv
    return ["--config", str(DEFAULT_RECIPE), *argv]


def parse_args(argv: list[str] | None = None):
    """Parse CLI + YAML into (ScriptArguments, TrainConfig, ModelArguments); unknown keys fail.

    `--zero_stage auto` parses twice: the first pass gives the model and batch to estimate, the
    second applies the recommendation as flags (the last of a repeated flag wins).
    """
    argv = default_recipe_argv(list(sys.argv[1:] if argv is None else argv))
    script_args, training_args, model_args = make_parser().parse_args_and_config(argv)
    if training_args.zero_stage == "auto" and not training_args.eval_only:
        extra = auto_stage_argv(training_args, model_args)
        script_args, training_args, model_args = make_parser().parse_args_and_config([*argv, *extra])
    return script_args, training_args, model_args


def runnable_here(config: dict) -> bool:
    """Whether a config's ops can build on this machine (CPUAdam for offload, libaio for NVMe)."""
    from recipe.ds_check import cpu_adam_available, offload_device

    devices = {offload_device(config, k) for k in ("offload_optimizer", "offload_param")}
    if "nvme" in devices and not aio_available():
        return False
    return not (devices & {"cpu", "nvme"}) or cpu_adam_available()


def auto_stage_argv(training_args, model_args) -> list[str]:
    """--zero_stage auto: the memory estimator's choice for this model on these GPUs, as flags, with the reason."""
    from recipe import estimate

    say = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a, **k: None)
    hw = estimate.run_hardware()
    if hw is None:
        say("--zero_stage auto: no CUDA GPU, no GPU memory to plan for: using stage 2.", file=sys.stderr)
        return ["--zero_stage", "2"]
    try:
        shape = estimate.load_shape(model_args.model_name_or_path, model_args.model_revision,
                                    training_args.trust_remote_code)
    except OSError as e:
        raise ConfigError([f"--zero_stage auto needs the model's config to estimate memory: "
                           f"{model_args.model_name_or_path}: {str(e).splitlines()[0]}"]) from None
    work = estimate.run_workload(training_args, model_args)
    configs = {n: c for n, c in estimate.shipped_configs().items() if runnable_here(c)}
    rec = estimate.recommend(shape, configs, hw, work, max_batch=work.micro_batch)
    if rec.config is None:
        raise ConfigError([f"--zero_stage auto: {rec.reason}"])
    flags = ["--zero_stage", rec.config.removeprefix("stage")]
    if rec.micro_batch < work.micro_batch:
        flags += ["--per_device_train_batch_size", str(rec.micro_batch)]
        if training_args.global_batch_size is None:  # keep the global batch: more accumulation steps
            total = training_args.gradient_accumulation_steps * work.micro_batch
            flags += ["--gradient_accumulation_steps", str(-(-total // rec.micro_batch))]
    if rec.gradient_checkpointing and not work.gradient_checkpointing:
        flags += ["--gradient_checkpointing", "true"]
    say(f"--zero_stage auto: {' '.join(flags)}. Why: {rec.reason}.", file=sys.stderr)
    return flags
