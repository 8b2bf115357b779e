"""scripts/merge_lora.py and scripts/generate.py on a tiny Llama and a LoRA adapter made here (CPU, offline)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, load_script

SEED = 7  # the tiny base's init seed, as a run's args.json records it
PROMPT = "reverse: abcd"


def tiny_base(tokenizer):
    """The tiny default exactly as train_ds.py builds it for a run with this seed."""
    from types import SimpleNamespace

    from recipe.config import ModelArguments
    from recipe.modeling import load_model

    return load_model(ModelArguments(), SimpleNamespace(seed=SEED, trust_remote_code=False), tokenizer)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """base/ (tiny model + tokenizer), adapter/ (LoRA on every linear layer, lora_B nudged off zero, + tokenizer)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from recipe.modeling import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("lora")
    tokenizer = build_tiny_tokenizer()
    tiny_base(tokenizer).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    model = AutoModelForCausalLM.from_pretrained(root / "base")  # records base/ as base_model_name_or_path
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fresh adapter is a no-op (lora_B = 0): make it change the outputs
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(root / "adapter")
    tokenizer.save_pretrained(root / "adapter")
    assert json.loads((root / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(root / "base")
    return root


@pytest.fixture(scope="module")
def merge_lora():
    return load_script(ROOT / "scripts" / "merge_lora.py")


@pytest.fixture(scope="module")
def generate():
    return load_script(ROOT / "scripts" / "generate.py")


@pytest.fixture(scope="module")
def merged(made, merge_lora):
    out = made / "merged"
    result = merge_lora.merge(made / "adapter", out)
    return out, result


def logits(model, tokenizer):
    import torch

    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**enc).logits


def state(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_merged_model_matches_base_plus_adapter_and_differs_from_base(made, merged):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from recipe.modeling import load_tokenizer

    out, result = merged
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "adapter_config.json").exists()
    # the script's own check: losses before (base + adapter) and after (merged) agree, the base alone differs
    assert abs(result["loss_merged"] - result["loss_base_plus_adapter"]) < 1e-4
    assert abs(result["loss_merged"] - result["loss_base"]) > 1e-2
    tokenizer = load_tokenizer(str(out))
    merged_model = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(made / "base").eval()
    base_logits = logits(base, tokenizer)
    with_adapter = logits(PeftModel.from_pretrained(base, made / "adapter").eval(), tokenizer)
    assert torch.allclose(logits(merged_model, tokenizer), with_adapter, atol=1e-4)
    assert (logits(merged_model, tokenizer) - base_logits).abs().max() > 1e-2


def test_tiny_default_base_is_found_or_rebuilt_from_the_run(made, merged, merge_lora, tmp_path):
    """Adapters of the tiny default: null base (rebuilt from the run's seed, or --base tiny --seed) and a
    relative results/<run>/base_model path that only resolves beside the adapter give the same merged weights."""
    import torch

    expected = state(merged[0])
    config = json.loads((made / "adapter" / "adapter_config.json").read_text())
    for case, recorded, args in (("null_args", None, True), ("null_flag", None, False),
                                 ("base_model", "results/gone-run/base_model", False)):
        run = tmp_path / case
        shutil.copytree(made / "adapter", run / "model")
        (run / "model" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": recorded}))
        if args:
            (run / "args.json").write_text(json.dumps({"script": {"random_init": False}, "training": {"seed": SEED},
                                                       "model": {"model_name_or_path": None}}))
        if recorded:
            shutil.copytree(made / "base", run / "base_model")
        base, seed = ("tiny", SEED) if case == "null_flag" else (None, None)
        result = merge_lora.merge(run / "model", run / "merged", base=base, seed=seed)
        got = state(run / "merged")
        assert got.keys() == expected.keys(), case
        assert all(torch.equal(got[k], expected[k]) for k in expected), case
        assert result["loss_merged"] == pytest.approx(merged[1]["loss_merged"], abs=1e-6), case


def test_merge_in_bf16_passes_its_check(made, merge_lora, tmp_path):
    import torch

    result = merge_lora.merge(made / "adapter", tmp_path / "bf16", dtype="bf16")
    assert result["dtype"] == "bfloat16"
    assert abs(result["loss_merged"] - result["loss_base_plus_adapter"]) <= result["tolerance"] * result["loss_merged"]
    assert next(iter(state(tmp_path / "bf16").values())).dtype == torch.bfloat16


def run_generate(generate, capsys, model: Path, *extra: str) -> list[dict]:
    assert generate.main([str(model), "--prompt", PROMPT, "--max_new_tokens", "12", "--json", *extra]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_generate_answers_the_same_from_adapter_and_merged(made, merged, generate, capsys, tmp_path):
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "reverse: xyz"},
                                             {"role": "assistant", "content": "zyx"}]}) + "\n")
    from_adapter = run_generate(generate, capsys, made / "adapter", "--prompts_file", str(rows))
    from_merged = run_generate(generate, capsys, merged[0], "--prompts_file", str(rows))
    assert [r["reference"] for r in from_merged] == [None, "zyx"]
    assert all(r["answer"].strip() for r in from_merged)
    assert [r["answer"] for r in from_adapter] == [r["answer"] for r in from_merged]  # greedy: deterministic
    from_base = run_generate(generate, capsys, made / "base")
    assert from_base[0]["answer"] != from_merged[0]["answer"]
    sampled = run_generate(generate, capsys, merged[0], "--temperature", "1.0", "--seed", "1")
    assert sampled[0]["answer"] == run_generate(generate, capsys, merged[0], "--temperature", "1.0",
                                                "--seed", "1")[0]["answer"]


