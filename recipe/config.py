"""Arguments: our dataclasses beside TRL's, the parser, and what is settled while parsing.

Three dataclasses reach main(): ScriptArguments (data, run, reports), TrainConfig (TRL's SFTConfig plus the
DeepSpeed shorthands and speed flags) and ModelArguments (TRL's ModelConfig: model, LoRA, quantisation).
`--config recipe.yaml` sets defaults; CLI flags win; an unknown flag or key stops with the closest known name.

Settled here, once, on the parsed values (parsing changes nothing in the process; recipe.hardware.prepare_process
does that before):
- the DeepSpeed file (--deepspeed / --zero_stage / the default stage2.json), loaded as a recipe.ds_config.DsConfig;
- values written explicitly in that JSON (not "auto") for what TrainingArguments also sets: TrainingArguments adopt
  them, unless the CLI or the recipe set the same thing to something else (then: an error naming both places);
- `--zero_stage auto`: the memory estimator's plan (config, micro-batch, gradient checkpointing), applied to the
  parsed values before TrainConfig is built;
- precision from the hardware, gradient accumulation from --global_batch_size, the speed choices;
- every check that needs no weights (ds_check, NVMe, the MASTER_PORT), all problems at once.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import logging
import os
import sys
from dataclasses import dataclass, field

from trl import ModelConfig, SFTConfig, TrlParser

from recipe import REPO_ROOT
from recipe.ds_check import check_ds_config, nvme_problems
from recipe.ds_config import DsConfig, resolve
from recipe.errors import ConfigError, TrainingError  # noqa: F401  (re-exported: recipe.config.ConfigError)
from recipe.hardware import master_port_problem, resolve_precision, world_size
from recipe.long_context import activation_offload_wanted, tiled_mlp_wanted
from recipe.speed import AUTO_TRUE_FALSE, resolve_speed

logger = logging.getLogger(__name__)
DEFAULT_RECIPE = REPO_ROOT / "configs" / "default.yaml"
# Which fields the user set, and where ("the command line" or the recipe file), while a RecipeParser builds
# TrainConfig; outside a parser, every field whose value differs from its default counts as set.
EXPLICIT: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("explicit", default=None)


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
            "choices": ["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "tokens"],
        },
    )
    dataset_columns: str | None = field(
        default=None,
        metadata={"help": "Map your column names onto ours: 'question:prompt,answer:completion', 'dialog:messages'."},
    )
    dataset_mixture: list[str] | None = field(
        default=None,
        metadata={"help": "Several datasets in one run, each PATH_OR_ID, PATH:ROWS (that many rows) or PATH:WEIGHT "
                  "(that share of its rows; above 1 repeats them); each keeps its own format; deterministic for "
                  "--seed. Replaces --dataset_name; summary.json records the rows of each."},
    )
    train_on_turns: str = field(
        default="all",
        metadata={"help": "Chats: train every assistant turn ('all') or only the last ('last').",
                  "choices": ["all", "last"]},
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


def auto_flag(help_text: str):
    """A speed or memory option: auto (the recipe decides by hardware and workload), true or false."""
    return field(default="auto", metadata={"help": help_text, "choices": AUTO_TRUE_FALSE})


@dataclass
class TrainConfig(SFTConfig):
    """TRL's SFTConfig with the DeepSpeed shorthands and hardware-chosen precision.

    Settled before TrainingArguments initialises the device: the DeepSpeed file (from --deepspeed or
    --zero_stage) and the values it sets explicitly, precision (bf16 unset = chosen from the hardware), use_cpu.
    """

    zero_stage: str | None = field(
        default=None,
        metadata={
            "help": "Shorthand for --deepspeed ds_configs/stage<N>.json (and replacing it): 0, 1, 2, 3, "
            "2_offload, 3_offload, 3_partial_offload, 3_nvme; 'auto': the fastest that fits this model on these GPUs (memory "
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
                  "'trl' (TRL's chunked head; logs token accuracy). auto: liger on CUDA, else trl.",
                  "choices": ["auto", "liger", "trl"]},
    )
    compile_layers: str = auto_flag("torch.compile each decoder layer. auto: on with CUDA (not with the tiled MLP; "
                                    "under ZeRO-3 not with parameter offload); under ZeRO-3 each "
                                    "layer is a ZeRO-3 leaf module and its forward compiles.")
    liger_kernels: str = auto_flag("Liger's fused RMSNorm/SwiGLU/RoPE kernels. auto: on with CUDA when layers are "
                                   "not compiled.")
    fp8: bool = field(
        default=False,
        metadata={"help": "Float8 matmuls for the decoder's linear layers (torchao; GPUs with FP8 tensor cores: Ada, "
                          "Hopper and later). The LM head, embedding, weights and optimizer states stay as they are."},
    )
    fp8_recipe: str = field(
        default="tensorwise",
        metadata={"help": "torchao's float8 scaling with --fp8: tensorwise (fastest), rowwise, rowwise_with_gw_hp "
                          "(most accurate).", "choices": ["tensorwise", "rowwise", "rowwise_with_gw_hp"]},
    )
    tiled_mlp: str = auto_flag("Run each MLP in sequence shards without keeping their activations (DeepSpeed's "
                               "TiledMLP, recomputed in backward): long sequences in less memory. auto: on from 32768 "
                               "tokens of --max_length where the run does not fit the GPU without it (by the memory "
                               "estimate; untiled, the layers compile, which is faster).")
    activation_offloading: str = auto_flag("Move saved activations (with gradient checkpointing: each layer's input) "
                                           "to pinned host memory in forward and back for backward (TRL's "
                                           "offloading, CUDA only). auto: on with CUDA from 131072 tokens of "
                                           "--max_length.")
    sequence_parallel_size: int = field(
        default=1,
        metadata={"help": "Ulysses sequence parallelism (DeepSpeed ALST through accelerate): each sequence split over "
                  "this many ranks, data parallel over world / N. Needs ZeRO 1-3, N dividing the process count and "
                  "the attention heads, SDPA attention."})
    varlen_attention: str = auto_flag("Packed rows through PyTorch's variable-length flash attention (no seq x seq "
                                      "mask). auto: on with CUDA when rows are packed and --attn_implementation is not "
                                      "set.")
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
    check_host_memory: bool = field(
        default=True,
        metadata={"help": "Before any weights load, stop (exit 2) when the memory estimate's host RAM per node is "
                  "above 90%% of what this node can give (MemAvailable, or the cgroup limit when tighter), with what "
                  "fits instead. false: warn and start anyway."},
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


    @property
    def ds(self) -> DsConfig | None:
        """The DeepSpeed config in use (None: --eval_only, or no DeepSpeed)."""
        return DsConfig(self.deepspeed, self.ds_config_path) if isinstance(self.deepspeed, dict) else None

    def __post_init__(self):
        problems = []
        self.output_dir_auto = self.output_dir is None
        world = world_size()
        if self.eval_only:
            # a saved model, one process, no optimizer: DeepSpeed has nothing to do (and its stage-2
            # engine cannot evaluate without training)
            if world > 1:
                problems.append("--eval_only runs in one process: start it with `python train_ds.py --eval_only ...`, "
                                "not a multi-process launcher.")
            self.deepspeed, self.ds_config_path, self.compile_layers = None, None, "false"
            # accelerate (`accelerate launch --use_deepspeed`, or an Accelerator made earlier in this process)
            # leaves ACCELERATE_USE_DEEPSPEED=true, which would bring DeepSpeed back without a config
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        else:
            try:
                # 'auto' was planned by the parser (plan_auto_stage); built without one, stage 2 stands in
                ds = resolve(self.deepspeed, "2" if self.zero_stage == "auto" else self.zero_stage, self.nvme_path)
                self.deepspeed, self.ds_config_path = ds.config, ds.path
                problems += adopt_ds_values(self, ds, explicit_fields(self))
            except ConfigError as e:
                problems += e.problems
                self.deepspeed, self.ds_config_path = None, None
        # decided once: speed_choices reads it again when preflight settles --tiled_mlp auto
        padding_free = self._padding_free = bool(self.padding_free or (self.packing and self.packing_strategy in
                                                                       ("bfd", "bfd_split")))
        sp = self.sequence_parallel_size
        if sp != 1:
            from recipe.long_context import sequence_parallel_problems

            problems += sequence_parallel_problems(sp, world, self.ds.stage if self.ds else None, padding_free)
        dp_world = max(1, world // max(1, sp))  # processes that see different data
        if self.global_batch_size is not None:
            per_step = self.per_device_train_batch_size * dp_world
            if self.global_batch_size % per_step:
                problems.append(
                    f"--global_batch_size {self.global_batch_size} is not a multiple of per-device batch "
                    f"{self.per_device_train_batch_size} x {dp_world} data-parallel processes = {per_step}: change "
                    "one of them."
                )
            else:
                self.gradient_accumulation_steps = self.global_batch_size // per_step
        import torch

        cuda = torch.cuda.is_available()
        if not cuda:
            self.use_cpu = True  # one process per CPU rank: accelerate must not fill "auto" batch sizes for one
        ds_precision = {k: v for k, v in (("bf16", self.ds and self.ds.value("bf16.enabled")),
                                          ("fp16", self.ds and self.ds.value("fp16.enabled"))) if isinstance(v, bool)}
        self.bf16, self.fp16, precision_problems = resolve_precision(
            self.bf16, self.fp16, cuda, cuda and torch.cuda.is_bf16_supported())
        for key, value in ds_precision.items():  # a JSON's explicit precision stands over the hardware's choice
            setattr(self, key, value)
        problems += precision_problems
        problems += [p for p in [master_port_problem()] if p]
        if self.ds is not None:
            problems += nvme_problems(self.ds)
            errors, warnings = check_ds_config(self.deepspeed, self.ds.name, {
                "bf16": self.bf16, "fp16": self.fp16, "optim": str(getattr(self.optim, "value", self.optim)),
                "lr_scheduler_type": str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)),
                "per_device_train_batch_size": self.per_device_train_batch_size,
                "gradient_accumulation_steps": self.gradient_accumulation_steps, "world_size": world})
            problems += errors
            for warning in warnings if os.environ.get("RANK", "0") == "0" else []:
                logger.warning(warning)
        if sp > 1:  # Ulysses shards each batch's length over the group: a multiple of N (gloo: one length for all)
            need = self.max_length if not cuda else sp
            asked = self.pad_to_multiple_of
            if isinstance(asked, str) and asked.isdigit():
                asked = int(asked)
            if not isinstance(asked, int) and need:  # unset or TRL's "auto"
                self.pad_to_multiple_of = need
            elif isinstance(asked, int) and asked % sp:
                problems.append(f"--pad_to_multiple_of {self.pad_to_multiple_of} with --sequence_parallel_size {sp}: "
                                f"each batch's length must split over {sp} ranks; use a multiple of {sp}.")
        self.speed, speed_problems = self.speed_choices(tiled_mlp_wanted(self.tiled_mlp, self.max_length))
        problems += speed_problems
        if self.fp8:
            from recipe.fp8 import fp8_problems

            problems += fp8_problems(self.fp8_recipe, cuda=cuda, bf16=self.bf16, fp16=self.fp16,
                                     capability=torch.cuda.get_device_capability() if cuda else None)
        # a bool from here on (TRL reads it); without CUDA only an explicit true resolves to on
        self.activation_offloading = activation_offload_wanted(self.activation_offloading, self.max_length, cuda)
        if self.activation_offloading and not cuda:
            problems.append("--activation_offloading moves saved activations to pinned host memory over CUDA streams: "
                            "it needs a CUDA GPU; drop it on CPU.")
        problems += loss_option_problems(self)
        if problems:
            raise ConfigError(problems)
        if self.gradient_checkpointing is not None and self.activation_checkpointing is None:
            # transformers 5 renamed it activation_checkpointing and warns on the old name; ours keeps the name every
            # guide uses, so hand it over under the new one (transformers mirrors it back)
            self.activation_checkpointing, self.gradient_checkpointing = self.gradient_checkpointing, None
        super().__post_init__()

    def speed_choices(self, tiled_mlp: bool) -> tuple[dict, list[str]]:
        """recipe.speed's choices for these flags on this hardware, with the tiled MLP on or off (preflight settles
        `--tiled_mlp auto` against the memory estimate once the model's shape is known)."""
        import torch

        return resolve_speed(self.fused_loss, self.compile_layers, self.liger_kernels,
                             self.ds.stage if self.ds else None, torch.cuda.is_available(),
                             varlen_attention=self.varlen_attention, padding_free=self._padding_free,
                             tiled_mlp=tiled_mlp, param_offload=bool(self.ds and self.ds.offload_param))


