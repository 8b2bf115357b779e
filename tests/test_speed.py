"""Speed options, random-weight models and the benchmark's report (CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import ROOT, free_port
from recipe.errors import ConfigError
from recipe.speed import apply_speed, resolve_speed


NO_Z3 = {"zero3_leaf_layers": False}


@pytest.mark.parametrize("stage,cuda,liger,expected", [
    (2, True, True, {"fused_loss": "liger", "compile_layers": True, "liger_kernels": False, **NO_Z3}),
    (3, True, True, {"fused_loss": "liger", "compile_layers": True, "liger_kernels": False, "zero3_leaf_layers": True}),
    (3, True, False, {"fused_loss": "trl", "compile_layers": True, "liger_kernels": False, "zero3_leaf_layers": True}),
    (3, False, True, {"fused_loss": "trl", "compile_layers": False, "liger_kernels": False, **NO_Z3}),
    (2, True, False, {"fused_loss": "trl", "compile_layers": True, "liger_kernels": False, **NO_Z3}),
    (2, False, True, {"fused_loss": "trl", "compile_layers": False, "liger_kernels": False, **NO_Z3}),
])
@pytest.mark.parametrize("packed", [False, True])
def test_auto_speed_choices(stage, cuda, liger, expected, packed):
    choices = resolve_speed("auto", "auto", "auto", stage, cuda, liger, padding_free=packed, varlen=True)
    assert choices == ({**expected, "varlen_attention": cuda and packed, "tiled_mlp": False}, [])


ZERO3_HEAD_PROBE = '''
import json, sys
from types import MethodType
from recipe.hardware import prepare_process
prepare_process()
import deepspeed, torch
from transformers import LlamaConfig, LlamaForCausalLM
from recipe.speed import apply_speed
deepspeed.init_distributed("gloo")

def head_read_outside_its_module(self, input_ids, labels):  # what Liger's fused loss does with lm_head.weight
    hidden = self.model(input_ids=input_ids).last_hidden_state
    logits = hidden @ self.get_output_embeddings().weight.t()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

def losses(tied, zero3, leaf, head_outside):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    if head_outside:
        model.forward = MethodType(head_read_outside_its_module, model)
    else:
        model.forward = MethodType(lambda self, input_ids, labels: LlamaForCausalLM.forward(
            self, input_ids=input_ids, labels=labels).loss, model)
    apply_speed(model, {"fused_loss": "trl", "compile_layers": False, "liger_kernels": False,  # forward above
                        "tiled_mlp": False, "zero3_leaf_layers": leaf})
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    if not zero3:
        out = []
        for _ in range(3):
            loss = model(ids, ids); loss.backward(); optimizer.step(); optimizer.zero_grad(); out.append(loss.item())
        return out
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    hooked = [type(m).__name__ for m in engine.module.modules() if getattr(m, "_forward_pre_hooks", None)]
    out = []
    try:
        for _ in range(3):
            loss = engine(ids, ids); engine.backward(loss); engine.step(); out.append(loss.item())
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:300], "hooked": hooked}
    return {"losses": out, "hooked": hooked}

print(json.dumps({str(tied): {"plain": losses(tied, False, False, True),
                              "zero3": losses(tied, True, False, False),
                              "zero3_head_outside": losses(tied, True, False, True),
                              "zero3_leaf_head_outside": losses(tied, True, True, True)} for tied in (True, False)}))
'''


def test_zero3_gathers_a_head_read_outside_its_module_and_leaf_layers_train_the_same():
    """The fused loss under ZeRO-3 (real DeepSpeed, 1 CPU process): a forward that reads the LM head's weight outside
    the head's module, as Liger's does, trains as without ZeRO (DeepSpeed gathers the weight on access), tied to the
    embedding or not, with the decoder layers as ZeRO-3 leaf modules (hooked as one module) or not."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["MASTER_PORT"] = str(free_port())
    proc = subprocess.run([sys.executable, "-c", ZERO3_HEAD_PROBE], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for tied, runs in result.items():
        plain = runs["plain"]
        assert plain[-1] < plain[0], (tied, plain)  # it learns
        for name in ("zero3", "zero3_head_outside", "zero3_leaf_head_outside"):
            assert runs[name].get("losses") == pytest.approx(plain, rel=1e-5), (tied, name, runs[name])
        leaf_hooks, module_hooks = runs["zero3_leaf_head_outside"]["hooked"], runs["zero3"]["hooked"]
        assert "LlamaDecoderLayer" in leaf_hooks and "LlamaMLP" not in leaf_hooks and "LlamaMLP" in module_hooks


def test_zero3_compiles_leaf_layers_unless_parameters_are_offloaded():
    choices, _ = resolve_speed("auto", "auto", "auto", 3, True, True, varlen=True)
    assert choices["compile_layers"] and choices["zero3_leaf_layers"] and not choices["liger_kernels"]
    choices, _ = resolve_speed("auto", "auto", "auto", 3, True, True, varlen=True, param_offload=True)
    assert not choices["compile_layers"] and not choices["zero3_leaf_layers"] and choices["liger_kernels"]
    choices, _ = resolve_speed("auto", "true", "auto", 3, True, True, varlen=True, param_offload=True)  # asked for
    assert choices["compile_layers"] and choices["zero3_leaf_layers"]
    choices, _ = resolve_speed("auto", "auto", "auto", 2, True, True, varlen=True, param_offload=True)
    assert choices["compile_layers"] and not choices["zero3_leaf_layers"]


def test_varlen_attention_refusals_are_named():
    _, problems = resolve_speed("auto", "auto", "auto", 2, False, False, varlen_attention="true", varlen=True)
    assert len(problems) == 1 and "CUDA GPU" in problems[0] and "--varlen_attention false" in problems[0]
    _, problems = resolve_speed("auto", "auto", "auto", 2, True, True, varlen_attention="true", varlen=True)
    assert len(problems) == 1 and "--packing true" in problems[0]


def test_impossible_speed_choices_are_named():
    _, problems = resolve_speed("liger", "auto", "true", 3, False, False)
    text = " ".join(problems)
    assert "liger-kernel" in text and "CUDA" in text and "--liger_kernels false" in text


def test_compiled_layers_keep_names_and_values():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (2, 8))
    expected = model(input_ids=ids, labels=ids).loss
    names = [n for n, _ in model.named_parameters()]
    apply_speed(model, {"fused_loss": "trl", "compile_layers": True, "liger_kernels": False, "varlen_attention": False,
                        "tiled_mlp": False})
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints unchanged
    assert model(input_ids=ids, labels=ids).loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_zero3_leaf_layers_may_each_compile_their_own_graph(monkeypatch):
    """Under ZeRO-3 a compiled leaf layer may compile once per layer: the recompile limit must let all of them
    (torch's default of 8 left the 1B shape's layers 9-16 eager on an H200)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    monkeypatch.setattr(torch._dynamo.config, "accumulated_recompile_limit", 256)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=12,
                         num_attention_heads=4, num_key_value_heads=2)
    choices = {"fused_loss": "trl", "compile_layers": True, "liger_kernels": False, "tiled_mlp": False}
    apply_speed(LlamaForCausalLM(config), {**choices, "zero3_leaf_layers": False})
    assert torch._dynamo.config.recompile_limit == 8  # ZeRO-2's compiled layers share one graph
    apply_speed(LlamaForCausalLM(config), {**choices, "zero3_leaf_layers": True})
    assert torch._dynamo.config.recompile_limit >= 12


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
    # accumulation: the data holds every micro-batch of every step, and a step's time counts them all
    assert benchmark.max_accumulation([["a", ""], ["b", "--use_peft true --gradient_accumulation_steps 32"]]) == 32
    accumulated = benchmark.row_from("g", "g", {"tokens_per_second_per_device": 6900.0}, "ok", "GPU", 1, "3", 4, 2048,
                                     ["--gradient_accumulation_steps", "1", "--gradient_accumulation_steps", "32"])
    assert accumulated["step_time_s"] == pytest.approx(4 * 32 * 2048 / 6900.0)


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


def test_fp8_is_refused_where_it_cannot_run_each_with_its_remedy():
    from recipe.fp8 import fp8_problems

    ok = dict(cuda=True, capability=(9, 0), bf16=True, fp16=False, have_torchao=True)
    assert fp8_problems("tensorwise", **ok) == [] and fp8_problems("rowwise_with_gw_hp", **ok) == []
    (cpu,) = fp8_problems("tensorwise", **{**ok, "cuda": False, "capability": None, "bf16": False})
    assert "CUDA GPU" in cpu and "drop --fp8" in cpu
    (ampere,) = fp8_problems("tensorwise", **{**ok, "capability": (8, 0)})
    assert ">= 8.9" in ampere and "8.0" in ampere
    assert fp8_problems("tensorwise", **{**ok, "capability": (8, 9)}) == []  # Ada
    (half,) = fp8_problems("tensorwise", **{**ok, "bf16": False, "fp16": True})
    assert "--bf16 true" in half
    (lib,) = fp8_problems("tensorwise", **{**ok, "have_torchao": False})
    assert "uv sync" in lib
    (bad,) = fp8_problems("blockwise", **ok)
    assert "tensorwise" in bad


def test_fp8_on_cpu_stops_before_any_weights_load():
    from recipe.config import parse_args

    with pytest.raises(ConfigError) as e:
        parse_args(["--report_to", "none", "--fp8", "true"])
    (problem,) = e.value.problems
    assert "--fp8 needs a CUDA GPU" in problem


def test_fp8_converts_the_decoder_linears_only_and_keeps_the_checkpoint_keys():
    """torchao's emulated float8 (no FP8 hardware here): q/k/v/o and gate/up/down become Float8Linear, the head and
    embedding stay, state-dict keys are unchanged, the loss stays close to bf16 and gradients reach every weight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from recipe import fp8

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 32))
    expected = model(input_ids=ids, labels=ids).loss.item()
    keys = list(model.state_dict())
    assert fp8.convert(model, "tensorwise", emulate=True) == 2 * 7
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["model.layers.1.mlp.down_proj"] == "Float8Linear" and kinds["lm_head"] == "Linear"
    assert list(model.state_dict()) == keys
    loss = model(input_ids=ids, labels=ids).loss
    assert loss.item() == pytest.approx(expected, rel=2e-2)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_benchmark_data_chat_lengths_markov_tokens_and_loss_gaps(tmp_path):
    """--lengths chat: long-tailed lengths (median near 300, clipped to seq_len); --tokens markov: every next id is
    one of 4 successors of the previous; the loss gap is taken after warm-up against the reference variant."""
    import sys

    import pyarrow.parquet as pq

    sys.path.insert(0, "scripts")
    import benchmark

    lengths = benchmark.chat_lengths(20000, 4096)
    assert 270 <= float(sorted(lengths)[len(lengths) // 2]) <= 330 and lengths.max() <= 4096 and lengths.min() >= 16
    assert (lengths > 2048).mean() > 0.01  # a tail
    benchmark.make_data(tmp_path / "d.parquet", 50, 512, 30000, "chat", "markov")
    rows = pq.read_table(tmp_path / "d.parquet")["input_ids"].to_pylist()
    assert len({len(r) for r in rows}) > 10 and max(len(r) for r in rows) <= 512
    follows = {}
    for r in rows:
        for a, b in zip(r, r[1:]):
            follows.setdefault(a, set()).add(b)
    assert max(len(v) for v in follows.values()) <= benchmark.MARKOV_SUCCESSORS
    base = dict(zero_stage="2", num_gpus=1, batch_size=16)
    table = [{**base, "name": "bf16", "variant": "bf16", "loss_curve": [(10, 5.0), (30, 2.0), (40, 1.5)]},
             {**base, "name": "fp8", "variant": "fp8", "loss_curve": [(10, 9.0), (30, 2.02), (40, 1.5)]}]
    benchmark.add_loss_gaps(table, "bf16", warmup=20)
    assert table[1]["loss_gap_vs_reference"] == pytest.approx(0.01) and table[0]["loss_gap_vs_reference"] is None
    assert benchmark.write_loss_chart(table, tmp_path / "l.png", "t")


def test_a_benchmark_run_past_its_timeout_is_ended_with_its_children(tmp_path):
    """A timed-out row kills the launcher's whole process group: no rank is left holding the GPU or MASTER_PORT
    for the next row (seen on an H200: the next row then stopped on 'MASTER_PORT 29500 is already in use')."""
    import sys
    import time

    sys.path.insert(0, "scripts")
    import benchmark

    pid_file = tmp_path / "child.pid"
    cmd = ["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"]
    summary, status = benchmark.run_one("slow", cmd, tmp_path / "run", tmp_path, timeout=2)
    assert summary is None and status == "timeout after 2s"
    stat = Path(f"/proc/{int(pid_file.read_text())}/stat")

    def alive():  # a zombie (killed, not yet reaped by whoever inherited it) is dead
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + 5
    while alive() and time.time() < deadline:
        time.sleep(0.1)
    assert not alive()
    # a run that wrote its summary and then ran into the limit while shutting down (the 8B LoRA row at 256K on an
    # H200: summary at 14:31:57, the limit 3 s later) keeps its figures
    run = tmp_path / "late"
    write = f"echo '{{\"tokens_per_second_per_device\": 949.2}}' > {run}/summary.json"
    cmd = ["bash", "-c", f"mkdir -p {run}; {write}; sleep 60"]
    summary, status = benchmark.run_one("late", cmd, run, tmp_path, timeout=2)
    assert summary == {"tokens_per_second_per_device": 949.2} and status.startswith("ok (its summary written")


def test_tiled_mlp_gives_the_same_loss_and_gradients():
    """DeepSpeed's TiledMLP through recipe.long_context: the MLP in sequence shards of about hidden_size tokens
    (here 8), recomputed in backward, gives the loss and every gradient of the plain model (fp32)."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from recipe.long_context import apply_tiled_mlp, shards_for, tiled_mlp_wanted

    assert tiled_mlp_wanted("auto", 32768) and not tiled_mlp_wanted("auto", 8192) and tiled_mlp_wanted("true", 16)
    assert shards_for(256, 32) == 8 and shards_for(10, 32) == 1
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    plain = LlamaForCausalLM(config).float()
    tiled = copy.deepcopy(plain)
    assert apply_tiled_mlp(tiled.model.layers) == 2 and list(tiled.state_dict()) == list(plain.state_dict())
    ids = torch.randint(0, 64, (2, 256))
    calls = []
    tiled.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[-2]))
    losses = [m(input_ids=ids, labels=ids).loss for m in (plain, tiled)]
    for loss in losses:
        loss.backward()
    # forward: 8 shards of 32 positions (both rows); backward: recomputed over 8 shards of the 2 x 256 tokens
    assert calls == [32] * 8 + [64] * 8
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for (name, a), (_, b) in zip(plain.named_parameters(), tiled.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_tiled_mlp_keeps_the_layers_uncompiled_or_says_why():
    choices, problems = resolve_speed("auto", "auto", "auto", 2, True, True, varlen=True, tiled_mlp=True)
    assert choices["compile_layers"] is False and choices["tiled_mlp"] is True and problems == []
    _, problems = resolve_speed("auto", "true", "auto", 2, True, True, varlen=True, tiled_mlp=True)
    assert len(problems) == 1 and "--tiled_mlp false" in problems[0]


@pytest.mark.slow
def test_tiled_mlp_under_zero3_on_two_processes_matches_untiled(tmp_path):
    """2 processes (deepspeed launcher, gloo), ZeRO-3, 600-token rows (5 shards of the tiny model's 128): the shard
    count agreed across ranks, weight gradients held to the last shard, the same losses as without tiling."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import check_ok, launch, only_run_dir, read_summary, train_losses

    data = tmp_path / "long.parquet"
    pq.write_table(pa.table({"input_ids": list(np.random.default_rng(0).integers(5, 60, size=(32, 600)))}), data)
    losses = {}
    for tiled in ("false", "true"):
        out = tmp_path / tiled
        check_ok(launch(["--dataset_name", str(data), "--eval_dataset_name", str(data), "--eval_strategy", "no",
                         "--heldout_eval", "false", "--max_length", "600", "--zero_stage", "3", "--tiled_mlp", tiled,
                         "--per_device_train_batch_size", "2", "--global_batch_size", "4", "--max_steps", "4",
                         "--logging_steps", "1", "--save_strategy", "no", "--save_final_model", "false",
                         "--report_to", "none"], out, nproc=2, launcher="deepspeed"))
        losses[tiled] = train_losses(only_run_dir(out))
        assert read_summary(out)["tiled_mlp"] is (tiled == "true")
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)


def test_sequence_parallel_refusals_are_named():
    from recipe.long_context import sequence_parallel_model_problems, sequence_parallel_problems
    from recipe.modeling import model_config

    assert sequence_parallel_problems(1, 1, None) == [] and sequence_parallel_problems(2, 4, 3) == []
    (text,) = sequence_parallel_problems(3, 2, 2)
    assert "does not divide the 2 processes" in text and "multiple of 3" in text
    (text,) = sequence_parallel_problems(2, 2, 0)
    assert "ZeRO 1-3" in text and "--zero_stage 2" in text
    (text,) = sequence_parallel_problems(2, 2, 2, padding_free=True)
    assert "--packing_strategy wrapped" in text
    tiny = model_config(None)  # 4 attention heads
    assert sequence_parallel_model_problems(2, tiny, None) == []
    (text,) = sequence_parallel_model_problems(3, tiny, None)
    assert "4 attention heads" in text and "divisor of 4" in text
    (text,) = sequence_parallel_model_problems(2, tiny, "eager")
    assert "--attn_implementation eager" in text and "sdpa" in text


@pytest.mark.slow
@pytest.mark.parametrize("stage,extra", [("2", []), ("3", []), ("2", ["--use_peft", "true", "--lora_dropout", "0"]),
                                         ("2", ["--packing", "true", "--packing_strategy", "wrapped"])],
                         ids=["zero2", "zero3", "lora", "packed"])
def test_sequence_parallel_on_two_processes_matches_one(tmp_path, stage, extra):
    """Ulysses on CPU (gloo, 2 processes, the tiny default's 4 heads split 2 + 2): each sequence split over both
    ranks trains with the same losses and gradient norms as one process with the whole sequence, fp32, and evaluates
    to the same eval loss."""
    from conftest import FAST, check_ok, launch, logged, only_run_dir, read_summary

    records, evals, flops = {}, {}, {}
    for sp, nproc in ((1, 1), (2, 2)):
        out = tmp_path / f"sp{sp}"
        check_ok(launch([*FAST, "--global_batch_size", "4", "--zero_stage", stage, "--bf16", "false",
                         "--eval_strategy", "steps", "--eval_steps", "2", "--max_eval_samples", "16",
                         "--sequence_parallel_size", str(sp), *extra], out, nproc=nproc,
                        launcher="torchrun" if nproc > 1 else "python"))
        records[sp] = [(r["loss"], r["grad_norm"]) for _, r in sorted(logged(only_run_dir(out)).items())
                       if "loss" in r]
        # model FLOPs per token (attention over the whole sequence, though each rank holds a shard of it)
        flops[sp] = [r["tflops_per_device"] * 1e12 / r["tokens_per_second_per_device"]
                     for _, r in sorted(logged(only_run_dir(out)).items())]
        summary = read_summary(out)
        assert summary["sequence_parallel_size"] == sp and summary["global_batch_size"] == 4, summary
        evals[sp] = summary["eval_loss"]
    # eval is not split: whole sequences, rows sharded over all ranks as in data parallel; packed rows then batch
    # differently than in one process (a 2-process sp=1 run evaluates to the same 4.39135 as sp=2, 2026-12-02)
    assert evals[2] == pytest.approx(evals[1], rel=1e-3 if "--packing" in extra else 1e-4)
    assert len(records[2]) == len(records[1]) == 4
    assert flops[2] == pytest.approx(flops[1], rel=1e-3), flops
    for (loss1, norm1), (loss2, norm2) in zip(records[1], records[2]):
        assert loss2 == pytest.approx(loss1, rel=1e-4) and norm2 == pytest.approx(norm1, rel=1e-4), records


def test_activation_offloading_on_cpu_stops_before_any_weights_load():
    """TRL's activation offloading uses CUDA streams and pinned memory; on CPU it crashed inside the first step with
    a CUDA driver error. Now: one line with the fix, before any weights load."""
    from recipe.config import parse_args

    with pytest.raises(ConfigError) as err:
        parse_args(["--report_to", "none", "--activation_offloading", "true"])
    assert "--activation_offloading" in str(err.value) and "CUDA GPU" in str(err.value)


def test_activation_offloading_is_on_by_length_with_cuda_and_a_bool_after_parsing():
    """auto: on with CUDA from 128K tokens of --max_length; an explicit true/false (or a YAML bool) wins; the parsed
    config holds a bool, which TRL's trainer reads."""
    from recipe.config import parse_args
    from recipe.long_context import ACTIVATION_OFFLOAD_AUTO_LENGTH, activation_offload_wanted

    assert ACTIVATION_OFFLOAD_AUTO_LENGTH == 131072
    assert activation_offload_wanted("auto", 131072, cuda=True)
    assert not activation_offload_wanted("auto", 131071, cuda=True)
    assert not activation_offload_wanted("auto", 524288, cuda=False)
    assert not activation_offload_wanted("false", 524288, cuda=True)
    assert activation_offload_wanted(True, 2048, cuda=True) and not activation_offload_wanted(False, 10**6, cuda=True)
    training_args = parse_args(["--report_to", "none"])[1]
    assert training_args.activation_offloading is False  # auto, on CPU


@pytest.mark.slow
def test_sequence_parallel_run_resumes_where_it_stopped(tmp_path):
    """Ulysses (sp=2, 2 CPU processes) saved at step 2 of 4 and rerun from there: the resumed steps log the losses
    of the uninterrupted run (resume had died: the Trainer's batch skipping read the SP adapter's missing dataset)."""
    import shutil

    from conftest import FAST, check_ok, launch, logged, only_run_dir, read_summary

    args = [*FAST, "--global_batch_size", "4", "--bf16", "false", "--sequence_parallel_size", "2",
            "--save_strategy", "steps", "--save_steps", "2"]
    check_ok(launch(args, tmp_path, nproc=2, launcher="torchrun"))
    run = only_run_dir(tmp_path)
    whole = {s: r["loss"] for s, r in logged(run).items()}
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    check_ok(launch(args, tmp_path, nproc=2, launcher="torchrun"))
    assert read_summary(tmp_path)["resumed_from"].endswith("checkpoint-2")
    resumed = {s: r["loss"] for s, r in logged(run).items()}
    assert sorted(resumed) == [1, 2, 3, 4] and resumed == pytest.approx(whole, rel=1e-4)


@pytest.mark.parametrize("gpu_gib,seq,on", [(139.8, 32768, False), (139.8, 65536, False), (80, 65536, True),
                                            (80, 32768, False)])
def test_tiled_mlp_auto_stays_on_only_where_the_run_needs_it(gpu_gib, seq, on):
    """--tiled_mlp auto is on by length from 32K, then off again where the run fits the GPU untiled by the estimate
    (the compiled layers are faster: 30.7k against 27.5k tokens/s at 32K on an H200); the 1B shape at 64K needs 96
    GiB untiled, so an 80 GB GPU keeps the tiled MLP."""
    from recipe import estimate, preflight
    from recipe.config import parse_args

    flags = ["--report_to", "none", "--model_name_or_path", str(ROOT / "configs/models/llama-3.2-1b"),
             "--max_length", str(seq), "--per_device_train_batch_size", "1"]
    _, training_args, model_args = parse_args(flags)
    assert training_args.speed["tiled_mlp"] is True  # by length, before the shape is known
    shape = estimate.load_shape(model_args.model_name_or_path)
    hw = estimate.Hardware(1, gpu_gib, gpu_name="GPU")
    assert preflight.settle_tiled_mlp(training_args, model_args, shape, hw) is on
    assert training_args.speed["tiled_mlp"] is on
    _, explicit, _ = parse_args(flags + ["--tiled_mlp", "true"])
    assert preflight.settle_tiled_mlp(explicit, model_args, shape, hw) is None and explicit.speed["tiled_mlp"]
