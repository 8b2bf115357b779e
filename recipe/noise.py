"""Library messages that say nothing to a user of this recipe, silenced at their source, each with its reason.

Only named loggers and exactly matched warnings: anything else a library says still reaches the log.
"""

from __future__ import annotations

import logging

# logger -> level it is raised to, and why its lower messages mean nothing here
QUIET_LOGGERS = {
    # bitsandbytes (imported by peft) warns on every start on CPUs with AVX512-BF16 that an optional kernel
    # package is absent; QLoRA runs on CUDA GPUs, where that kernel is never used.
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
}


def quiet_libraries() -> None:
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