# ---------------------------------------------------------------- explicit DeepSpeed JSON values


# What TrainingArguments also sets, by its key in the DeepSpeed JSON (HF's trainer_config_process/_finalize fill and
# match these). An explicit value there is adopted (logged once); the same value set otherwise on the CLI or in the
# recipe is an error naming both places.
JSON_FIELDS = {
    "train_micro_batch_size_per_gpu": ("per_device_train_batch_size",),
    "gradient_accumulation_steps": ("gradient_accumulation_steps",),
    "train_batch_size": ("global_batch_size",),
    "gradient_clipping": ("max_grad_norm",),
    "optimizer.params.lr": ("learning_rate",),
    "optimizer.params.betas": ("adam_beta1", "adam_beta2"),
    "optimizer.params.eps": ("adam_epsilon",),
    "optimizer.params.weight_decay": ("weight_decay",),
    "scheduler.params.warmup_max_lr": ("learning_rate",),
    "scheduler.params.warmup_num_steps": ("warmup_steps",),
    "scheduler.params.total_num_steps": ("max_steps",),
    "bf16.enabled": ("bf16",),
    "fp16.enabled": ("fp16",),
}
# Fields that set another: --global_batch_size sets gradient_accumulation_steps.
SETS_ALSO = {"gradient_accumulation_steps": ("global_batch_size",)}


