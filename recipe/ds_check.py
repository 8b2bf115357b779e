"""Check a DeepSpeed config dict before any weights load: every problem at once, each with its fix.

DeepSpeed ignores misspelled top-level keys, and its pydantic sections (zero_optimization, bf16, ...)
complain only at deepspeed.initialize, after the model has loaded. HF fills "auto" values and checks
the numbers it fills against TrainingArguments (transformers integrations/deepspeed.py,
HfTrainerDeepSpeedConfig); this module reports what neither does.

    errors, warnings = check_ds_config(config, "stage2.json", training={"optim": "adamw_torch", ...})
    if errors: raise ConfigError(errors)      # the caller decides; warnings are for the log

Known keys come from DeepSpeed itself (its UPPER_CASE constants, the keys its config parser reads,
the fields and aliases of its pydantic models), so a key a new DeepSpeed adds is accepted as is.
NVMe checks (libaio, a writable nvme_path) are nvme_problems. The stage and offload devices are read
through recipe.ds_config.DsConfig, as everywhere else. DeepSpeed's internal modules are imported inside the
functions through ds_attr (it names the DeepSpeed version when one moves): importing this module is cheap.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import inspect
import logging
import math
import os
import re
import typing
from functools import lru_cache
from pathlib import Path

from recipe.ds_config import (DS_MAX_IN_CPU_DEFAULT, DS_REUSE_DISTANCE_DEFAULT, DsConfig, aio_available,
                              cpu_adam_available, ds_attr)

AUTO = "auto"
IDENTIFIER = re.compile(r"[A-Za-z_]\w*\Z")
# Modules whose UPPER_CASE string constants name DeepSpeed's config keys (0.19.8).
CONSTANT_MODULES = (
    "deepspeed.runtime.constants", "deepspeed.runtime.config", "deepspeed.runtime.zero.config",
    "deepspeed.runtime.precision_config", "deepspeed.runtime.activation_checkpointing.config",
    "deepspeed.profiling.constants", "deepspeed.comm.constants", "deepspeed.runtime.swap_tensor.constants",
    "deepspeed.autotuning.constants", "deepspeed.runtime.data_pipeline.constants",
    "deepspeed.runtime.model_checkpointing.constants", "deepspeed.datastates.config", "deepspeed.utils.config",
)
# Modules whose parsers read top-level keys as literals: config["pipeline"], param_dict.get("compile", {}).
LITERAL_MODULES = ("deepspeed", "deepspeed.runtime.config", "deepspeed.runtime.tensor_parallel.config",
                   "deepspeed.comm.config")
# Sections DeepSpeedConfig._initialize_params builds with a pydantic model (extra keys are rejected).
PYDANTIC_SECTIONS = {
    "zero_optimization": "deepspeed.runtime.zero.config:DeepSpeedZeroConfig",
    "bf16": "deepspeed.runtime.precision_config:DeepSpeedBF16Config",
    "bfloat16": "deepspeed.runtime.precision_config:DeepSpeedBF16Config",  # BFLOAT16_OLD, read when bf16 is absent
    "fp16": "deepspeed.runtime.precision_config:DeepSpeedFP16Config",
    "comms_logger": "deepspeed.comm.config:CommsLoggerConfig",
    "compile": "deepspeed.compile.config:CompileConfig",
    "hybrid_engine": "deepspeed.runtime.config:HybridEngineConfig",
    "tensor_parallel": "deepspeed.runtime.tensor_parallel.config:TPTrainingConfig",
    "weight_quantization": "deepspeed.inference.config:WeightQuantConfig",
}  # + tensorboard, wandb, csv_monitor, comet: the fields of DeepSpeedMonitorConfig
# Sections read key by key with constants: (module, constant names or a name prefix). Others
# (optimizer/scheduler params, pipeline, data_efficiency, expert_parallel) are free-form here.
PLAIN_SECTIONS = {
    "optimizer": [("deepspeed.runtime.constants", ("TYPE", "OPTIMIZER_PARAMS", "LEGACY_FUSION"))],
    "scheduler": [("deepspeed.runtime.constants", ("TYPE", "SCHEDULER_PARAMS"))],
    "activation_checkpointing": [("deepspeed.runtime.activation_checkpointing.config", "ACT_CHKPT_")],
    "flops_profiler": [("deepspeed.profiling.constants", "FLOPS_PROFILER_")],
    "aio": [("deepspeed.runtime.swap_tensor.constants", "AIO_")],
    "autotuning": [("deepspeed.autotuning.constants", "")],  # AUTOTUNING_*, and MODEL_INFO for model_info
    "timers": [("deepspeed.utils.config", ("TIMERS_THROUGHPUT",))],
    "data_types": [("deepspeed.runtime.constants", ("GRAD_ACCUM_DTYPE", "PARAM_DTYPE", "BUFFER_DTYPE",
                                                    "KEEP_IN_FP32_MODULES"))],
    "checkpoint": [("deepspeed.runtime.constants", ("CHECKPOINT_TAG_VALIDATION", "LOAD_UNIVERSAL_CHECKPOINT",
                                                    "USE_NODE_LOCAL_STORAGE_CHECKPOINT", "CHECKPOINT_PARALLEL_WRITE")),
                   ("deepspeed.runtime.model_checkpointing.constants", "CHECKPOINT_")],
}
# Renamed keys DeepSpeed now ignores, whose new name difflib cannot guess.
RENAMED = {"aio.thread_count": "intra_op_parallelism"}
# "auto" that HF fills from TrainingArguments or the model (trainer_config_process/_finalize), or that
# this recipe fills, each with a stand-in value to validate the pydantic sections with.
HF_FILLS = {
    "train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0, "fp16.enabled": False, "bf16.enabled": False,
    "optimizer.params.lr": 1e-3, "optimizer.params.betas": [0.9, 0.999], "optimizer.params.eps": 1e-8,
    "optimizer.params.weight_decay": 0.0, "scheduler.params.warmup_min_lr": 0.0,
    "scheduler.params.warmup_max_lr": 1e-3, "scheduler.params.total_num_steps": 1,
    "scheduler.params.warmup_num_steps": 1,
    # hidden_size-based; accelerate fills them too
    "zero_optimization.reduce_bucket_size": 1, "zero_optimization.stage3_prefetch_bucket_size": 1,
    "zero_optimization.stage3_param_persistence_threshold": 1,
    # recipe/config.py resolve_ds_config: --nvme_path or $DS_NVME_PATH
    "zero_optimization.offload_optimizer.nvme_path": "/nvme", "zero_optimization.offload_param.nvme_path": "/nvme",
    # recipe/ds_config.py fill_model_autos, before weights load (recipe/preflight.py): the NVMe swap buffer from the
    # model's largest parameter, the partial-offload share from the memory estimate
    "zero_optimization.offload_param.buffer_size": 100_000_000, "zero_optimization.offload_optimizer.ratio": 0.5,
}
# "auto" that only accelerate's DeepSpeedPlugin fills, from its own environment defaults.
ACCELERATE_FILLS = {
    "zero_optimization.stage": "2 ($ACCELERATE_DEEPSPEED_ZERO_STAGE)",
    "zero_optimization.offload_optimizer.device": '"none" ($ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE)',
    "zero_optimization.offload_param.device": '"none" ($ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE)',
    "zero_optimization.stage3_gather_16bit_weights_on_model_save":
        "false ($ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL)",
}
# DeepSpeed optimizer types (lower case) whose optimizer is in ZeRO's tested list
# (runtime/zero/utils.py ZERO_SUPPORTED_OPTIMIZERS) and that have a CPU version for offload
# (runtime/engine.py _configure_basic_optimizer); others need zero_allow_untested_optimizer.
ZERO_TESTED = {"adam", "adamw", "adagrad", "lion", "muon"}
CPU_ADAM_TYPES = {"adam", "adamw", "muon"}  # built as DeepSpeedCPUAdam under offload
# HF --optim values accelerate's map_pytorch_optim_to_deepspeed turns into their own CPU version
# (torch AdamW -> DeepSpeedCPUAdam adamw_mode, Adagrad -> DeepSpeedCPUAdagrad); any other becomes CPUAdam.
HF_OPTIM_KEPT_UNDER_OFFLOAD = {"adamw_torch", "adamw_torch_fused", "adagrad"}
HF_DEFAULT_OPTIMS = {"adamw_torch", "adamw_torch_fused"}
HF_DEFAULT_SCHEDULER = "linear"


def check_ds_config(config: dict, name: str = "ds_config", training: dict | None = None,
                    cpu_adam=cpu_adam_available) -> tuple[list[str], list[str]]:
    """Return (errors, warnings): every problem at once, each message naming the key path and its fix.

    training: the TrainingArguments values in effect (bf16, fp16, optim, lr_scheduler_type,
    per_device_train_batch_size, gradient_accumulation_steps, world_size, save_final_model, ...);
    a missing key is not checked. cpu_adam: zero-arg callable, whether CPUAdam can build here.
    """
    training = training or {}
    errors = unknown_key_problems(config, name) + auto_problems(config, name)
    errors += value_problems(config, name, training)
    errors += zero_problems(config, name)
    errors += low_precision_state_problems(config, name, training)
    errors += zenflow_problems(config, name, training)
    errors += optimizer_problems(config, name, training, cpu_adam)
    errors += batch_problems(config, name, training.get("world_size"))
    warnings = deprecated_key_warnings(config, name) + training_warnings(config, name, training)
    warnings += low_precision_state_warnings(config, name)
    return errors, warnings


def msg(name: str, path: str, problem: str, fix: str) -> str:
    """One line: the file, the key path, what is wrong, and the fix."""
    return f"{name}: {path}: {problem}; fix: {fix}"


# ---------------------------------------------------------------- known keys, from DeepSpeed


def _strings(module: str, names: str | tuple[str, ...] = "") -> set[str]:
    """String values of a module's UPPER_CASE constants: those named, or all with the prefix."""
    mod = ds_attr(module)
    found = set()
    for attr, value in vars(mod).items():
        chosen = attr in names if isinstance(names, tuple) else attr.startswith(names)
        if (chosen and attr.isupper() and not attr.endswith(("_DEFAULT", "_FORMAT")) and isinstance(value, str)
                and IDENTIFIER.match(value)):
            found.add(value)
    return found


