"""FP8 training (--fp8): float8 matmuls for the decoder's linear layers, through torchao.float8.

torchao swaps each chosen nn.Linear for a Float8Linear (a subclass: same weight Parameter, same state-dict key), whose
forward and backward cast inputs, weights and output gradients to float8 with dynamic scales and run the matmuls on
the GPU's FP8 tensor cores; weights, gradients and optimizer states stay as they were (bf16 model, fp32 master in the
optimizer), so ZeRO-2/3, checkpoints and LoRA (a frozen Float8Linear base under PEFT's adapter) are unchanged.
Converted: q/k/v/o and gate/up/down of every decoder layer. Kept in bf16: the embedding, the LM head (its loss is
sensitive and it is read by the fused loss) and any linear whose dimensions are not multiples of 16 (the FP8 kernels
need them). Recipes (torchao's): tensorwise (fastest, one scale per tensor), rowwise, rowwise_with_gw_hp (weight
gradients in bf16; most accurate). The compiled decoder layers (--compile_layers) fuse the casts; eager FP8 pays
for them.

Needs a GPU with FP8 tensor cores (compute capability 8.9: Ada, Hopper and later) and bf16; refused on CPU, older
GPUs, fp16 and 4-bit (QLoRA) bases before any weights load.
"""

from __future__ import annotations

import importlib.util
import logging

logger = logging.getLogger(__name__)

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
MIN_CAPABILITY = (8, 9)
KEEP = ("lm_head", "embed_tokens", "score")  # never converted: the loss head and the embedding


def available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def fp8_problems(recipe: str, *, cuda: bool, capability: tuple[int, int] | None, bf16: bool, fp16: bool,
                 have_torchao: bool | None = None) -> list[str]:
    """What stops --fp8 on this machine, each with its remedy (empty: it can run). A quantized base is refused
    where the model arguments are read (recipe.config)."""
    have_torchao = available() if have_torchao is None else have_torchao
    problems = []
    if recipe not in RECIPES:
        problems.append(f"--fp8_recipe {recipe}: choose one of {', '.join(RECIPES)}.")
    if not have_torchao:
        problems.append("--fp8 needs torchao: `uv sync` installs it (Linux), or drop --fp8.")
    if not cuda:
        problems.append("--fp8 needs a CUDA GPU with FP8 tensor cores (Ada, Hopper or later); this machine has "
                        "none: drop --fp8 (bf16 trains the same model).")
    elif capability is not None and tuple(capability) < MIN_CAPABILITY:
        problems.append(f"--fp8 needs FP8 tensor cores (compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}: "
                        f"Ada, Hopper or later); this GPU is {capability[0]}.{capability[1]}: drop --fp8.")
    if fp16 or (cuda and not bf16):
        problems.append("--fp8 runs its non-FP8 parts in bf16: use --bf16 true (not fp16).")
    return problems


def convertible(module, fqn: str) -> bool:
    """A decoder linear layer whose dimensions the FP8 kernels take (multiples of 16), not the head or embedding."""
    import torch

    if not isinstance(module, torch.nn.Linear) or any(part in KEEP for part in fqn.split(".")):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert(model, recipe: str = "tensorwise", emulate: bool = False) -> int:
    """Swap the decoder's linear layers for torchao's Float8Linear in place; returns how many. emulate: torchao's
    reference path without FP8 hardware (tests on CPU)."""
    import dataclasses

    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    if emulate:
        config = dataclasses.replace(config, emulate=True)
    names = [name for name, module in model.named_modules() if convertible(module, name)]
    convert_to_float8_training(model, module_filter_fn=convertible, config=config)
    logger.info("fp8: %d linear layers train with float8 matmuls (torchao, %s scaling); the LM head and "
                "embedding stay bf16.", len(names), recipe)
    return len(names)