def explicit_fields(args) -> dict[str, str]:
    """Field -> where it was set: the parser's record, else (built in code) every field that differs from its
    default."""
    given = EXPLICIT.get()
    if given is not None:
        return given
    return {f.name: "the arguments" for f in dataclasses.fields(args) if f.init
            and getattr(args, f.name) != (f.default if f.default is not dataclasses.MISSING
                                          else f.default_factory() if f.default_factory is not dataclasses.MISSING
                                          else None)}


def adopt_ds_values(args, ds: DsConfig, explicit: dict[str, str]) -> list[str]:
    """TrainingArguments take the explicit (non-"auto") values of the DeepSpeed JSON; conflicts are problems."""
    problems, adopted = [], []
    for key, names in JSON_FIELDS.items():
        value = ds.value(key)
        if value is None or value == "auto":
            continue
        values = list(value) if len(names) > 1 and isinstance(value, list | tuple) else [value]
        if len(values) != len(names):
            continue  # malformed; ds_check names it
        for name, wanted in zip(names, values):
            setters = [n for n in (name, *SETS_ALSO.get(name, ())) if n in explicit]
            if name == "gradient_accumulation_steps" and "global_batch_size" in setters and args.global_batch_size:
                per_step = args.per_device_train_batch_size * world_size()
                current = args.global_batch_size // per_step if per_step else None
                setter = "global_batch_size"
            else:
                current, setter = getattr(args, name), (setters[0] if setters else None)
            if setter is not None:
                if not _same(current, wanted):
                    problems.append(
                        f"{ds.name} sets {key}={wanted!r} and {explicit[setter]} sets --{setter} "
                        f"{getattr(args, setter)!r}{' (so ' + name + '=' + repr(current) + ')' if setter != name else ''}"
                        f": set it in one place: write \"auto\" for {key} in {ds.name} to keep --{setter}, or drop "
                        f"--{setter} to use {ds.name}'s value.")
                continue
            if not _same(getattr(args, name), wanted):
                setattr(args, name, wanted)
                adopted.append(f"{key}={wanted!r}")
    if adopted and os.environ.get("RANK", "0") == "0":
        logger.warning("%s sets %s; using it.", ds.name, ", ".join(dict.fromkeys(adopted)))
    return problems


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b) and a is not None
    if isinstance(a, int | float) and isinstance(b, int | float):
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
    return a == b


