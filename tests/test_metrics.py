"""Model FLOPs (causal convention), MFU, GPU peaks and token counting for padded and packed batches."""

import pytest
import torch

from recipe import metrics
from recipe.metrics import (
    ThroughputMeter,
    flop_params,
    meter_for,
    model_flops,
    peak_tflops,
    token_stats,
)


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


def test_model_flops_counts_causal_attention():
    # per sequence (6·N)·s + 6·L·h·s² (causal: half the 12·L·h·s² of full attention)
    assert model_flops(2048, 2048**2, 1_235_814_400, 16, 2048) == 6 * 1_235_814_400 * 2048 + 6 * 16 * 2048 * 2048**2
    # two packed sequences of 3 and 5 tokens: attention per sequence, not per row
    assert model_flops(8, 9 + 25, 10, 1, 2) == (6 * 10 * 3 + 6 * 2 * 9) + (6 * 10 * 5 + 6 * 2 * 25)
    # frozen weights (LoRA's base): forward + input gradient, 4 per token
    assert model_flops(4, 16, 10, 1, 2, frozen_params=100) == 6 * 10 * 4 + 4 * 100 * 4 + 6 * 2 * 16


# a small Llama: V vocab, H hidden, I intermediate, L layers, 4 heads of 8, 2 KV heads
V, H, I, L, KV = 64, 32, 64, 2, 16


def tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        tie_word_embeddings=tied))


# by hand: per layer q, k, v, o, gate/up/down, two norms; then the final norm
DECODER = L * (H * H + 2 * H * KV + H * H + 3 * H * I + 2 * H) + H


def test_untied_embedding_left_out_head_counted():
    model = tiny_llama(tied=False)
    assert sum(p.numel() for p in model.parameters()) == V * H + DECODER + V * H
    meter = meter_for(model)
    assert (meter.n_params, meter.frozen_params) == (DECODER + V * H, 0)  # the head's V·H, not the lookup's
    assert flop_params(model) == (DECODER + V * H, 0)
    assert (meter.n_layers, meter.hidden) == (L, 4 * 8)


def test_tied_embedding_is_the_head_and_counts_once():
    model = tiny_llama(tied=True)
    assert sum(p.numel() for p in model.parameters()) == V * H + DECODER
    assert meter_for(model).n_params == DECODER + V * H  # nothing subtracted


def test_lora_counts_the_frozen_base_at_4n_without_the_embedding():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(tied=False), peft.LoraConfig(r=4, target_modules="all-linear"))
    # rank 4 on q, k, v, o, gate, up, down (all-linear leaves the LM head out): r·(in + out) each
    adapters = L * 4 * ((H + H) + 2 * (H + KV) + (H + H) + 3 * (H + I))
    meter = meter_for(model)
    assert meter.n_params == adapters
    assert meter.frozen_params == DECODER + V * H  # frozen base: the embedding lookup left out, the head kept
    flops = model_flops(2048, 2048**2, meter.n_params, meter.n_layers, meter.hidden, meter.frozen_params)
    assert flops == 2048 * (6 * adapters + 4 * (DECODER + V * H) + 6 * L * H * 2048)


def llama_1b(tied=True):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained("configs/models/llama-3.2-1b")
    config.tie_word_embeddings = tied
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# Llama-3.2-1B by hand: vocab 128256, hidden 2048, MLP 8192, 16 layers, 32 heads of 64, 8 KV heads of 64
N_1B = 16 * (2048 * 2048 + 2 * 2048 * 512 + 2048 * 2048 + 3 * 2048 * 8192 + 2 * 2048) + 2048 + 128256 * 2048


def measured_mfu(monkeypatch, model, batch: dict, tokens_per_second: float) -> float:
    """A fresh meter's MFU (against 989 TFLOP/s, H100/H200 SXM) for one interval of `batch` that took
    tokens/tokens_per_second seconds."""
    meter = meter_for(model)
    meter.peak_tflops = 989.0
    tokens = batch["input_ids"].numel()
    clock = iter([100.0, 100.0 + tokens / tokens_per_second])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    meter.add_batch(batch)
    report = meter.report()
    assert report["tokens_per_second_per_device"] == pytest.approx(tokens_per_second)
    return report["mfu"]


@pytest.mark.parametrize("tied", [True, False])
def test_mfu_of_the_1b_shape_at_2k_and_32k(monkeypatch, tied):
    assert N_1B == 1_235_814_400
    model = llama_1b(tied)
    meter = meter_for(model)
    assert (meter.n_params, meter.frozen_params) == (N_1B, 0)  # untied: 1.498B less the 0.263B lookup
    # seq 2048, 16 rows, 61,985 tokens/s (the H100 ZeRO-2 row): 6·N + 6·L·h·s per token
    per_token = 6 * N_1B + 6 * 16 * 2048 * 2048
    mfu = measured_mfu(monkeypatch, model, {"input_ids": torch.zeros(16, 2048, dtype=torch.long)}, 61_985)
    assert mfu == pytest.approx(61_985 * per_token / 989e12, rel=1e-12)
    assert round(mfu, 3) == 0.490  # the non-causal count said 0.515
    # one sequence of 32K at 30,000 tokens/s: attention is 46% of the FLOPs now
    per_token = 6 * N_1B + 6 * 16 * 2048 * 32768
    mfu = measured_mfu(monkeypatch, model, {"input_ids": torch.zeros(1, 32768, dtype=torch.long)}, 30_000)
    assert mfu == pytest.approx(30_000 * per_token / 989e12, rel=1e-12)
    assert round(mfu, 3) == 0.420  # the non-causal count said 0.616


def test_peak_tflops_by_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0  # SXM
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA H100 NVL") == 835.0  # 1,671 sparse / 2 (NVIDIA's datasheet); not the SXM 989
    assert peak_tflops("NVIDIA H200 NVL") == 835.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA GH200 480GB") == 989.0  # ours: TRL's table lacks it
    assert peak_tflops("NVIDIA H800") == 989.0 and peak_tflops("NVIDIA L40") == 181.0
    assert peak_tflops("Tesla V100-SXM2-32GB") is None and peak_tflops("Tesla V100-SXM2-32GB", "float16") == 125.0
    assert peak_tflops("Tesla T4", "float16") == 65.0
    assert peak_tflops("Some Unknown GPU") is None
    assert peak_tflops(None) is None


def test_meter_for_takes_the_peak_from_metrics(monkeypatch):
    for name, value in {"is_available": lambda: True, "get_device_name": lambda *a: "NVIDIA H100 NVL",
                        "is_bf16_supported": lambda **k: True, "reset_peak_memory_stats": lambda *a: None}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    assert meter_for(tiny_llama(tied=True)).peak_tflops == 835.0


def test_benchmark_table_states_the_convention(tmp_path):
    import sys

    sys.path.insert(0, "scripts")
    import benchmark

    row = benchmark.row_from("ours", "ours", {"tokens_per_second_per_device": 1.0, "mfu": 0.4}, "ok", "GPU", 1, "2",
                             1, 2048, ["x"])
    benchmark.add_ratios([row])
    benchmark.write_table([row], tmp_path / "t.md", "# t")
    assert row["mfu_convention"] == metrics.MFU_FORMULA
    assert metrics.MFU_FORMULA in (tmp_path / "t.md").read_text() and "6·L·h·s" in metrics.MFU_FORMULA


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
