"""The DeepSpeed config in use: which file, its dict, and the facts the rest of the recipe reads from it.

    ds = resolve("ds_configs/stage3.json", zero_stage=None, nvme_path=None)   # or zero_stage="3"
    ds.stage, ds.offload_optimizer, ds.offload_param, ds.nvme_paths, ds.gathers_16bit, ds.partial_offload
    fill_model_autos(config, largest_param=..., world_size=..., offload_ratio=...)   # the "auto" the model settles

One reader for each fact (ds_check, the estimator, resume, the speed choices and the summary all ask a DsConfig),
so `"stage": "auto"` means the same everywhere: what accelerate's DeepSpeedPlugin fills it with
($ACCELERATE_DEEPSPEED_ZERO_STAGE, default 2). Which DeepSpeed ops can build on this machine (CPUAdam, async_io)
is asked here too, and `ds_attr` imports DeepSpeed's internal names behind a guard that names the version.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import os
from pathlib import Path

from recipe import REPO_ROOT
from recipe.errors import ConfigError

DS_CONFIG_DIR = REPO_ROOT / "ds_configs"
DEFAULT_DS_CONFIG = DS_CONFIG_DIR / "stage2.json"
TESTED_DEEPSPEED = "0.19.8"
OFFLOAD_KEYS = ("offload_optimizer", "offload_param")
DS_PARAM_BUFFER_DEFAULT = 100_000_000  # offload_param.buffer_size when absent (offload_config.py, 0.19.8)
DS_MAX_IN_CPU_DEFAULT = 1_000_000_000  # offload_param.max_in_cpu when absent (offload_config.py, 0.19.8)
DS_REUSE_DISTANCE_DEFAULT = 1_000_000_000  # zero_optimization.stage3_max_reuse_distance when absent (zero/config.py)
BUFFER_ALIGN = 2**20  # elements: a filled buffer_size is rounded up to this (2 MiB in bf16)


def ds_attr(module: str, name: str | None = None):
    """A DeepSpeed module (or a name in it) that is not DeepSpeed's public API; when a DeepSpeed release moves it,
    say which version this recipe was written against instead of a bare ImportError deep in a run."""
    try:
        mod = importlib.import_module(module)
        return mod if name is None else getattr(mod, name)
    except (ImportError, AttributeError) as e:
        import deepspeed

        raise RuntimeError(f"DeepSpeed {deepspeed.__version__} has no {module}{'.' + name if name else ''} ({e}); "
                           f"this recipe reads it as DeepSpeed {TESTED_DEEPSPEED} has it: `uv sync --frozen` installs "
                           f"that version.") from e


def accelerate_default_stage() -> int:
    """What accelerate's DeepSpeedPlugin fills `"stage": "auto"` with."""
    value = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    return int(value) if value.isdigit() else 2