def _literal_keys(module: str) -> set[str]:
    """String literals a parser uses as keys: x["k"], x.get("k", ...), "k" in x."""
    keys = set()
    for node in ast.walk(ast.parse(inspect.getsource(ds_attr(module)))):
        if isinstance(node, ast.Subscript):
            candidates = [node.slice]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            candidates = node.args[:1]
        elif isinstance(node, ast.Compare) and isinstance(node.ops[0], (ast.In, ast.NotIn)):
            candidates = [node.left]
        else:
            continue
        keys |= {c.value for c in candidates if isinstance(c, ast.Constant) and isinstance(c.value, str)
                 and IDENTIFIER.match(c.value)}
    return keys


def _model(spec: str):
    module, cls = spec.split(":")
    return ds_attr(module, cls)


@lru_cache(maxsize=1)
def pydantic_sections() -> dict:
    from deepspeed.monitor.config import DeepSpeedMonitorConfig

    sections = {key: _model(spec) for key, spec in PYDANTIC_SECTIONS.items()}
    sections.update({key: field.annotation for key, field in DeepSpeedMonitorConfig.model_fields.items()})
    return sections


@lru_cache(maxsize=1)
def plain_sections() -> dict[str, set[str]]:
    return {key: set().union(*(_strings(m, names) for m, names in sources)) for key, sources in PLAIN_SECTIONS.items()}


