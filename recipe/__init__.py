"""What train_ds.py and scripts/ share: arguments, data, model loading, hardware, metrics, reports."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# bitsandbytes (imported by peft) warns on every start on CPUs with AVX512-BF16 that an optional kernel
# package is absent; QLoRA runs on CUDA GPUs, where that kernel is never used.
__import__("logging").getLogger("bitsandbytes.backends.cpu.ops").setLevel(40)
