"""Throughput, model FLOPs, MFU and peak memory, measured per logging interval.

MFU convention: the field's causal one (the non-causal count of PaLM/Megatron with half the attention scores,
what TRL's adjusted_mfu calls the Llama / DeepSpeed Ulysses convention). Model FLOPs per token are
6·N_trained + 4·N_frozen + 6·L·h·s, i.e. per sequence of length s (6·N_trained + 4·N_frozen)·s + 6·L·h·s².

- N: the parameters counted once, without the input-embedding lookup (a gather, no matmul) but with the LM
  head; tied embeddings are the head's matmul, so a tied model subtracts nothing.
- Frozen parameters (LoRA's base) count 4 FLOPs per token instead of 6 (forward + input gradient, no weight
  gradient); a frozen input embedding is left out like a trained one.
- 6·L·h·s: attention's score and value products (2·2·h·s per token per layer over the full s, halved by the
  causal mask, times 3 for forward + backward); L layers, h the attention width (heads x head_dim, the hidden
  size for Llama).

Padding is not counted: tokens are the attention-mask ones; packed rows restart position_ids at 0. MFU is
these FLOPs per second over the GPU's dense bf16 peak (`peak_tflops`). Gradient-checkpointing recompute is
not model FLOPs and is not counted.
"""

from __future__ import annotations

import re
import time

import torch

# The convention in one line, for reports (scripts/benchmark.py's table header, README).
MFU_FORMULA = ("MFU = (6·N + 6·L·h·s) FLOPs per token x tokens/s per GPU / the GPU's dense bf16 peak (989 TFLOP/s for "
               "H100/H200 SXM): causal attention; N the parameters without the input embedding, LM head included "
               "(frozen ones, LoRA's base, at 4·N instead of 6·N); L layers, h hidden size, s sequence length")

# Dense (no sparsity) tensor-core peaks in TFLOP/s that TRL's get_peak_flops (trl 1.16) lacks; TRL's table is
# used first. Where our old table (recipe/hardware.py) and TRL's disagree, TRL is right:
# - H100 NVL: ours said 989 (as SXM), TRL 835. NVIDIA's H100 datasheet lists BF16 1,979 TFLOPS (SXM) and 1,671
#   (NVL), both "with sparsity": dense 989 and 835.5. H200 NVL likewise (1,671 sparse -> 835; ours matched "H200",
#   989). H100 PCIe 756 (1,513 sparse), H100/H200 SXM 989: both tables agree.
# - TRL lacks the entries below (the datasheets' dense figures; GeForce cards at FP32 accumulate, as autocast runs):
#   H800 SXM 989 / PCIe 756 (H100 compute, reduced interconnect), GH200 989 (its H100/H200 die at SXM clocks; TRL's
#   \bH200\b does not match "GH200"), A800 312 (A100 compute), L40 181 (362 sparse), RTX 4090 165 and RTX 3090 71
#   (bf16/fp16 with FP32 accumulate, Ada/Ampere GA102 whitepapers), V100 125 (fp16 only; no bf16).
# Matched like TRL's: case-insensitive whole words of torch.cuda.get_device_name(), first hit wins.
_OUR_PEAK_TFLOPS = (
    ("H800 PCIe", {"bfloat16": 756.0, "float16": 756.0}),
    ("H800", {"bfloat16": 989.0, "float16": 989.0}),
    ("GH200", {"bfloat16": 989.0, "float16": 989.0}),
    ("A800", {"bfloat16": 312.0, "float16": 312.0}),
    ("L40", {"bfloat16": 181.0, "float16": 181.0}),
    ("4090", {"bfloat16": 165.0, "float16": 165.0}),
    ("3090", {"bfloat16": 71.0, "float16": 71.0}),
    ("V100", {"float16": 125.0}),
)


def peak_tflops(device_name: str | None, dtype: str = "bfloat16") -> float | None:
    """Dense tensor-core peak (TFLOP/s) of a GPU by its name for `dtype` ("bfloat16" or "float16"), or None when
    unknown (MFU is then not reported): TRL's get_peak_flops, then the few it lacks (_OUR_PEAK_TFLOPS)."""
    if not device_name:
        return None
    from trl.trainer.utils import get_peak_flops

    flops = get_peak_flops(device_name, dtype)
    if flops is not None:
        return flops / 1e12
    name = device_name.casefold()
    for key, by_dtype in _OUR_PEAK_TFLOPS:
        if re.search(rf"\b{re.escape(key.casefold())}\b", name):
            return by_dtype.get(dtype)
    return None


def token_stats(inputs: dict) -> tuple:
    """(real tokens, sum of squared sequence lengths) of one micro-batch, as tensors on its device.

    No host sync: with position_ids (restarting at 0 for each packed sequence) sum(s^2) is the sum
    over real tokens of (2*position + 1); without, the attention mask's row sums are the lengths.
    """
    input_ids = inputs["input_ids"]
    position_ids = inputs.get("position_ids")
    mask = inputs.get("attention_mask")
    if position_ids is not None:
        terms = 2 * position_ids.to(torch.float64) + 1
        if mask is None:
            return torch.tensor(position_ids.numel(), device=input_ids.device), terms.sum()
        return mask.sum(), (terms * mask).sum()
    if mask is None:
        n, s = input_ids.shape
        return torch.tensor(n * s, device=input_ids.device), torch.tensor(float(n * s * s), device=input_ids.device)
    lengths = mask.sum(dim=1).to(torch.float64)
    return lengths.sum(), (lengths * lengths).sum()


