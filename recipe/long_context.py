"""Long-sequence memory levers: DeepSpeed's tiled MLP (Arctic Long Sequence Training).

At long sequence lengths the MLP's intermediate activations (tokens x intermediate_size, three of them for SwiGLU)
dominate a layer's memory. DeepSpeed's TiledMLP (deepspeed.runtime.sequence_parallel.ulysses_sp) runs the MLP over
the sequence in shards without keeping their activations, and recomputes each shard in backward: the same output and
gradients, at the cost of one more MLP forward. It tells ZeRO-2/3 to hold a weight's gradient until the last shard
(param.ds_grad_is_ready), and the shard count is agreed across ranks (the largest any rank needs), so ZeRO-3 gathers
the same weights as often on every rank. Shards: ceil(tokens / hidden_size), as ALST does.

--tiled_mlp auto turns it on from TILED_MLP_AUTO_LENGTH tokens of max_length unless the run fits the GPU without
it by the memory estimate (recipe.preflight.settle_tiled_mlp, once the model's shape is known); the compiled layers
do not trace it (its backward runs autograd itself), so auto leaves the layers uncompiled where it is on. Measured on
one H200, 1B shape, batch 1: untiled and compiled 30.7k / 20.2k tokens/s at 32K / 64K (57 / 96 GiB), tiled 27.5k /
19.0k (32 / 46 GiB).
"""

from __future__ import annotations

import logging
import math
import types

logger = logging.getLogger(__name__)

TILED_MLP_AUTO_LENGTH = 32768


def tiled_mlp_wanted(flag: str, max_length: int | None) -> bool:
    return flag == "true" or (flag == "auto" and (max_length or 0) >= TILED_MLP_AUTO_LENGTH)


# From here each layer's checkpointed input (max_length x hidden_size in bf16: 1 GiB per layer at 128K for the 1B
# shape, 2 GiB for 8B) is the largest thing a long run keeps on the GPU, and its copy to pinned host memory and back
# is small beside the attention's quadratic time.
ACTIVATION_OFFLOAD_AUTO_LENGTH = 131072


def activation_offload_wanted(flag, max_length: int | None, cuda: bool) -> bool:
    """--activation_offloading (TRL's offloading of saved tensors to pinned host memory): true, false, or auto (on
    with CUDA from ACTIVATION_OFFLOAD_AUTO_LENGTH tokens of max_length). A YAML recipe may give a bool."""
    flag = {True: "true", False: "false"}.get(flag, str(flag).lower())
    return flag == "true" or (flag == "auto" and cuda and (max_length or 0) >= ACTIVATION_OFFLOAD_AUTO_LENGTH)


def shards_for(tokens: int, hidden: int) -> int:
    """ALST's shard count: each shard about hidden_size tokens long."""
    return max(1, math.ceil(tokens / hidden))


