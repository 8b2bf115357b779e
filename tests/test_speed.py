"""Speed options, random-weight models and the benchmark's report (CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from recipe.speed import apply_speed, resolve_speed


@pytest.mark.parametrize("stage,cuda,liger,expected", [
    (2, True, True, {"fused_loss": "liger", "compile_layers": True, "liger_kernels": False}),
    (3, True, True, {"fused_loss": "trl", "compile_layers": False, "liger_kernels": True}),
    (2, True, False, {"fused_loss": "trl", "compile_layers": True, "liger_kernels": False}),
    (2, False, True, {"fused_loss": "trl", "compile_layers": False, "liger_kernels": False}),
])
def test_auto_speed_choices(stage, cuda, liger, expected):
    assert resolve_speed("auto", "auto", "auto", stage, cuda, liger) == (expected, [])


def test_impossible_speed_choices_are_named():
    _, problems = resolve_speed("liger", "auto", "true", 3, False, False)
    text = " ".join(problems)
    assert "liger-kernel" in text and "CUDA" in text and "ZeRO-3" in text and "--liger_kernels false" in text


def test_compiled_layers_keep_names_and_values():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (2, 8))
    expected = model(input_ids=ids, labels=ids).loss
    names = [n for n, _ in model.named_parameters()]
    apply_speed(model, {"fused_loss": "trl", "compile_layers": True, "liger_kernels": False})
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints unchanged
    assert model(input_ids=ids, labels=ids).loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_random_init_from_a_config_folder(tmp_path):
    from types import SimpleNamespace

    from recipe.modeling import load_model

    config = json.loads(open("configs/models/llama-3.2-1b/config.json").read())
    config.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=300)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model_args = SimpleNamespace(model_name_or_path=str(tmp_path), dtype=None, attn_implementation=None,
                                 model_revision="main")
    training_args = SimpleNamespace(seed=0, trust_remote_code=False)
    model = load_model(model_args, training_args, tokenizer=None, random_init=True)
    assert model.config.vocab_size == 300 and model.config.num_hidden_layers == 2
    from recipe.config import ConfigError

    with pytest.raises(ConfigError, match="config.json"):
        load_model(SimpleNamespace(**{**vars(model_args), "model_name_or_path": str(tmp_path / "none")}),
                   training_args, tokenizer=None, random_init=True)


def test_shipped_model_shapes_have_the_published_sizes():
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {"llama-3.2-1b": 1.236e9, "llama-3.2-3b": 3.213e9, "llama-3.1-8b": 8.030e9, "llama-3.1-70b": 70.55e9}
    for name, size in sizes.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(f"configs/models/{name}"))
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(size, rel=1e-3), name


def test_benchmark_ratios_and_report(tmp_path):
    import sys

    sys.path.insert(0, "scripts")
    import benchmark

    def row(variant, gpus, tps, batch=4):
        return benchmark.row_from(f"{variant}_{gpus}", variant, {"tokens_per_second_per_device": tps, "mfu": 0.3,
                                  "peak_memory_gib": 1.0, "train_loss": 2.0}, "ok", "GPU", gpus, "2", batch, 2048, ["x"])

    rows = [row("baseline", 1, 100.0), row("baseline", 1, 120.0, batch=8), row("ours", 1, 200.0, batch=16),
            row("ours", 2, 190.0, batch=16), benchmark.row_from("ours_4", "ours", None, "out of GPU memory", "GPU",
                                                                 4, "2", 16, 2048, ["x"])]
    benchmark.add_ratios(rows)
    # against the fastest baseline row (the seed recipe at its best batch), not the guides' batch 4
    assert rows[2]["speedup_vs_baseline"] == pytest.approx(200.0 / 120.0)
    assert rows[3]["scaling_vs_1gpu"] == pytest.approx(0.95)
    assert rows[2]["step_time_s"] == pytest.approx(16 * 2048 / 200.0)
    benchmark.write_table(rows, tmp_path / "t.md", "# t")
    table = (tmp_path / "t.md").read_text()
    assert "| 95.0% |" in table and "out of GPU memory" in table and "1.67x" in table and "vs best baseline" in table
    benchmark.write_chart(rows, tmp_path / "c.png", "t")
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_benchmark_stops_the_baseline_at_its_first_out_of_memory(tmp_path, monkeypatch):
    """The baseline is searched upward through --baseline_batch_sizes; once a batch runs out of GPU memory the
    larger ones are not tried, and the best that ran is the reference."""
    import sys

    sys.path.insert(0, "scripts")
    import benchmark

    tried = []

    def fake_run(name, cmd, run_dir, log_dir, timeout):
        batch = int(name.rsplit("_b", 1)[1])
        tried.append((name.split("_")[0], batch))
        if name.startswith("baseline") and batch >= 32:
            return None, "out of GPU memory"
        return {"tokens_per_second_per_device": 1000.0 * batch if name.startswith("baseline") else 50000.0}, "ok"

    monkeypatch.setattr(benchmark, "run_one", fake_run)
    monkeypatch.setattr(benchmark, "gpu_name", lambda: ("GPU", 1))
    rows = benchmark.main(["--baseline", "--baseline_batch_sizes", "16,4,64,32,8", "--batch_sizes", "16",
                           "--max_steps", "2", "--out", str(tmp_path / "out"), "--work_dir", str(tmp_path / "w")])
    assert [b for v, b in tried if v == "baseline"] == [4, 8, 16, 32]  # ascending, none after the first OOM
    ours = next(r for r in rows if r["variant"] == "ours")
    assert ours["speedup_vs_baseline"] == pytest.approx(50000.0 / 16000.0)
