"""Throughput, model FLOPs, MFU and peak memory, measured per logging interval.

Model FLOPs per sequence of length s: 6·N·s + 12·L·h·s² (N: all parameters counted once, frozen ones
(LoRA's base) at 4 instead of 6,
L layers, h hidden size); the second term is attention's score and value products. Padding is
not counted: tokens are the attention-mask ones; packed rows restart position_ids at 0.
"""

from __future__ import annotations

import time

import torch


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
    """Forward + backward model FLOPs: 6·N per token for trained weights, 4·N for frozen ones (LoRA's base: no
    weight gradient), plus attention's 12·L·h·s² per sequence."""
    return (6.0 * n_params + 4.0 * frozen_params) * tokens + 12.0 * n_layers * hidden * sum_sq_lengths


class ThroughputMeter:
    """Counts tokens and FLOPs per micro-batch on this rank; reports rates per logging interval.

    Counting stays on the device (no sync per step); the numbers are read at each log, where the
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

    def report(self) -> dict:
        """Rates since the last report (a logging interval), then start a new interval."""
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed = max(now - (self.start or now), 1e-9)
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


def meter_for(model) -> ThroughputMeter:
    """A meter for this model on this process's device (MFU against the detected GPU's peak)."""
    from recipe.hardware import peak_tflops

    cuda = torch.cuda.is_available()
    config = model.config
    return ThroughputMeter(count_params(model, trainable=True), config.num_hidden_layers, config.hidden_size,
                           peak_tflops(torch.cuda.get_device_name() if cuda else None), cuda,
                           frozen_params=count_params(model, trainable=False))
