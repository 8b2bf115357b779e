"""Throughput, model FLOPs, MFU and peak memory, measured per logging interval.

Model FLOPs per sequence of length s: 6·N·s + 12·L·h·s² (N: all parameters counted once,
L layers, h hidden size); the second term is attention's score and value products. Padding is
not counted: tokens are the attention-mask ones; packed rows are split at position_ids == 0.
"""

from __future__ import annotations

import time

import torch


def sequence_lengths(inputs: dict) -> list[int]:
    """Real (non-padding) sequence lengths of one micro-batch, packed or padded."""
    position_ids = inputs.get("position_ids")
    input_ids = inputs["input_ids"]
    if position_ids is not None and input_ids.shape[0] == 1:
        # padding-free / packed: a new sequence starts wherever position_ids resets to 0
        starts = (position_ids[0] == 0).nonzero().flatten().tolist()
        if starts:
            ends = starts[1:] + [position_ids.shape[1]]
            return [e - s for s, e in zip(starts, ends)]
    mask = inputs.get("attention_mask")
    if mask is None:
        return [input_ids.shape[1]] * input_ids.shape[0]
    return mask.sum(dim=1).tolist()


def model_flops(lengths: list[int], n_params: int, n_layers: int, hidden: int) -> float:
    """Forward + backward model FLOPs for sequences of these lengths."""
    return float(sum(6 * n_params * s + 12 * n_layers * hidden * s * s for s in lengths))


class ThroughputMeter:
    """Counts tokens and FLOPs per micro-batch on this rank; reports rates per logging interval."""

    def __init__(self, n_params: int, n_layers: int, hidden: int, peak_tflops: float | None, cuda: bool):
        self.n_params, self.n_layers, self.hidden = n_params, n_layers, hidden
        self.peak_tflops = peak_tflops
        self.cuda = cuda
        self.history: list[dict] = []
        self._reset()

    def _reset(self):
        self.tokens, self.flops = 0, 0.0
        self.start = None  # the interval starts at its first micro-batch, not at set-up
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def add_batch(self, inputs: dict) -> None:
        if self.start is None:
            self.start = time.perf_counter()
        lengths = sequence_lengths(inputs)
        self.tokens += int(sum(lengths))
        self.flops += model_flops(lengths, self.n_params, self.n_layers, self.hidden)

    def report(self) -> dict:
        """Rates since the last report (a logging interval), then start a new interval."""
        elapsed = max(time.perf_counter() - (self.start or time.perf_counter()), 1e-9)
        out = {
            "tokens_per_second_per_device": self.tokens / elapsed,
            "tflops_per_device": self.flops / elapsed / 1e12,
        }
        if self.peak_tflops:
            out["mfu"] = out["tflops_per_device"] / self.peak_tflops
        if self.cuda:
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.history.append(out)
        self._reset()
        return out

    def averages(self) -> dict:
        """Mean over intervals, leaving out the first (start-up, compilation) when there are more."""
        rows = self.history[1:] if len(self.history) > 1 else self.history
        if not rows:
            return {}
        keys = [k for k in rows[0] if k != "peak_memory_gib"]
        out = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
        if "peak_memory_gib" in rows[0]:
            out["peak_memory_gib"] = max(r["peak_memory_gib"] for r in self.history)
        return out


def count_params(model) -> int:
    """All parameters counted once (ZeRO-3 partitions report their full size through ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