# ---------------------------------------------------------------- SFTConfig options our loss paths must honour


def loss_option_problems(args) -> list[str]:
    """RecipeTrainer.compute_loss lets the model compute its loss without full logits (Liger's fused linear
    cross-entropy, or TRL's chunked head through Trainer.compute_loss); SFTConfig/TrainingArguments options that
    change the loss must go through SFTTrainer.compute_loss (trl) or be refused (liger). See LOSS_OPTIONS."""
    fused = args.speed.get("fused_loss")
    problems = []
    for name, (default, under_liger) in LOSS_OPTIONS.items():
        value = getattr(args, name, default)
        if value != default and fused == "liger" and under_liger:
            problems.append(f"--{name} {value}: {under_liger}; use --fused_loss trl (TRL's chunked head computes it), "
                            f"or drop --{name}.")
    if getattr(args, "use_liger_kernel", False):
        problems.append("--use_liger_kernel (HF's switch) would patch the model a second time: use this recipe's "
                        "--liger_kernels true and --fused_loss liger, which are chosen by hardware and ZeRO stage.")
    return problems


# option -> (its default, why Liger's fused loss cannot honour it, or None when it works there too)
LOSS_OPTIONS = {
    "loss_type": ("nll", "Liger's fused cross-entropy returns the mean NLL only, not the per-token log-probs DFT "
                         "reweights"),
    "label_smoothing_factor": (0.0, "the fused loss here is plain cross-entropy"),
}


