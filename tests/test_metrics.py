"""Model FLOPs and token counting for padded and packed batches."""

import torch

from recipe.metrics import ThroughputMeter, model_flops, token_stats


def stats(inputs):
    tokens, sum_sq = token_stats(inputs)
    return int(tokens), float(sum_sq)


def test_padded_batch_counts_real_tokens():
    inputs = {"input_ids": torch.zeros(2, 5, dtype=torch.long),
              "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    assert stats(inputs) == (8, 3**2 + 5**2)


def test_packed_batch_splits_at_position_resets():
    inputs = {"input_ids": torch.zeros(1, 7, dtype=torch.long),
              "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1]])}
    assert stats(inputs) == (7, 3**2 + 2**2 + 2**2)


def test_position_ids_with_padding_mask():
    inputs = {"input_ids": torch.zeros(2, 4, dtype=torch.long),
              "position_ids": torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]),
              "attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])}
    assert stats(inputs) == (6, 2**2 + 4**2)


def test_unmasked_batch():
    assert stats({"input_ids": torch.zeros(3, 4, dtype=torch.long)}) == (12, 3 * 16)


def test_model_flops_formula():
    # 6·N per token + 12·L·h·s² per sequence (the MFU definition)
    assert model_flops(2048, 2048**2, 1_235_814_400, 16, 2048) == 6 * 1_235_814_400 * 2048 + 12 * 16 * 2048 * 2048**2
    assert model_flops(8, 9 + 25, 10, 1, 2) == (6 * 10 * 3 + 12 * 2 * 9) + (6 * 10 * 5 + 12 * 2 * 25)


def test_meter_reports_rates_and_mfu():
    meter = ThroughputMeter(n_params=1000, n_layers=2, hidden=8, peak_tflops=1.0, cuda=False)
    meter.add_batch({"input_ids": torch.zeros(4, 16, dtype=torch.long)})
    report = meter.report()
    assert report["tokens_per_second_per_device"] > 0
    assert report["mfu"] == report["tflops_per_device"] / 1.0
    assert "peak_memory_gib" not in report  # CPU: not measurable
    meter.add_batch({"input_ids": torch.zeros(4, 16, dtype=torch.long)})
    second = meter.report()
    # 64 tokens in the second interval: tokens/s and TFLOP/s must describe the same interval
    expected = model_flops(64, 4 * 16**2, 1000, 2, 8) / 64 * second["tokens_per_second_per_device"] / 1e12
    assert abs(second["tflops_per_device"] - expected) < 1e-9 * max(expected, 1)
    assert meter.averages()["tokens_per_second_per_device"] == meter.history[1]["tokens_per_second_per_device"]
