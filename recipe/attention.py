"""Mask-free attention for packed rows: PyTorch's variable-length flash attention.

With --packing (TRL's BFD packing, padding-free), a batch is one row of documents back to back, position_ids
restarting at 0 per document. Under SDPA, transformers turns that into a materialised (tokens x tokens)
block-diagonal mask, and SDPA with a mask falls back from flash attention to a kernel that computes over the whole
row: attention costs grow with the square of the packed length (batch x max_length), not of each document's.
Flash attention's varlen kernels take the document boundaries instead (TRL's collator hands them over as
cu_seq_lens_q/k and max_length_q/k) and compute only within documents. flash-attn is not a dependency; PyTorch
itself ships the kernel as torch.nn.attention.varlen.varlen_attn (CUDA). This module registers it with
transformers' AttentionInterface under NAME; batches without document boundaries (eval without packing) take SDPA.
"""

from __future__ import annotations

import inspect

NAME = "sdpa_varlen"


def varlen_kernel():
    """PyTorch's varlen_attn, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def kernel_options() -> tuple[dict, bool]:
    """How this torch's varlen_attn asks for causal attention and grouped kv heads (its signature changed)."""
    params = inspect.signature(varlen_kernel()).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    return causal, "enable_gqa" in params


_KERNEL = None  # (varlen_attn, its causal keyword, whether it takes grouped kv heads), read once by register(): the
# layers' compiled graphs then see plain constants, not an import and a signature inspection per call


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention signature: query (batch, heads, tokens, dim), key/value (batch, kv_heads, tokens,
    dim); returns (batch, tokens, heads, dim) and no weights."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    cu_seq = kwargs.get("cu_seq_lens_q")
    if cu_seq is None or query.shape[0] != 1 or attention_mask is not None or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    kernel, causal, gqa = _KERNEL or (varlen_kernel(), *kernel_options())
    groups = query.shape[1] // key.shape[1]
    if groups > 1 and not gqa:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    extra = {"enable_gqa": True} if groups > 1 and gqa else {}
    cu_seq = cu_seq.to(query.device, non_blocking=True)
    cu_seq_k = kwargs.get("cu_seq_lens_k")
    cu_seq_k = cu_seq if cu_seq_k is None else cu_seq_k.to(query.device, non_blocking=True)
    max_q = kwargs.get("max_length_q") or query.shape[2]
    max_k = kwargs.get("max_length_k") or max_q
    out = kernel(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                 cu_seq, cu_seq_k, int(max_q), int(max_k), scale=scaling, **causal, **extra)
    return out.unsqueeze(0), None


def register() -> str:
    """Make NAME a valid attn_implementation (idempotent); returns it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    global _KERNEL
    _KERNEL = (varlen_kernel(), *kernel_options())
    AttentionInterface.register(NAME, varlen_attention_forward)
    # like flash attention: no mask when rows are unpadded (the boundaries travel as cu_seq_lens)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, flash_attention_mask)
    return NAME