def sft_loss_needed(args) -> bool:
    """Whether RecipeTrainer must take SFTTrainer.compute_loss (a loss option other than the default is set)."""
    return any(getattr(args, name, default) != default for name, (default, _) in LOSS_OPTIONS.items())


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
    rope_scaling: str | None = field(
        default=None, metadata={"help": "TYPE:FACTOR (yarn:4, linear:2, dynamic:2): stretch RoPE to FACTOR x the "
                                "model's max_position_embeddings, for --max_length beyond it. Replaces the model's "
                                "own RoPE scaling; recorded in summary.json."})

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



# ---------------------------------------------------------------- the parser


class RecipeParser(TrlParser):
    """TrlParser that names unknown flags and YAML keys with the closest known name (ConfigError, exit 2), records
    which fields the user set and where, and settles --zero_stage auto before TrainConfig is built."""

    def error(self, message: str):
        """argparse's own errors (a value outside a flag's choices, a missing value): one line with its fix, exit 2,
        instead of the usage of every flag."""
        raise ConfigError([f"{message}. (`uv run python train_ds.py --help` lists every flag and its values)"])

    def parse_args_and_config(self, args=None, return_remaining_strings=False, fail_with_unknown_args=True,
                              separate_remaining_strings=False):
        args = list(sys.argv[1:] if args is None else args)
        recipe = args[args.index("--config") + 1] if "--config" in args[:-1] else None
        keys = recipe_keys(recipe) if recipe else {}
        problems = self.unknown_problems(args, keys, recipe)
        if problems:
            raise ConfigError(problems)
        where = {k: recipe for k in keys}
        where.update({dest: "the command line" for dest in self.cli_dests(args)})
        self._explicit = where
        return super().parse_args_and_config(args, return_remaining_strings, fail_with_unknown_args,
                                             separate_remaining_strings)

    def known_flags(self) -> list[str]:
        return [s for s in self._option_string_actions if s.startswith("--")]

    def cli_dests(self, args: list[str]) -> set[str]:
        dests = set()
        for arg in args:
            action = self._option_string_actions.get(arg.split("=", 1)[0]) if arg.startswith("--") else None
            if action is not None:
                dests.add(action.dest)
        return dests

    def unknown_problems(self, args: list[str], keys: dict, recipe: str | None) -> list[str]:
        known, problems = self.known_flags(), []
        for arg in args:
            flag = arg.split("=", 1)[0]
            if arg.startswith("--") and flag not in known and flag != "--config":
                problems.append(f"unknown flag {flag}: {did_you_mean(flag, known)}")
        dests = sorted({a.dest for a in self._actions})
        for key in keys:
            if key != "env" and key not in dests:
                problems.append(f"{recipe}: unknown key {key}: {did_you_mean(key, dests)}")
        return problems

    def parse_args_into_dataclasses(self, args=None, return_remaining_strings=False, look_for_args_file=True,
                                    args_filename=None, args_file_flag=None):
        namespace, remaining = self.parse_known_args(args=args)
        if remaining and not return_remaining_strings:
            raise ConfigError([f"unexpected argument {' '.join(remaining)}: flags take the form --name value."])
        values, problems, built = vars(namespace), [], {}
        explicit = getattr(self, "_explicit", {})
        for dtype in (ScriptArguments, ModelArguments):
            try:
                built[dtype] = dtype(**inputs_for(dtype, values))
            except ConfigError as e:
                problems += e.problems
        train_inputs = inputs_for(TrainConfig, values)
        if train_inputs.get("zero_stage") == "auto" and not train_inputs.get("eval_only") and ModelArguments in built:
            try:
                plan_auto_stage(train_inputs, built[ModelArguments], explicit)
            except ConfigError as e:
                problems += e.problems
        token = EXPLICIT.set(explicit)
        try:
            built[TrainConfig] = TrainConfig(**train_inputs)
        except ConfigError as e:
            problems += e.problems
        finally:
            EXPLICIT.reset(token)
        if ModelArguments in built and TrainConfig in built:
            problems += position_problems(built[TrainConfig], built[ModelArguments])
            problems += sequence_parallel_cross_check(built[TrainConfig], built[ModelArguments])
            if built[TrainConfig].fp8 and any(getattr(built[ModelArguments], f, False) for f in QUANT_FLAGS):
                problems.append("--fp8 with --load_in_4bit/--load_in_8bit: the base weights are already quantized; "
                                "drop one.")
        if problems:
            raise ConfigError(problems)
        out = tuple(built[d] for d in self.dataclass_types)
        return (*out, remaining) if return_remaining_strings else out


