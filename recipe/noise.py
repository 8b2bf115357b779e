"""Library messages that say nothing to a user of this recipe, silenced at their source, each with its reason.

Only named loggers, messages matched exactly, and warnings filtered by module and text: anything else a library
says still reaches the log. Causes fixed where they are ours live beside the code that caused them (RecipeTrainer:
accelerate's accumulation mismatch and Liger's use_return_dict; CheckpointCompleteCallback: a one-rank barrier;
TrainConfig: transformers' gradient_checkpointing alias).
"""

from __future__ import annotations

import logging
import os
import warnings

# logger -> level it is raised to, and why its lower messages mean nothing here
QUIET_LOGGERS = {
    # bitsandbytes (imported by peft) warns on every start on CPUs with AVX512-BF16 that an optional kernel
    # package is absent; QLoRA runs on CUDA GPUs, where that kernel is never used.
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
}


class OptionalLigerBackends(logging.Filter):
    """liger_kernel/backends/registry.py (_discover): on an op's first dispatch (rope, here) Liger imports every
    backend it declares and warns for each that cannot: CuTe DSL (needs nvidia-cutlass-dsl), cuTile, Ascend (NPU
    Triton). None of them is used on NVIDIA GPUs with stock Triton; a failure of the Triton backend itself (the one
    in use) still reaches the log, and Liger's get_discovery_failures() keeps them all."""

    TEMPLATE = "Backend impl '%s' for op '%s' could not be imported"
    OPTIONAL = tuple(f"liger_kernel.ops.backends._{b}." for b in ("cutedsl", "cutile", "ascend"))

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.TEMPLATE) and record.args
                    and str(record.args[0]).startswith(self.OPTIONAL))


class NoCudaRuntimeOnCpu(logging.Filter):
    """torch/utils/cpp_extension.py says "No CUDA runtime is found" when DeepSpeed JIT-builds its CPU ops on a
    machine without a GPU: true, and nothing to act on. Other build messages of that logger stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("No CUDA runtime is found"))


class TorchaoEnumConstants(logging.Filter):
    """transformers imports torchao at start-up wherever it is installed (quantizers/auto.py), and torchao 0.18
    registers its enums as pytree constants (torchao/utils.py register_as_pytree_constant), which torch 2.10+ answers
    with "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile ...": a
    deprecation notice for torchao's maintainers, printed on every run. Other pytree warnings stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and "is an Enum subclass and is now natively supported" in
                    record.getMessage())


def _add_filter(logger_name: str, kind: type[logging.Filter]) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, kind) for f in logger.filters):
        logger.addFilter(kind())


def quiet_libraries(cuda: bool | None = None, environ=os.environ) -> None:
    """Idempotent; called by recipe.hardware.prepare_process in every process before DeepSpeed is imported."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    _add_filter("liger_kernel.backends.registry", OptionalLigerBackends)
    _add_filter("torch.utils.cpp_extension", NoCudaRuntimeOnCpu)
    _add_filter("torch.utils._pytree", TorchaoEnumConstants)
    if cuda is False:
        # DeepSpeed otherwise probes for accelerators and warns "Setting accelerator to CPU. If you have GPU ...";
        # told up front it says nothing (deepspeed/accelerator/real_accelerator.py)
        environ.setdefault("DS_ACCELERATOR", "cpu")
    if int(environ.get("WORLD_SIZE") or 1) == 1:
        # DeepSpeed 0.19.8 binds no device_id to a one-process group (deepspeed/comm/torch.py), so each of its
        # barriers (checkpoint save, ZeRO-3 set-up) warns; with more ranks it binds one, and the warning would mean
        # a real misconfiguration, so it stays there
        warnings.filterwarnings("ignore", message=r"barrier\(\): using the device under current context",
                                category=UserWarning)