@lru_cache(maxsize=1)
def removed_keys() -> dict[str, str]:
    """Keys DeepSpeedConfig rejects as removed features (runtime/config.py _reject_removed_config_keys)."""
    from deepspeed.runtime import config as ds_config

    removed = dict(getattr(ds_config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {}))
    zero = getattr(ds_config, "_REMOVED_ZERO_CONFIG_KEYS", {})
    return removed | {f"zero_optimization.{key}": reason for key, reason in zero.items()}


@lru_cache(maxsize=1)
def top_level_keys() -> frozenset[str]:
    """Generous on purpose: flagging a valid key is far worse than missing a typo."""
    keys = set().union(*(_strings(m) for m in CONSTANT_MODULES), *(_literal_keys(m) for m in LITERAL_MODULES))
    return frozenset(keys | set(pydantic_sections()) | set(plain_sections())
                     | {k for k in removed_keys() if "." not in k})


def model_keys(model) -> set[str]:
    """A pydantic model's field names and aliases (deprecated fields included: DeepSpeed still reads them)."""
    return {k for name, f in model.model_fields.items() for k in (name, f.alias) if k}


def _field(model, key: str):
    for name, f in model.model_fields.items():
        if key in (name, f.alias):
            return f
    return None


def submodel(model, key: str):
    """The pydantic model a field holds (Optional[Model] included), or None."""
    from pydantic import BaseModel

    f = _field(model, key)
    for t in (f.annotation, *typing.get_args(f.annotation)) if f else ():
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


# ---------------------------------------------------------------- check 1: unknown keys


def unknown_key_problems(config: dict, name: str) -> list[str]:
    """Keys DeepSpeed does not read, at the top level and inside the sections it defines."""
    problems = _unknown_in(config, top_level_keys(), "", name)
    for key, value in config.items():
        spec = pydantic_sections().get(key) or plain_sections().get(key)
        if spec is not None and isinstance(value, dict) and key not in removed_keys():
            problems += _unknown_in(value, spec, f"{key}.", name)
    return problems


def _unknown_in(section: dict, spec, prefix: str, name: str) -> list[str]:
    """spec: a set of known keys, or a pydantic model (recursing into the models it holds)."""
    plain = isinstance(spec, (set, frozenset))
    known, problems = spec if plain else model_keys(spec), []
    for key, value in section.items():
        path = prefix + key
        if path in removed_keys():
            reason = removed_keys()[path].strip().rstrip(".")
            problems.append(msg(name, path, f"removed from DeepSpeed, which rejects it: {reason}", "delete it"))
        elif key not in known:
            problems.append(_unknown(name, path, key, known, plain))
        elif not plain and isinstance(value, dict) and submodel(spec, key):
            problems += _unknown_in(value, submodel(spec, key), path + ".", name)
    return problems


def _unknown(name: str, path: str, key: str, known, plain: bool) -> str:
    where = "DeepSpeed ignores it silently" if plain else \
        "DeepSpeed rejects it at deepspeed.initialize, after the model loads"
    guess = [RENAMED[path]] if path in RENAMED else difflib.get_close_matches(key, sorted(known), n=1)
    if guess:
        fix = f"did you mean {guess[0]}?"
    elif len(known) <= 12:
        fix = f"remove it (known here: {', '.join(sorted(known))})"
    else:
        fix = "remove it, or see https://www.deepspeed.ai/docs/config-json/"
    return msg(name, path, f"unknown key ({where})", fix)


def deprecated_key_warnings(config: dict, name: str) -> list[str]:
    warnings = []
    if "bfloat16" in config:
        warnings.append(msg(name, "bfloat16", "legacy name of bf16 (read only when bf16 is absent; HF fills only "
                            "bf16.enabled)", "rename it to bf16"))
    for key, model in pydantic_sections().items():
        if isinstance(config.get(key), dict):
            warnings += _deprecated_in(config[key], model, f"{key}.", name)
    return warnings


