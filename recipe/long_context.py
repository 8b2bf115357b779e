"""Long-sequence memory levers: DeepSpeed's tiled MLP (Arctic Long Sequence Training).

At long sequence lengths the MLP's intermediate activations (tokens x intermediate_size, three of them for SwiGLU)
dominate a layer's memory. DeepSpeed's TiledMLP (deepspeed.runtime.sequence_parallel.ulysses_sp) runs the MLP over
the sequence in shards without keeping their activations, and recomputes each shard in backward: the same output and
gradients, at the cost of one more MLP forward. It tells ZeRO-2/3 to hold a weight's gradient until the last shard
(param.ds_grad_is_ready), and the shard count is agreed across ranks (the largest any rank needs), so ZeRO-3 gathers
the same weights as often on every rank. Shards: ceil(tokens / hidden_size), as ALST does.

--tiled_mlp auto turns it on from TILED_MLP_AUTO_LENGTH tokens of max_length; the compiled layers do not trace it
(its backward runs autograd itself), so auto leaves the layers uncompiled where it is on.
"""

from __future__ import annotations

import logging
import math
import types

logger = logging.getLogger(__name__)

TILED_MLP_AUTO_LENGTH = 32768


def tiled_mlp_wanted(flag: str, max_length: int | None) -> bool:
    return flag == "true" or (flag == "auto" and (max_length or 0) >= TILED_MLP_AUTO_LENGTH)


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