@dataclasses.dataclass(frozen=True)
class DsConfig:
    """A loaded DeepSpeed config and the file it came from (None for a dict given in code)."""

    config: dict
    path: str | None = None

    @property
    def name(self) -> str:
        """The file name messages use (stage2.json), or ds_config.json for a dict."""
        return Path(self.path).name if self.path else "ds_config.json"

    @property
    def stem(self) -> str:
        return Path(self.path).stem if self.path else "custom-ds"

    @property
    def zero(self) -> dict:
        zero = self.config.get("zero_optimization")
        return zero if isinstance(zero, dict) else {}

    @property
    def stage(self) -> int | None:
        """The ZeRO stage: 0-3, "auto" as accelerate fills it, None when the value is invalid (ds_check says so)."""
        stage = self.zero.get("stage", 0)
        if stage == "auto":
            return accelerate_default_stage()
        return stage if isinstance(stage, int) and not isinstance(stage, bool) and 0 <= stage <= 3 else None

    def offload(self, key: str) -> str | None:
        """The offload device ("cpu", "nvme") of offload_optimizer / offload_param, or None."""
        section = self.zero.get(key)
        device = section.get("device") if isinstance(section, dict) else None
        return device if device in ("cpu", "nvme") else None

    @property
    def offload_optimizer(self) -> str | None:
        return self.offload("offload_optimizer")

    @property
    def offload_param(self) -> str | None:
        """Parameter offload; only stage 3 partitions (and so offloads) parameters."""
        return self.offload("offload_param") if self.stage == 3 else None

    @property
    def offloads(self) -> set[str]:
        return {d for d in (self.offload("offload_optimizer"), self.offload("offload_param")) if d}

    def offload_value(self, key: str, field: str):
        """A field of offload_optimizer / offload_param as written (None when the section or field is absent)."""
        section = self.zero.get(key)
        return section.get(field) if isinstance(section, dict) else None

    @property
    def offload_ratio(self):
        """offload_optimizer.ratio (DeepSpeed's partial offload, stage 3): the share of the optimizer states on the
        CPU, as written (a number, "auto" for the recipe to choose), or None when absent (DeepSpeed's 1.0: all)."""
        return self.offload_value("offload_optimizer", "ratio") if self.offload_optimizer else None

    @property
    def partial_offload(self) -> bool:
        """Stage 3 with part of the optimizer states on the GPU (offload_optimizer.ratio "auto" or below 1)."""
        ratio = self.offload_ratio
        return self.stage == 3 and (ratio == "auto" or (isinstance(ratio, int | float) and ratio < 1))

    @property
    def zenflow(self) -> dict | None:
        """zero_optimization.zenflow (DeepSpeed's ZenFlow: the top-k gradient columns stepped on the GPU every step,
        the rest on the CPU every update_interval steps, overlapped), or None."""
        section = self.zero.get("zenflow")
        return section if isinstance(section, dict) else None

    @property
    def bf16_master_weights(self) -> bool:
        """bf16.bf16_master_weights_and_grads: ZeRO keeps its master weights and gradients in bf16, not fp32."""
        return self.value("bf16.bf16_master_weights_and_grads") is True

    @property
    def bf16_optimizer_states(self) -> bool:
        """bf16.bf16_optimizer_states: Adam's moments in bf16 too (DeepSpeed asks for bf16 master weights with it)."""
        return self.value("bf16.bf16_optimizer_states") is True

    @property
    def master_bytes(self) -> int:
        """Bytes per trained parameter of ZeRO's master weights, and of their gradients: 4 (fp32), 2 in bf16."""
        return 2 if self.bf16_master_weights else 4

    @property
    def moment_bytes(self) -> int:
        """Bytes per trained parameter of Adam's two moments: 8 (fp32), 4 with bf16_optimizer_states."""
        return 4 if self.bf16_optimizer_states else 8

    @property
    def param_buffer_size(self):
        """offload_param.buffer_size under NVMe parameter offload (elements per swap buffer): as written, "auto"
        (filled from the model), DeepSpeed's default 1e8 when absent, None without NVMe parameter offload."""
        if self.offload_param != "nvme":
            return None
        value = self.offload_value("offload_param", "buffer_size")
        return DS_PARAM_BUFFER_DEFAULT if value is None else value

    @property
    def nvme_paths(self) -> list[str]:
        return sorted({self.zero[k]["nvme_path"] for k in OFFLOAD_KEYS if self.offload(k) == "nvme"
                       and self.zero[k].get("nvme_path") not in (None, "auto")})

    @property
    def gathers_16bit(self) -> bool:
        """Whether a ZeRO-3 save gathers 16-bit weights into model/ (also under the deprecated fp16 name)."""
        return any(self.zero.get(k) is True for k in ("stage3_gather_16bit_weights_on_model_save",
                                                     "gather_16bit_weights_on_model_save",
                                                     "stage3_gather_fp16_weights_on_model_save"))

    def value(self, dotted: str):
        """A value by its dotted path ("optimizer.params.lr"), None when absent."""
        node = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def runnable_here(self) -> bool:
        """Whether this config's ops can build on this machine (CPUAdam for offload, libaio for NVMe)."""
        if "nvme" in self.offloads and not aio_available():
            return False
        return not self.offloads or cpu_adam_available()


# ---------------------------------------------------------------- which file, loaded


def ds_config_names() -> list[str]:
    return sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))


def shipped() -> dict[str, DsConfig]:
    """Every config in ds_configs/, by stem."""
    return {p.stem: DsConfig(json.loads(p.read_text()), str(p.relative_to(REPO_ROOT)))
            for p in sorted(DS_CONFIG_DIR.glob("*.json"))}


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


def stage_file(zero_stage: str) -> Path:
    """--zero_stage N -> ds_configs/stageN.json (ConfigError with the choices when there is none)."""
    name = f"stage{zero_stage}"
    path = DS_CONFIG_DIR / f"{name}.json"
    if not path.exists():
        hint = difflib.get_close_matches(name, ds_config_names(), n=1)
        raise ConfigError([
            f"--zero_stage {zero_stage}: there is no {path.relative_to(REPO_ROOT)}. "
            f"Choose one of {', '.join(n.removeprefix('stage') for n in ds_config_names())}"
            + (f" (did you mean {hint[0].removeprefix('stage')}?)" if hint else "")
            + ", or pass your own file with --deepspeed."])
    return path