def sequence_parallel_cross_check(training_args, model_args) -> list[str]:
    """--sequence_parallel_size against the model (heads, attention; config.json only, no weights); when it can
    run, the ParallelismConfig that hands it to accelerate and DeepSpeed."""
    from recipe.long_context import parallelism_config, sequence_parallel_model_problems
    from recipe.modeling import model_config

    sp = training_args.sequence_parallel_size
    if sp <= 1:
        return []
    try:
        config = model_config(model_args.model_name_or_path, model_args.model_revision, training_args.trust_remote_code)
    except (OSError, ValueError):
        config = None  # not readable here: DeepSpeed checks the heads when it wraps the attention
    problems = sequence_parallel_model_problems(sp, config, model_args.attn_implementation)
    if not problems:
        training_args.parallelism_config = parallelism_config(sp, model_args.attn_implementation)
    return problems


def position_problems(training_args, model_args) -> list[str]:
    """A --max_length beyond the positions the model was trained for needs --rope_scaling (read from config.json,
    no weights)."""
    from recipe.modeling import model_config, rope_spec

    problems = []
    try:
        spec = rope_spec(model_args.rope_scaling)
    except ValueError as e:
        return [str(e)]
    if not training_args.max_length:
        return problems
    try:
        config = model_config(model_args.model_name_or_path, model_args.model_revision,
                              training_args.trust_remote_code)
    except (OSError, ValueError):
        return problems  # not readable here (an offline hub id, a LoRA adapter folder): loading the model names that
    limit = getattr(config, "max_position_embeddings", None)
    if not limit:
        return problems
    name = model_args.model_name_or_path or "the tiny default"
    if spec is None and training_args.max_length > limit:
        factor = -(-training_args.max_length // limit)
        problems.append(f"--max_length {training_args.max_length} is beyond {name}'s max_position_embeddings {limit}: "
                        f"positions past it were never trained. Pass --rope_scaling yarn:{factor} (or linear:{factor}) "
                        f"to stretch RoPE {factor}x, or lower --max_length to {limit}.")
    elif spec is not None and training_args.max_length > limit * spec[1]:
        problems.append(f"--max_length {training_args.max_length} is beyond {limit} x {spec[1]:g} = "
                        f"{int(limit * spec[1])} positions even with --rope_scaling {model_args.rope_scaling}: raise "
                        "the factor, or lower --max_length.")
    return problems


def inputs_for(dtype, values: dict) -> dict:
    return {f.name: values[f.name] for f in dataclasses.fields(dtype) if f.init and f.name in values}


def recipe_keys(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError([f"--config {path}: cannot read it ({e.strerror})."]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"--config {path} is not valid YAML: {str(e).splitlines()[0]}. Fix the file."]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"--config {path} must hold a YAML mapping of argument: value."])
    return data