def _deprecated_in(section: dict, model, prefix: str, name: str) -> list[str]:
    warnings = []
    for key, value in section.items():
        f = _field(model, key)
        extra = (f.json_schema_extra if f else None) or {}
        if isinstance(extra, dict) and extra.get("deprecated"):
            new = _field(model, extra.get("new_param", ""))
            new_name = (new.alias or extra["new_param"]) if new else extra.get("new_param", "its replacement")
            warnings.append(msg(name, prefix + key, "deprecated in DeepSpeed", f"use {new_name}"))
        elif isinstance(value, dict) and f and submodel(model, key):
            warnings += _deprecated_in(value, submodel(model, key), f"{prefix}{key}.", name)
    return warnings


# ---------------------------------------------------------------- checks 2 and 5: "auto", values


def _leaves(section: dict, prefix: str = ""):
    for key, value in section.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def auto_problems(config: dict, name: str) -> list[str]:
    """"auto" where neither HF nor this recipe fills it: accelerate raises on it after the model loads."""
    problems = []
    for path, value in _leaves(config):
        if value != AUTO or path in HF_FILLS:
            continue
        if path in ACCELERATE_FILLS:
            problem = f'"auto" here is filled only by accelerate, with its default {ACCELERATE_FILLS[path]}, ' \
                      "whatever this recipe asks for"
        else:
            problem = '"auto" here is filled neither by HF (from TrainingArguments or the model) nor by this recipe: ' \
                      "accelerate raises on it at prepare, after the model loads"
        fix = "set 0, 1, 2 or 3" if path == "zero_optimization.stage" else \
            "set a value, or remove the key to get DeepSpeed's default"
        problems.append(msg(name, path, problem, fix))
    return problems


def _stand_ins(section: dict, prefix: str, training: dict) -> dict:
    """The section as DeepSpeed will see it: HF-filled "auto" replaced, other "auto" dropped (reported above)."""
    out = {}
    for key, value in section.items():
        path = prefix + key
        if isinstance(value, dict):
            out[key] = _stand_ins(value, path + ".", training)
        elif value != AUTO:
            out[key] = value
        elif path in ("bf16.enabled", "fp16.enabled"):
            out[key] = bool(training.get(path.split(".")[0], False))
        elif path in HF_FILLS:
            out[key] = HF_FILLS[path]
    return out


def value_problems(config: dict, name: str, training: dict) -> list[str]:
    """Instantiate each pydantic section as deepspeed.initialize will, and turn its errors into ours."""
    problems = []
    for key in [*pydantic_sections(), *plain_sections()]:
        value = config.get(key)
        if value is not None and not isinstance(value, dict):
            problems.append(msg(name, key, f"must be a JSON object, not {value!r}", f'write "{key}": {{...}}'))
        elif key in pydantic_sections() and value is not None:
            problems += _instantiate(pydantic_sections()[key], _stand_ins(value, key + ".", training), key, name)
    return problems


@contextlib.contextmanager
def _quiet_deepspeed():
    """DeepSpeed logs its own deprecation warnings while validating; ours say the same with the file name."""
    from deepspeed.utils import logger

    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _instantiate(model, data: dict, path: str, name: str) -> list[str]:
    """Validate; after field errors, drop the bad keys and validate again for the model-level checks."""
    from pydantic import ValidationError

    problems: list[str] = []
    for _ in range(5):
        try:
            with _quiet_deepspeed():
                model(**data)
            return problems
        except ValidationError as e:
            errors = e.errors()
        except Exception as e:  # DeepSpeed's asserts in its deprecated-field handling
            return problems + [msg(name, path, str(e).strip().rstrip("."), "change the settings it names")]
        for err in errors:
            text = _pydantic_message(name, path, model, err)
            if err["type"] != "extra_forbidden" and text not in problems:  # unknown keys: reported once, above
                problems.append(text)
        if not any(_drop(data, err["loc"]) for err in errors):
            return problems
    return problems


def _drop(data: dict, loc: tuple) -> bool:
    for part in loc[:-1]:
        data = data.get(part) if isinstance(data, dict) else None
    if not loc or not isinstance(data, dict) or loc[-1] not in data:
        return False
    del data[loc[-1]]
    return True


def _pydantic_message(name: str, path: str, model, err: dict) -> str:
    text = err["msg"].removeprefix("Assertion failed, ").removeprefix("Value error, ").strip().rstrip(".")
    if err["type"] == "enum":  # "Input should be 0, 1, 2, 3 or 3" (ZeroStageEnum.max_stage): list each once
        text = "must be one of " + ", ".join(dict.fromkeys(re.split(r", | or ", err["ctx"]["expected"])))
    if not err["loc"]:
        return msg(name, path, text, "change the settings it names")
    full = ".".join([path, *map(str, err["loc"])])
    default = _default(model, err["loc"])
    fix = "set a valid value" + (f" (DeepSpeed's default: {default!r})" if default is not None else "")
    return msg(name, full, f"{err['input']!r} is invalid: {text}", fix)


def _default(model, loc: tuple):
    for part in loc[:-1]:
        model = submodel(model, str(part)) if model else None
    f = _field(model, str(loc[-1])) if model else None
    return None if f is None or f.is_required() else f.get_default(call_default_factory=True)


# ---------------------------------------------------------------- check 3: combinations