def _agreed(shards: int, device) -> int:
    """The largest shard count of any rank (ZeRO-3 gathers each weight once per shard: the counts must agree)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return shards
    t = torch.tensor([shards], device=device, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _tiled_forward(self, x):
    shards = _agreed(shards_for(x.shape[-2] if x.dim() > 2 else x.shape[0], x.shape[-1]), x.device)
    if shards == 1:
        return self._untiled_forward(x)
    # TiledMLP keeps the parameters that require gradients (a LoRA base's frozen weights get none)
    return self._tiled_mlp.apply(lambda module, shard: module._untiled_forward(shard), self, x, shards,
                                 list(self.parameters()))


def apply_tiled_mlp(layers) -> int:
    """Run each decoder layer's MLP tiled over the sequence (in place, state-dict keys unchanged); returns how
    many. Wraps whatever forward the MLP has (Liger's SwiGLU, say)."""
    from recipe.ds_config import ds_attr

    tiled = ds_attr("deepspeed.runtime.sequence_parallel.ulysses_sp", "TiledMLP")  # once, not per forward
    count = 0
    for layer in layers or []:
        mlp = getattr(layer, "mlp", None)
        if mlp is None or hasattr(mlp, "_untiled_forward"):
            continue
        mlp._untiled_forward, mlp._tiled_mlp = mlp.forward, tiled
        mlp.forward = types.MethodType(_tiled_forward, mlp)
        count += 1
    logger.info("tiled_mlp: %d MLPs run in sequence shards of about hidden_size tokens (DeepSpeed TiledMLP).", count)
    return count


# ── Ulysses sequence parallelism (--sequence_parallel_size) ──────────────────────────────────────────────────────
# accelerate's ParallelismConfig(sp_backend="deepspeed") hands the model to DeepSpeed's UlyssesSPAttentionHF (each
# rank attends over all positions for heads / N of the heads, an all-to-all either side) and wraps the dataloader in
# UlyssesSPDataLoaderAdapter (each rank of a group gets 1/N of every sequence, labels pre-shifted); HF Trainer
# averages the loss over the group by tokens with labels. Data parallel over world / N.

SP_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3")


def sequence_parallel_problems(sp: int, world: int, zero_stage: int | None, padding_free: bool = False) -> list[str]:
    """What the process count and DeepSpeed config say about --sequence_parallel_size (no model needed)."""
    if sp < 1:
        return [f"--sequence_parallel_size {sp}: give 1 (off) or the ranks to split each sequence over."]
    if sp == 1:
        return []
    problems = []
    if world % sp:
        problems.append(f"--sequence_parallel_size {sp} does not divide the {world} processes: use a divisor of "
                        f"{world} (data parallel runs over processes / N), or launch a multiple of {sp} processes.")
    if not zero_stage:
        problems.append(f"--sequence_parallel_size {sp} needs DeepSpeed ZeRO 1-3 (its sequence-parallel groups live in "
                        "the engine): use --zero_stage 2 or 3, not 0.")
    if padding_free:
        problems.append(f"--sequence_parallel_size {sp} with padding-free packing (--packing with the bfd strategy, or "
                        "--padding_free): DeepSpeed's Ulysses data adapter shards (batch, length) tensors only; use "
                        "--packing_strategy wrapped (fixed-length packed rows) or --packing false.")
    return problems


def sequence_parallel_model_problems(sp: int, config, attn_implementation: str | None) -> list[str]:
    """What the model's config says (read without weights): heads divisible by N, an attention Ulysses wraps."""
    if sp <= 1:
        return []
    problems = []
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads and heads % sp:
        problems.append(f"--sequence_parallel_size {sp}: the model's {heads} attention heads do not split over {sp} "
                        f"ranks; use a divisor of {heads}.")
    elif kv and kv % sp and sp % kv:
        problems.append(f"--sequence_parallel_size {sp}: the model's {kv} key/value heads neither divide by nor "
                        f"divide {sp}; use a divisor of {kv}.")
    if attn_implementation not in (None, *SP_ATTENTION):
        problems.append(f"--sequence_parallel_size {sp} with --attn_implementation {attn_implementation}: Ulysses "
                        f"wraps {', '.join(SP_ATTENTION)} only; drop --attn_implementation (sdpa) or pick one of them.")
    return problems


def parallelism_config(sp: int, attn_implementation: str | None):
    """accelerate's ParallelismConfig for Ulysses over `sp` ranks (variable sequence lengths)."""
    from accelerate import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    attn = attn_implementation if attn_implementation in SP_ATTENTION else "sdpa"
    return ParallelismConfig(sp_backend="deepspeed", sp_size=sp, sp_handler=DeepSpeedSequenceParallelConfig(
        sp_seq_length_is_variable=True, sp_attn_implementation=attn))


def sequence_parallel_active(accelerator) -> bool:
    pc = getattr(accelerator, "parallelism_config", None)
    return pc is not None and pc.sp_backend == "deepspeed" and pc.sp_enabled


def sequence_parallel_loss(model, inputs: dict, return_outputs: bool = False, zero_stage: int | None = None):
    """The loss of a sequence split over the Ulysses group: the group's mean over tokens with labels.

    transformers' deepspeed_sp_compute_loss averages the all-gathered per-rank losses through a differentiable
    all_gather, so each rank's backward carries the gradient of every rank's copy of the mean: N times its shard's
    share. DeepSpeed then sums the shards' gradients over the group (it averages over data parallel only), and the
    step sees N times the gradient (a gradient norm N times sp=1's; clipping and Adam's scale invariance hide most of
    it). Here the value is the same mean, but the gradient flows through this rank's own tokens only. ZeRO-3's
    reduce-scatter (deepspeed/runtime/zero/stage3.py, 0.19.8) averages over the whole group instead of summing the
    shards, so there the shard's gradient is scaled by N to land on the same step (tested: ZeRO-2 and -3 give sp=1's
    gradient norms)."""
    import torch
    import torch.distributed as dist
    from deepspeed.utils import groups

    if "labels" not in inputs and "shift_labels" in inputs:  # the adapter pre-shifts labels for the shards
        inputs["labels"] = inputs["shift_labels"]
    outputs = model(**inputs)
    good = (inputs["shift_labels"] != -100).sum().to(outputs.loss.dtype)
    local = torch.where(good > 0, outputs.loss, torch.zeros_like(outputs.loss)) * good
    totals = torch.stack([local.detach(), good])
    group = groups._get_sequence_parallel_group()
    dist.all_reduce(totals, group=group)
    scale = dist.get_world_size(group) if zero_stage == 3 else 1
    loss = (scale * local + (totals[0] - scale * local.detach())) / totals[1].clamp(min=1)
    return (loss, outputs) if return_outputs else loss


def resumable_under_sequence_parallel() -> None:
    """Resume skips the batches already trained with accelerate's skip_first_batches, which reads the dataloader's
    dataset; under Ulysses the Trainer holds DeepSpeed's UlyssesSPDataLoaderAdapter, which has none (resume died with
    "'UlyssesSPDataLoaderAdapter' object has no attribute 'dataset'"). Patched in transformers.trainer, once: skip
    the wrapped dataloader's batches (the adapter yields N micro-batches per batch, one per rank of the group) and
    wrap it again, then the remainder from the new adapter."""
    import transformers.trainer as hf_trainer

    from recipe.ds_config import ds_attr

    original = hf_trainer.skip_first_batches
    if getattr(original, "_recipe_sp", False):
        return
    adapter = ds_attr("deepspeed.runtime.sequence_parallel.ulysses_sp", "UlyssesSPDataLoaderAdapter")

    def skip_first_batches(dataloader, num_batches=0):
        if not isinstance(dataloader, adapter):
            return original(dataloader, num_batches)
        whole, rest = divmod(num_batches, dataloader.sp_world_size)
        resumed = adapter(original(dataloader.dl, whole), sp_rank=dataloader.sp_rank, sp_group=dataloader.sp_group,
                          sp_world_size=dataloader.sp_world_size, device=dataloader.device)
        for _ in range(rest):
            next(resumed)
        return resumed

    skip_first_batches._recipe_sp = True
    hf_trainer.skip_first_batches = skip_first_batches
