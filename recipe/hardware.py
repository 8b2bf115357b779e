"""Hardware facts and process set-up: precision and the distributed environment (GPU peaks: recipe.metrics).

`prepare_process()` is the one place that changes the process: train_ds.py (and scripts) call it once at start,
before arguments are parsed, because building TrainingArguments initialises the device and the process group.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket

logger = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

def fix_cuda_arch_list(environ=os.environ) -> str | None:
    """Strip arch suffixes (``9.0a`` -> ``9.0``) from TORCH_CUDA_ARCH_LIST.

    DeepSpeed's JIT op builder parses every entry with int() and fails on ``9.0a``
    (``ValueError: invalid literal for int() with base 10: '0a'``); many CUDA images ship
    ``TORCH_CUDA_ARCH_LIST=9.0a``. ``9.0`` builds sm_90 code, which runs on every Hopper GPU.
    Returns the new value when it changed.
    """
    value = environ.get("TORCH_CUDA_ARCH_LIST")
    if not value:
        return None
    fixed = re.sub(r"(\d+\.\d+)[a-zA-Z]+", r"\1", value)
    if fixed == value:
        return None
    # keep one entry per arch: "9.0 9.0a" would otherwise become "9.0 9.0"
    entries, seen = [], set()
    for entry in re.split(r"[;\s]+", fixed.strip()):
        if entry and entry not in seen:
            seen.add(entry)
            entries.append(entry)
    environ["TORCH_CUDA_ARCH_LIST"] = ";".join(entries)
    return environ["TORCH_CUDA_ARCH_LIST"]


def prepare_process(environ=os.environ) -> None:
    """Set up this process, once, before parsing: logging (INFO for rank 0, warnings for the others), a world of one
    process for plain `python train_ds.py`, TORCH_CUDA_ARCH_LIST that DeepSpeed's op builder can parse, CPU threads
    shared between the local ranks, and the library noise that says nothing to a user silenced at its source.
    Idempotent."""
    ensure_distributed_env(environ)
    is_main = environ.get("RANK", "0") == "0"
    logging.basicConfig(format=LOG_FORMAT, level=logging.WARNING)
    for name in ("train_ds", "recipe", "__main__"):
        logging.getLogger(name).setLevel(logging.INFO if is_main else logging.WARNING)
    old = environ.get("TORCH_CUDA_ARCH_LIST")
    fixed = fix_cuda_arch_list(environ)
    if fixed and is_main:
        logger.info("TORCH_CUDA_ARCH_LIST=%s -> %s: DeepSpeed's op builder cannot parse arch suffixes such as 9.0a "
                    "(9.0 builds the same sm_90 code).", old, fixed)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and "OMP_NUM_THREADS" not in environ:
        # share the cores between the local ranks instead of oversubscribing them
        threads = max(1, (os.cpu_count() or 1) // local_world_size(environ))
        environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    from recipe.noise import quiet_libraries

    quiet_libraries(cuda, environ)


def world_size(environ=os.environ) -> int:
    return int(environ.get("WORLD_SIZE") or 1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))  # free on every address: torch's TCPStore listens on all of them
        return s.getsockname()[1]


def local_world_size(environ=os.environ) -> int:
    """Processes on this node: LOCAL_WORLD_SIZE (torchrun, accelerate), LOCAL_SIZE (DeepSpeed's launcher), else
    WORLD_SIZE (one node)."""
    return int(environ.get("LOCAL_WORLD_SIZE") or environ.get("LOCAL_SIZE") or environ.get("WORLD_SIZE") or 1)


def ensure_distributed_env(environ=os.environ) -> bool:
    """Make ``python train_ds.py`` a world of one process, as the launchers would.

    DeepSpeed otherwise looks for MPI (mpi4py) to discover its rank. Returns True when it set
    the variables, False when a launcher (deepspeed, torchrun, accelerate) already had.
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return False
    environ.setdefault("RANK", "0")
    environ.setdefault("LOCAL_RANK", "0")
    environ.setdefault("WORLD_SIZE", "1")
    environ.setdefault("LOCAL_WORLD_SIZE", "1")
    environ.setdefault("MASTER_ADDR", "127.0.0.1")
    environ.setdefault("MASTER_PORT", str(_free_port()))
    return True


def master_port_problem(environ=os.environ) -> str | None:
    """Rank 0 hosts the rendezvous on MASTER_PORT; if another job holds that port, say so before torch's
    EADDRINUSE traceback. (torchrun's agent hosts it itself, so the port is busy by design there.)"""
    if environ.get("RANK", "0") != "0" or environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # this process already hosts the rendezvous
        return None
    port = environ.get("MASTER_PORT")
    if not port or not port.isdigit():
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as torch's TCPStore does: a port left in TIME_WAIT by the previous run is free, a listening one is not
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", int(port)))  # TCPStore listens on every address, so a holder on any of them counts
        except OSError as e:
            if e.errno != errno.EADDRINUSE:  # anything else is torch's to report
                return None
            return (f"MASTER_PORT {port} is already in use on this host (another training job?): pass a free port "
                    "to the launcher: `deepspeed --master_port 29511 ...`, `torchrun --master_port 29511 ...` or "
                    "`scripts/train.sh --master_port 29511 ...`.")
    return None


def resolve_precision(
    bf16: bool | None, fp16: bool, cuda: bool, cuda_bf16: bool
) -> tuple[bool, bool, list[str]]:
    """Pick (bf16, fp16) from the hardware unless the user chose; return problems found.

    ``bf16=None`` means "auto": bf16 on GPUs that have it (Ampere and newer), fp16 with dynamic
    loss scaling on older GPUs, fp32 on CPU. An explicit choice wins when the hardware can do it.
    """
    problems = []
    if bf16 and fp16:
        problems.append("--bf16 and --fp16 are both set: choose one.")
    if fp16 and not cuda:
        problems.append(
            "--fp16 needs a CUDA GPU and none is visible: drop --fp16 (CPU runs train in fp32) or use --bf16."
        )
    if bf16 and cuda and not cuda_bf16:
        problems.append(
            "--bf16 is set but this GPU has no bf16 support (it needs Ampere or newer): use --fp16, "
            "or leave both unset to pick fp16 automatically."
        )
    if bf16 is None:
        if fp16:
            bf16 = False
        elif cuda:
            bf16, fp16 = cuda_bf16, not cuda_bf16
        else:
            bf16 = False
    return bool(bf16), bool(fp16), problems


def precision_name(bf16: bool, fp16: bool) -> str:
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


def shm_buffer(rank: int, environ=os.environ) -> str:
    """The /dev/shm file DeepSpeed's CPU all-reduce creates for a rank (deepspeed/ops/csrc/cpu/comm/shm.cpp)."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{environ.get('MASTER_ADDR', '')}_"
            f"{environ.get('MASTER_PORT', '')}_{rank}")


def release_shm_buffers() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer once every rank has mapped it.

    DeepSpeed maps one ~66 MB /dev/shm file per local rank and never unlinks it, so every multi-process CPU
    run (and every killed one) leaves them behind until /dev/shm, which is RAM, fills. After a barrier every
    rank has opened every other rank's file, so each can unlink its own: the memory stays mapped until the
    processes exit, and nothing is left after them.
    """
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    dist.barrier()
    try:
        os.unlink(shm_buffer(dist.get_rank()))
    except FileNotFoundError:
        pass