def model_flops(tokens: float, sum_sq_lengths: float, n_params: int, n_layers: int, hidden: int,
                frozen_params: int = 0) -> float:
    """Forward + backward model FLOPs, causal attention: 6 per token per trained weight, 4 per frozen one (LoRA's
    base: no weight gradient), plus attention's 6·L·h·s² per sequence (6·L·h·s per token). n_params and
    frozen_params leave out the input embedding (see flop_params)."""
    return (6.0 * n_params + 4.0 * frozen_params) * tokens + 6.0 * n_layers * hidden * sum_sq_lengths


class ThroughputMeter:
    """Counts tokens and FLOPs per micro-batch on this rank; reports rates per logging interval.

    n_params / frozen_params: trained / frozen parameters without the input embedding (flop_params); hidden: the
    attention width. Counting stays on the device (no sync per step); the numbers are read at each log, where the
    Trainer synchronises anyway. Intervals are back to back: the first starts at the first batch.
    """

    def __init__(self, n_params: int, n_layers: int, hidden: int, peak_tflops: float | None, cuda: bool,
                 frozen_params: int = 0):
        self.n_params, self.n_layers, self.hidden, self.frozen_params = n_params, n_layers, hidden, frozen_params
        self.peak_tflops = peak_tflops
        self.cuda = cuda
        self.history: list[dict] = []
        self.start = None
        self._reset()

    def _reset(self):
        self.tokens, self.sum_sq = 0, 0.0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def add_batch(self, inputs: dict) -> None:
        if self.start is None:
            self.start = time.perf_counter()
        tokens, sum_sq = token_stats(inputs)
        self.tokens = self.tokens + tokens
        self.sum_sq = self.sum_sq + sum_sq

    def report(self, sp_group=None) -> dict:
        """Rates since the last report (a logging interval), then start a new interval.

        sp_group: the Ulysses group, whose ranks each hold a shard of every sequence but attend over all of it for
        1/N of the heads: tokens and attention terms are the group's, / N per rank (padding leaves the shards of
        short rows unequal; per GPU, the group's work is shared equally)."""
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed = max(now - (self.start or now), 1e-9)
        if sp_group is not None:
            import torch.distributed as dist

            device = self.tokens.device if torch.is_tensor(self.tokens) else None
            shared = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                                  for v in (self.tokens, self.sum_sq)])
            dist.all_reduce(shared, group=sp_group)
            self.tokens, self.sum_sq = shared / dist.get_world_size(sp_group)
        tokens, sum_sq = float(self.tokens), float(self.sum_sq)
        flops = model_flops(tokens, sum_sq, self.n_params, self.n_layers, self.hidden, self.frozen_params)
        out = {
            "tokens_per_second_per_device": tokens / elapsed,
            "tflops_per_device": flops / elapsed / 1e12,
        }
        if self.peak_tflops:
            out["mfu"] = out["tflops_per_device"] / self.peak_tflops
        if self.cuda:
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        self.history.append(out)
        self.start = now
        self._reset()
        return out

    def averages(self) -> dict:
        """Mean over intervals, leaving out the first (start-up, compilation) when there are more."""
        rows = self.history[1:] if len(self.history) > 1 else self.history
        if not rows:
            return {}
        peaks = ("peak_memory_gib", "peak_reserved_gib")
        out = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k not in peaks}
        out.update({k: max(r[k] for r in self.history) for k in peaks if k in rows[0]})
        return out


def param_numel(p) -> int:
    """A parameter's full size: ZeRO-3 partitions report it through ds_numel, 4-bit weights (QLoRA) through their
    quantisation state (their storage packs several values per element)."""
    quant = getattr(p, "quant_state", None)
    if quant is not None and getattr(quant, "shape", None) is not None:
        return int(torch.Size(quant.shape).numel())
    return getattr(p, "ds_numel", p.numel())


def count_params(model, trainable: bool | None = None) -> int:
    """Parameters counted once; trainable=True/False: only those that are / are not trained."""
    return sum(param_numel(p) for p in model.parameters() if trainable is None or p.requires_grad == trainable)


def _weight(model, getter: str):
    """The weight of model.get_input_embeddings() / get_output_embeddings(), or None where a model has none."""
    try:
        module = getattr(model, getter)()
    except (AttributeError, NotImplementedError):
        return None
    return None if module is None else getattr(module, "weight", None)


def flop_params(model) -> tuple[int, int]:
    """(trained, frozen) parameters that do matmul FLOPs: all, counted once, less the input embedding (a lookup).
    A tied embedding is the LM head's weight, whose matmul counts: tied models subtract nothing."""
    trained, frozen = count_params(model, trainable=True), count_params(model, trainable=False)
    embedding, head = _weight(model, "get_input_embeddings"), _weight(model, "get_output_embeddings")
    if embedding is None or embedding is head:
        return trained, frozen
    if embedding.requires_grad:
        return trained - param_numel(embedding), frozen
    return trained, frozen - param_numel(embedding)


def attention_width(config) -> int:
    """h of the attention term: query heads x head dim (the hidden size for Llama; not for every model)."""
    heads, head_dim = getattr(config, "num_attention_heads", None), getattr(config, "head_dim", None)
    return heads * head_dim if heads and head_dim else config.hidden_size


def meter_for(model) -> ThroughputMeter:
    """A meter for this model on this process's device (MFU against the detected GPU's dense peak: bf16, or fp16 on
    GPUs without bf16, where the run trains in fp16)."""
    cuda = torch.cuda.is_available()
    config = model.config
    peak = None
    if cuda:
        dtype = "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
        peak = peak_tflops(torch.cuda.get_device_name(), dtype)
    trained, frozen = flop_params(model)
    return ThroughputMeter(trained, config.num_hidden_layers, attention_width(config), peak, cuda,
                           frozen_params=frozen)