def _zero(config: dict) -> dict:
    zero = config.get("zero_optimization")
    return zero if isinstance(zero, dict) else {}


def _zero_value(config: dict, field: str):
    """A DeepSpeedZeroConfig field as written: by its alias (stage3_...), its name, or a deprecated name
    DeepSpeed maps onto it (stage3_gather_fp16_weights_on_model_save)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fields = DeepSpeedZeroConfig.model_fields
    names = [fields[field].alias, field] + [name for name, f in fields.items()
                                            if isinstance(f.json_schema_extra, dict)
                                            and f.json_schema_extra.get("new_param") == field]
    return next((_zero(config)[n] for n in names if n in _zero(config)), None)


def _stage(config: dict) -> int | None:
    """The ZeRO stage when it is valid ("auto" as accelerate fills it; invalid ones are reported by value_problems)."""
    return DsConfig(config).stage


def offload_device(config: dict, key: str) -> str | None:
    """The offload device ("cpu", "nvme") of offload_optimizer/offload_param, or None."""
    return DsConfig(config).offload(key)


def _enabled(config: dict, key: str) -> bool:
    return isinstance(config.get(key), dict) and config[key].get("enabled") is True


def zero_problems(config: dict, name: str) -> list[str]:
    if "zero_optimization" not in config:
        return [msg(name, "zero_optimization", "missing: accelerate's DeepSpeedPlugin requires the section",
                    'add "zero_optimization": {"stage": 0} (or 1, 2, 3)')]
    stage, problems = _stage(config), []
    for key in ("offload_optimizer", "offload_param"):
        device = offload_device(config, key)
        if device is None:
            continue
        path = f"zero_optimization.{key}.device"
        if stage == 0:
            problems.append(msg(name, path, f'"{device}" at stage 0: ZeRO is off and offloads nothing',
                                "set stage 2 or 3 (ds_configs/stage2_offload.json, stage3_offload.json), or remove "
                                f"zero_optimization.{key}"))
        elif key == "offload_param" and stage in (1, 2):
            problems.append(msg(name, path, f'"{device}" at stage {stage}: only stage 3 partitions and offloads '
                                "parameters, DeepSpeed ignores it below", f"set stage 3, or remove {key}"))
        elif device == "nvme" and stage in (1, 2):
            problems.append(msg(name, path, f'"nvme" at stage {stage}: stages 1 and 2 treat any device as cpu '
                                "(NVMe optimizer offload is ZeRO-Infinity, stage 3)", 'set stage 3, or device "cpu"'))
    if _enabled(config, "bf16") and _enabled(config, "fp16"):
        problems.append(msg(name, "bf16.enabled", "true together with fp16.enabled: DeepSpeed allows one",
                            'set one of them to false, or both to "auto" (HF fills them from --bf16/--fp16)'))
    return problems


def low_precision_state_problems(config: dict, name: str, training: dict) -> list[str]:
    """bf16.bf16_master_weights_and_grads / bf16_optimizer_states as DeepSpeed 0.19.8 accepts them (runtime/config.py,
    base_optimizer._configure_master_weights): ZeRO 1-3, the states only with the master weights, the master weights
    without bf16 states only under CPU optimizer offload; and a bf16 run, whose weights they copy."""
    ds = DsConfig(config)
    master, states = ds.bf16_master_weights, ds.bf16_optimizer_states
    if not (master or states):
        return []
    problems = []
    key = "bf16.bf16_master_weights_and_grads" if master else "bf16.bf16_optimizer_states"
    if states and not master:
        problems.append(msg(name, "bf16.bf16_optimizer_states", "true without bf16_master_weights_and_grads: "
                            "DeepSpeed keeps bf16 moments only beside bf16 master weights",
                            'add "bf16_master_weights_and_grads": true to the bf16 section, or remove it'))
    if ds.stage == 0:
        problems.append(msg(name, key, "at stage 0: only ZeRO's optimizers (stages 1-3) keep master weights",
                            "set stage 1-3 (ds_configs/stage2_offload_bf16.json), or remove it"))
    if master and not states and ds.offload_optimizer != "cpu":
        problems.append(msg(name, key, "without bf16_optimizer_states and without CPU optimizer offload: "
                            "DeepSpeed asks for DeepSpeedCPUAdam for fp32 moments beside bf16 master weights",
                            'add "bf16_optimizer_states": true, or offload_optimizer {"device": "cpu"}'))
    if training.get("bf16") is False:
        problems.append(msg(name, key, f"with an {'fp16' if training.get('fp16') else 'fp32'} run: the master "
                            "weights and moments are bf16 copies of bf16 weights", "train in bf16 (--bf16 true, "
                            "on CPU too), or use the file without the bf16 states (ds_configs/stage2_offload.json)"))
    return problems


def low_precision_state_warnings(config: dict, name: str) -> list[str]:
    """What bf16 master weights cost, measured (results/benchmarks/2026-12-02_NVIDIA-H200-bf16-states/)."""
    if not DsConfig(config).bf16_master_weights:
        return []
    return [msg(name, "bf16.bf16_master_weights_and_grads", "bf16 master weights round every update to the weight's "
                "bf16 step, and smaller updates are lost: on one H200 (Llama-3.2-1B shape cut to 4 layers, lr 1e-5, "
                "100 steps) the loss fell 0.01 against 0.27 with fp32 states, for 36% less host memory and a 1.33x "
                "faster CPU step", "use it only where fp32 states do not fit the host, with a learning rate the bf16 "
                "weights can resolve, and watch the loss")]


def zenflow_problems(config: dict, name: str, training: dict) -> list[str]:
    """ZenFlow (zero_optimization.zenflow) in DeepSpeed 0.19.8 extends ZeRO-Offload (stages 1-2 here: engine.py builds
    ZenFlowZeroOptimizer for them) and owns the accumulation: its update_interval is the engine's accumulation count
    (zenflow/engine.configure_zenflow), and it needs engine.step() after every backward, which recipe.trainer
    arranges. The Trainer's own accumulation on top would step the whole model at the Trainer's boundaries."""
    ds = DsConfig(config)
    if ds.zenflow is None:
        return []
    problems = []
    if ds.stage not in (1, 2) or ds.offload_optimizer != "cpu":
        problems.append(msg(name, "zero_optimization.zenflow", f"with stage {ds.stage} and offload_optimizer "
                            f"{ds.offload_optimizer or 'none'}: ZenFlow extends ZeRO-Offload at stages 1-2",
                            'use stage 2 with offload_optimizer {"device": "cpu"} (ds_configs/stage2_offload_zenflow.json), '
                            "or remove zenflow"))
    steps = training.get("gradient_accumulation_steps")
    if isinstance(steps, int) and steps > 1:
        problems.append(msg(name, "zero_optimization.zenflow.update_interval", f"with --gradient_accumulation_steps "
                            f"{steps}: ZenFlow accumulates itself (update_interval steps between full updates)",
                            "pass --gradient_accumulation_steps 1 and set update_interval to the accumulation you "
                            "want"))
    return problems


# ---------------------------------------------------------------- checks 3 and 4: optimizer and offload


def _optimizer_kind(otype: str) -> str | None:
    """"ds" (a DeepSpeed type, any case), "torch" (a torch.optim class, exact case) or None."""
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    if otype.lower() in DEEPSPEED_OPTIMIZERS:
        return "ds"
    cls = getattr(torch.optim, otype, None)
    return "torch" if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) else None


def _optimizer_names() -> list[str]:
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    torch_names = [n for n, c in vars(torch.optim).items()
                   if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer]
    return sorted(set(torch_names) | set(DEEPSPEED_OPTIMIZERS))


def _plain(value) -> str | None:
    """A TrainingArguments enum (OptimizerNames, SchedulerType) or string, as its string value."""
    return None if value is None else str(getattr(value, "value", value))


def optimizer_problems(config: dict, name: str, training: dict, cpu_adam) -> list[str]:
    section = config.get("optimizer")
    if isinstance(section, dict):
        problems, uses_cpu_adam = _ds_optimizer_problems(section, config, name)
    else:
        problems, uses_cpu_adam = _hf_optimizer_problems(config, name, training)
    device = offload_device(config, "offload_optimizer")
    if uses_cpu_adam and device and not cpu_adam():
        problems.append(msg(name, "zero_optimization.offload_optimizer.device",
                            f'"{device}" runs the optimizer as DeepSpeed\'s CPUAdam op, which cannot be built here '
                            "(DeepSpeed compiles it at start-up)", "install a C++ compiler and the Python headers "
                            "(apt install g++ python3-dev), or use a config without offload (--zero_stage 2 or 3)"))
    return problems + _scheduler_problems(config, name)


def _ds_optimizer_problems(section: dict, config: dict, name: str) -> tuple[list[str], bool]:
    """A DeepSpeed `optimizer` section: HF hands DeepSpeed a DummyOptim and DeepSpeed builds this type."""
    otype = section.get("type")
    if not isinstance(otype, str):
        return [msg(name, "optimizer.type", f"missing or not a string ({otype!r})",
                    'set "type": "AdamW", or remove the optimizer section to use --optim')], False
    kind, problems = _optimizer_kind(otype), []
    if kind is None:
        guess = difflib.get_close_matches(otype, _optimizer_names(), n=1, cutoff=0.5)
        problems.append(msg(name, "optimizer.type", f"{otype!r} is neither a DeepSpeed optimizer nor a torch.optim "
                            "class", f"did you mean {guess[0]}?" if guess else "use AdamW"))
        return problems, False
    lower, stage, device = otype.lower(), _stage(config), offload_device(config, "offload_optimizer")
    untested = kind == "torch" or lower not in ZERO_TESTED
    if untested and stage and not config.get("zero_allow_untested_optimizer"):
        problems.append(msg(name, "optimizer.type", f"{otype!r} is not in ZeRO's tested optimizers: DeepSpeed "
                            "asserts at deepspeed.initialize",
                            'add "zero_allow_untested_optimizer": true, or use AdamW'))
    if device and kind == "ds" and lower not in ZERO_TESTED:
        problems.append(msg(name, "optimizer.type", f"{otype!r} has no CPU version in DeepSpeed, and "
                            f'zero_optimization.offload_optimizer.device "{device}" runs the optimizer on the CPU',
                            "use AdamW (DeepSpeedCPUAdam), Adagrad or Lion, or remove offload_optimizer"))
    if isinstance(section.get("params"), dict) and "max_grad_norm" in section["params"]:
        problems.append(msg(name, "optimizer.params.max_grad_norm", "DeepSpeed raises on it",
                            'remove it and set top-level "gradient_clipping" ("auto": HF fills --max_grad_norm)'))
    return problems, kind == "ds" and lower in CPU_ADAM_TYPES


def _hf_optimizer_problems(config: dict, name: str, training: dict) -> tuple[list[str], bool]:
    """No `optimizer` section: HF builds --optim, and accelerate may swap it under optimizer offload."""
    force = config.get("zero_force_ds_cpu_optimizer", True)
    if not offload_device(config, "offload_optimizer") or not force:
        return [], False
    optim = _plain(training.get("optim"))
    if optim is None or optim in HF_OPTIM_KEPT_UNDER_OFFLOAD:
        return [], optim != "adagrad"
    return [msg(name, "zero_optimization.offload_optimizer",
                f"with no optimizer section, accelerate replaces --optim {optim} with DeepSpeedCPUAdam "
                "(map_pytorch_optim_to_deepspeed, as zero_force_ds_cpu_optimizer is true)",
                'use --optim adamw_torch, or set "zero_force_ds_cpu_optimizer": false to run '
                f"{optim} on the CPU (slow)")], True


def _scheduler_problems(config: dict, name: str) -> list[str]:
    section = config.get("scheduler")
    stype = section.get("type") if isinstance(section, dict) else None
    if not isinstance(stype, str):
        return []
    import torch
    from deepspeed.runtime import lr_schedules

    if hasattr(lr_schedules, stype) or hasattr(torch.optim.lr_scheduler, stype):
        return []
    guess = difflib.get_close_matches(stype, lr_schedules.VALID_LR_SCHEDULES, n=1, cutoff=0.5)
    return [msg(name, "scheduler.type", f"{stype!r} is neither a DeepSpeed schedule nor a torch lr_scheduler "
                "(DeepSpeed asserts at deepspeed.initialize)",
                f"did you mean {guess[0]}?" if guess else "remove the scheduler section to use --lr_scheduler_type")]


# ---------------------------------------------------------------- check 5: batch sizes, TrainingArguments


def batch_problems(config: dict, name: str, world_size: int | None) -> list[str]:
    """train_batch_size = micro x accumulation x world size, decided by DeepSpeed's own DeepSpeedConfig arithmetic
    (it derives a missing key by integer division, then asserts the product) at this run's world size, before any
    process group exists (DeepSpeedConfig itself would take world size 1 there). HF checks only "auto"-free values
    against TrainingArguments, one at a time."""
    keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    values, problems = {}, []
    for key in keys:
        value = config.get(key)
        if value is None or value == AUTO:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(msg(name, key, f"{value!r} is not a positive integer", 'set one, or "auto"'))
        else:
            values[key] = value
    if problems or AUTO in (config.get(k) for k in keys) or "train_batch_size" not in values:
        return problems
    from types import SimpleNamespace

    deepspeed_config = ds_attr("deepspeed.runtime.config", "DeepSpeedConfig")
    world = world_size
    if world is None:  # not known here: any count that makes the given keys multiply out will do
        known = math.prod(values.get(k, 1) for k in keys[1:])
        world = values["train_batch_size"] // known if values["train_batch_size"] % known == 0 else 1
    view = SimpleNamespace(**{k: values.get(k) for k in keys}, world_size=max(world, 1))
    try:
        deepspeed_config._set_batch_related_parameters(view)
        deepspeed_config._batch_assertion(view)
        return []
    except AssertionError:
        pass
    train, micro, accum = (values.get(k) for k in keys)
    factors = [(v, label) for v, label in ((micro, "micro"), (accum, "accumulation"), (world_size, "processes")) if v]
    shown = " x ".join(f"{v} ({label})" for v, label in factors)
    problem = (f"{train} != {shown} = {math.prod(v for v, _ in factors)}" if len(factors) == 3
               else f"{train} is not a multiple of {shown}")
    return [msg(name, "train_batch_size", problem, 'set the three batch keys to "auto" (HF fills them from '
                "--per_device_train_batch_size and --gradient_accumulation_steps), or make them agree")]


def training_warnings(config: dict, name: str, training: dict) -> list[str]:
    warnings = []
    optim = _plain(training.get("optim"))
    if isinstance(config.get("optimizer"), dict) and optim and optim not in HF_DEFAULT_OPTIMS:
        warnings.append(msg(name, "optimizer", f"HF uses this DeepSpeed optimizer and ignores --optim {optim}",
                            "remove the optimizer section to use --optim, or drop --optim"))
    scheduler = _plain(training.get("lr_scheduler_type"))
    if isinstance(config.get("scheduler"), dict) and scheduler and scheduler != HF_DEFAULT_SCHEDULER:
        warnings.append(msg(name, "scheduler", f"HF uses this DeepSpeed scheduler and ignores --lr_scheduler_type "
                            f"{scheduler}", "remove the scheduler section to use --lr_scheduler_type"))
    gather = _zero_value(config, "gather_16bit_weights_on_model_save")
    if _stage(config) == 3 and training.get("save_final_model") and gather is not True:
        warnings.append(msg(name, "zero_optimization.stage3_gather_16bit_weights_on_model_save",
                            "not true at stage 3: the saved model/ folder would hold no weights (only a ZeRO "
                            "checkpoint, to convert with zero_to_fp32.py)", "set it true"))
    return warnings


# ---------------------------------------------------------------- NVMe


def nvme_problems(ds: DsConfig, aio=aio_available) -> list[str]:
    """NVMe offload needs libaio and a writable directory: say so before any weights load."""
    paths = ds.nvme_paths
    if not paths:
        return []
    problems = []
    for path in paths:
        if not Path(path).is_dir() or not os.access(path, os.W_OK):
            problems.append(f"NVMe offload path {path} is not a writable directory: create it "
                            f"(mkdir -p {path}) on a local NVMe disk, or pass another --nvme_path.")
    if not aio():
        problems.append("NVMe offload needs DeepSpeed's async_io op, which needs libaio: install it "
                        "(apt install libaio-dev, or conda install -c conda-forge libaio) and rerun, or use "
                        "--zero_stage 3_offload (CPU memory instead of NVMe).")
    return problems


def nvme_buffer_problems(config: dict, name: str, largest_param: int, world_size: int,
                         largest_name: str = "the model's largest parameter", n_params: int | None = None) -> list[str]:
    """NVMe parameter offload keeps each parameter's partition in one swap buffer of offload_param.buffer_size
    elements, and DeepSpeed asserts at the first forward ("More elements N than buffer size M") when one is larger:
    DeepSpeed's default 1e8 is below every Llama-3 embedding (128256 x hidden) on one process. "auto" is filled from
    the model (recipe.ds_config.fill_model_autos) and passes. With n_params, also the swap buffers' count:
    nvme_reuse_problems."""
    from recipe.ds_config import param_buffer_elements

    ds = DsConfig(config)
    size = ds.param_buffer_size
    reuse = nvme_reuse_problems(config, name, n_params, world_size) if n_params else []
    if size is None or size == AUTO or isinstance(size, bool) or not isinstance(size, int | float):
        return reuse  # no NVMe parameter offload, "auto", or a non-number (value_problems names that)
    partition = -(-int(largest_param) // max(1, int(world_size)))
    if size >= partition:
        return reuse
    written = "" if "buffer_size" in (_zero(config).get("offload_param") or {}) else " (absent: DeepSpeed's default)"
    per = f", {partition:,} per process on {world_size} processes" if world_size > 1 else ""
    return [msg(name, "zero_optimization.offload_param.buffer_size",
                f"{int(size):,} elements{written} is smaller than {largest_name}: {int(largest_param):,} elements"
                f"{per}; DeepSpeed stops at the first forward with \"More elements {partition} than buffer size "
                f"{int(size)}\"", f'set it to "auto" (filled from the model: '
                f"{param_buffer_elements(largest_param, world_size):,} here), or at least {partition:,}")] + reuse


def nvme_reuse_problems(config: dict, name: str, n_params: int, world_size: int) -> list[str]:
    """Past offload_param.max_in_cpu elements per process, NVMe-offloaded parameters are swapped in through
    buffer_count swap buffers, one parameter each. ZeRO-3 keeps a gathered parameter (and so its buffer) while its
    next use is within stage3_max_reuse_distance elements, and once the first step has recorded the trace (from step
    2) the parameters kept outnumber the buffers: DeepSpeed stops with "Not enough buffers 0 for swapping 1". Seen on
    an H200 with the Llama-3.2-1B shape (1.24B parameters against max_in_cpu 1e9, reuse distance 1e9, 5 buffers: at
    layer 10 of 16, 2026-12-02) and reproduced on CPU (a 0.16B model with max_in_cpu 0); a reuse distance of 0
    trains the same run to the same loss."""
    ds = DsConfig(config)
    if ds.offload_param != "nvme":
        return []
    zero = _zero(config)
    in_cpu = ds.offload_value("offload_param", "max_in_cpu")
    in_cpu = DS_MAX_IN_CPU_DEFAULT if in_cpu is None else in_cpu
    reuse = zero.get("stage3_max_reuse_distance", DS_REUSE_DISTANCE_DEFAULT)
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (in_cpu, reuse)):
        return []  # value_problems names a non-number
    per_process = -(-int(n_params) // max(1, int(world_size)))
    if reuse <= 0 or per_process <= in_cpu:
        return []  # parameters released after each use, or all of them held in CPU memory (no swap buffers)
    written = "" if "stage3_max_reuse_distance" in zero else " (absent: DeepSpeed's default)"
    return [msg(name, "zero_optimization.stage3_max_reuse_distance",
                f"{reuse:,.0f}{written} with parameters on NVMe: the model's {per_process:,} parameter elements per "
                f"process exceed offload_param.max_in_cpu ({in_cpu:,.0f}), so those past it are swapped in through "
                "offload_param.buffer_count buffers, and ZeRO-3 holds every parameter reused within that distance "
                "(its buffer with it); from the second step "
                "DeepSpeed stops with \"Not enough buffers 0 for swapping 1\"",
                "set stage3_max_reuse_distance to 0 (as the shipped stage3_nvme.json does), or raise max_in_cpu "
                "above the model's parameters if the host holds them")]