def test_errors_name_the_fix(made, merge_lora, generate, tmp_path):
    checkpoint = tmp_path / "checkpoint-4"
    (checkpoint / "global_step4").mkdir(parents=True)
    shape = tmp_path / "shape"
    shape.mkdir()
    shutil.copy(made / "base" / "config.json", shape / "config.json")  # a --random_init shape: no weights
    no_base = tmp_path / "no_base"
    shutil.copytree(made / "adapter", no_base)
    config = json.loads((no_base / "adapter_config.json").read_text())
    (no_base / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    cases = [
        (made / "missing", {}, "does not exist"),
        (checkpoint, {}, "scripts/export.py"),
        (made / "base", {}, "full model folder"),
        (no_base, {}, "--base tiny"),
        (made / "adapter", {"base": str(shape)}, "cannot be reconstructed"),
        (made / "adapter", {"base": str(tmp_path / "nowhere" / "base")}, "not found"),
    ]
    for adapter, kwargs, fix in cases:
        with pytest.raises(SystemExit) as e:
            merge_lora.merge(adapter, tmp_path / "out", **kwargs)
        assert fix in str(e.value), (adapter, str(e.value))
    with pytest.raises(SystemExit) as e:
        merge_lora.merge(made / "adapter", made / "base")  # never overwrites
    assert "not empty" in str(e.value)
    with pytest.raises(SystemExit) as e:
        generate.main([str(made / "missing"), "--prompt", "hi"])
    assert "does not exist" in str(e.value)


def test_cli_exits_nonzero_with_the_message(made, tmp_path):
    for script, args, fix in (("merge_lora.py", [str(tmp_path), "--out", str(tmp_path / "out")], "scripts/export.py"),
                              ("generate.py", [str(tmp_path / "missing"), "--prompt", "hi"], "does not exist")):
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode != 0 and fix in proc.stderr, proc.stderr


def test_a_wrong_merge_fails_the_check_and_writes_nothing(made, merge_lora, tmp_path, monkeypatch):
    from peft.tuners.lora import LoraModel

    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *a, **k: self.unload())  # drops the adapter
    with pytest.raises(SystemExit) as e:
        merge_lora.merge(made / "adapter", tmp_path / "out")
    assert "the merge is wrong" in str(e.value)
    assert not (tmp_path / "out").exists()