def did_you_mean(name: str, known: list[str]) -> str:
    guess = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    see = "`uv run python train_ds.py --help` lists them all"
    return f"did you mean {guess[0]}? ({see})" if guess else f"no such argument ({see})."


def make_parser() -> RecipeParser:
    parser = RecipeParser((ScriptArguments, TrainConfig, ModelArguments))
    parser.allow_abbrev = False  # a typo such as --learning_rat must fail, not match --learning_rate
    return parser


def default_recipe_argv(argv: list[str]) -> list[str]:
    """With no --config and no model, run the embedded default recipe (configs/default.yaml)."""
    if "--config" in argv or any(a.split("=")[0] == "--model_name_or_path" for a in argv):
        return argv
    return ["--config", str(DEFAULT_RECIPE), *argv]


def parse_args(argv: list[str] | None = None):
    """Parse CLI + YAML into (ScriptArguments, TrainConfig, ModelArguments); ConfigError for every problem.
    The process must be set up first (recipe.hardware.prepare_process): TrainingArguments initialise the device."""
    argv = default_recipe_argv(list(sys.argv[1:] if argv is None else argv))
    return make_parser().parse_args_and_config(argv)


# ---------------------------------------------------------------- --zero_stage auto


def plan_auto_stage(inputs: dict, model_args, explicit: dict[str, str]) -> None:
    """--zero_stage auto: the memory estimator's choice for this model on these GPUs, applied to the parsed
    TrainConfig values (config, micro-batch, accumulation, gradient checkpointing), with the reason."""
    from types import SimpleNamespace

    from recipe import estimate
    from recipe.ds_config import shipped

    say = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)
    hw = estimate.run_hardware()
    if hw is None:
        say("--zero_stage auto: no CUDA GPU, no GPU memory to plan for: using stage 2.", file=sys.stderr)
        inputs["zero_stage"] = "2"
        return
    try:
        shape = estimate.load_shape(model_args.model_name_or_path, model_args.model_revision,
                                    inputs.get("trust_remote_code", False))
    except OSError as e:
        raise ConfigError([f"--zero_stage auto needs the model's config to estimate memory: "
                           f"{model_args.model_name_or_path}: {str(e).splitlines()[0]}"]) from None
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    work = estimate.run_workload(SimpleNamespace(**{**defaults, **inputs}), model_args)
    configs = {n: ds.config for n, ds in shipped().items() if ds.runnable_here()}
    rec = estimate.recommend(shape, configs, hw, work, max_batch=work.micro_batch)
    if rec.config is None:
        raise ConfigError([f"--zero_stage auto: {rec.reason}"])
    changes = {"zero_stage": rec.config.removeprefix("stage")}
    if rec.micro_batch < work.micro_batch:
        changes["per_device_train_batch_size"] = rec.micro_batch
        if inputs.get("global_batch_size") is None:  # keep the global batch: more accumulation steps
            total = inputs.get("gradient_accumulation_steps", 1) * work.micro_batch
            changes["gradient_accumulation_steps"] = -(-total // rec.micro_batch)
    if rec.gradient_checkpointing and not work.gradient_checkpointing:
        changes["gradient_checkpointing"] = True
    inputs.update(changes)
    explicit.update({k: "--zero_stage auto" for k in changes})
    say(f"--zero_stage auto: {' '.join(f'--{k} {v}' for k, v in changes.items())}. Why: {rec.reason}.",
        file=sys.stderr)