def resolve(deepspeed: str | dict | None, zero_stage: str | None, nvme_path: str | None) -> DsConfig:
    """--deepspeed / --zero_stage (the shorthand wins, so `--zero_stage 3` works with any recipe) / the default
    stage2.json, loaded, with NVMe paths filled from --nvme_path or $DS_NVME_PATH. ConfigError for what is wrong."""
    if isinstance(deepspeed, dict):
        return DsConfig(deepspeed)
    if zero_stage not in (None, ""):
        path = stage_file(str(zero_stage))
    else:
        path = Path(deepspeed) if deepspeed else DEFAULT_DS_CONFIG
        if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
            path = REPO_ROOT / path
        if not path.exists():
            raise ConfigError([f"DeepSpeed config {deepspeed} does not exist. Shipped configs: "
                               f"{', '.join(f'ds_configs/{n}.json' for n in ds_config_names())}."])
    config = load_json_file(path, "DeepSpeed config")
    fill_nvme_paths(config, nvme_path or os.environ.get("DS_NVME_PATH"), path.name)
    path = path.resolve()
    return DsConfig(config, str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path))


def fill_nvme_paths(config: dict, nvme: str | None, name: str) -> None:
    """nvme_path unset or "auto" in an NVMe offload section -> the given directory (in place)."""
    zero = config.get("zero_optimization") if isinstance(config.get("zero_optimization"), dict) else {}
    for key in OFFLOAD_KEYS:
        section = zero.get(key)
        if isinstance(section, dict) and section.get("device") == "nvme" and section.get("nvme_path") in (None, "auto"):
            if not nvme:
                raise ConfigError([f"{name} offloads to NVMe but no path is set: pass --nvme_path /local_nvme "
                                   "or export DS_NVME_PATH=/local_nvme (a directory on a fast local NVMe disk)."])
            section["nvme_path"] = nvme


def param_buffer_elements(largest_param: int, world_size: int) -> int:
    """offload_param.buffer_size for NVMe parameter offload: each swap buffer holds one parameter's partition, and
    DeepSpeed asserts `numel <= buffer_size` for every partition (partitioned_param_swapper.get_buffer: "More
    elements N than buffer size M"). A partition is ceil(numel / processes); this is the largest one, rounded up to
    BUFFER_ALIGN. Llama-3's 128256-token embedding is 262.7M elements at hidden 2048 (1B), 525.3M at 4096 (8B),
    1.05B at 8192 (70B), all above DeepSpeed's default of 1e8 on one process."""
    partition = -(-int(largest_param) // max(1, int(world_size)))
    return -(-partition // BUFFER_ALIGN) * BUFFER_ALIGN


def fill_model_autos(config: dict, *, largest_param: int, world_size: int, offload_ratio: float | None) -> list[str]:
    """The "auto" values only the model and these GPUs settle, filled in place (HF and accelerate fill none of them,
    and DeepSpeed's pydantic models silently drop an "auto" they meet, leaving their defaults): NVMe
    offload_param.buffer_size from the largest parameter, and offload_optimizer.ratio (partial offload) with the
    share the memory estimate chose. Returns "key=value" for each value filled."""
    zero = config.get("zero_optimization") if isinstance(config.get("zero_optimization"), dict) else {}
    filled = []
    param = zero.get("offload_param")
    if isinstance(param, dict) and param.get("device") == "nvme" and param.get("buffer_size") == "auto":
        param["buffer_size"] = param_buffer_elements(largest_param, world_size)
        filled.append(f"zero_optimization.offload_param.buffer_size={param['buffer_size']}")
    optimizer = zero.get("offload_optimizer")
    if isinstance(optimizer, dict) and optimizer.get("ratio") == "auto" and offload_ratio is not None:
        optimizer["ratio"] = float(offload_ratio)
        filled.append(f"zero_optimization.offload_optimizer.ratio={optimizer['ratio']:g}")
    return filled


def model_autos(config: dict) -> list[str]:
    """The dotted keys fill_model_autos would fill in this config."""
    zero = config.get("zero_optimization") if isinstance(config.get("zero_optimization"), dict) else {}
    return [f"zero_optimization.{key}.{field}" for key, field in (("offload_param", "buffer_size"),
                                                                  ("offload_optimizer", "ratio"))
            if isinstance(zero.get(key), dict) and zero[key].get(field) == "auto"]


# ---------------------------------------------------------------- which ops can build here


def cpu_adam_available() -> bool:
    """Whether DeepSpeed's CPUAdam op (ZeRO-Offload's optimizer) can be built here."""
    return bool(ds_attr("deepspeed.ops.op_builder", "CPUAdamBuilder")().is_compatible(verbose=False))


def aio_available() -> bool:
    """Whether DeepSpeed's async_io op (NVMe offload) can build here: it needs libaio."""
    return bool(ds_attr("deepspeed.ops.op_builder", "AsyncIOBuilder")().is_compatible(verbose=False))
