"""LoRA with DeepSpeed on CPU: ZeRO-2 and ZeRO-3 with 2 processes, the adapter saved whole, resumed, evaluated
and merged; what cannot work (unknown target modules, QLoRA without a GPU) is refused before training.

Default run: ZeRO-3 on 2 processes (train, resume, evaluate the adapter, merge it in process, evaluate the merged
model). `-m slow`: ZeRO-2 and ZeRO-3 each the whole way, the base model evaluated by its own launch too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, check_ok, launch, load_script, only_run_dir, read_summary

LORA = ["--use_peft", "true", "--logging_steps", "1", "--eval_strategy", "no", "--heldout_eval", "false",
        "--save_strategy", "steps", "--save_steps", "4", "--report_to", "none", "--eval_steps", "4",
        "--max_train_samples", "128", "--max_eval_samples", "64", "--global_batch_size", "8",
        "--per_device_train_batch_size", "4"]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shm_files(proc: subprocess.CompletedProcess) -> list[str]:
    """DeepSpeed's CPU all-reduce files of the job `proc` ran (named by its master port), left in /dev/shm."""
    port = next(a.split("=", 1)[1] for a in proc.args if str(a).startswith("--master_port="))
    return [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")]


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def train_and_resume(tmp_path, stage: str) -> Path:
    """LoRA under ZeRO-`stage` on 2 processes, 8 steps, then the same command with 12: the run folder."""
    args = [*LORA, "--zero_stage", stage, "--max_steps", "8"]
    proc = launch(args, tmp_path, nproc=2, launcher="deepspeed")
    check_ok(proc)
    run_dir = only_run_dir(tmp_path)
    # DeepSpeed's CPU all-reduce files are released (rank files left in /dev/shm would hold RAM)
    assert not shm_files(proc)

    # the adapter is whole under ZeRO-3 too: A and B of every linear of every layer, B trained away from zero
    tensors = adapter_tensors(run_dir / "model")
    layers = json.loads((ROOT / "recipe" / "tiny_llama.json").read_text())["num_hidden_layers"]
    assert len(tensors) == 2 * len(LINEARS) * layers
    assert all(t.numel() > 0 for t in tensors.values())
    assert {name.split(".")[-3] for name in tensors} == set(LINEARS)
    assert all(t.abs().sum() > 0 for n, t in tensors.items() if "lora_B" in n)
    # its base (the tiny default exists nowhere else) is saved beside it and named in adapter_config.json
    config = json.loads((run_dir / "model" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == (run_dir / "base_model").resolve()
    assert (run_dir / "base_model" / "model.safetensors").exists()

    # resumable: the same command with more steps continues from the last checkpoint
    check_ok(launch([*LORA, "--zero_stage", stage, "--max_steps", "12"], tmp_path, nproc=2, launcher="deepspeed"))
    summary = read_summary(tmp_path)
    assert summary["resumed_from"].endswith("checkpoint-8") and summary["global_step"] == 12
    state = json.loads((run_dir / "checkpoints" / "trainer_state.json").read_text())
    assert [r["step"] for r in state["log_history"] if "loss" in r] == list(range(1, 13))
    return run_dir


def eval_loss(model: Path, evaluated: Path, name: str, *extra: str) -> float:
    check_ok(launch(["--eval_only", "--model_name_or_path", str(model), *extra, "--run_name", name,
                     "--report_to", "none", "--heldout_eval", "false", "--max_eval_samples", "64"], evaluated))
    return json.loads((evaluated / name / "summary.json").read_text())["eval_loss"]


@pytest.mark.xdist_group("lora")
def test_lora_under_zero3_trains_saves_resumes_evaluates_and_merges(tmp_path):
    run_dir = train_and_resume(tmp_path / "runs", "3")
    # the adapter evaluates as a model folder, and merging it into its base changes nothing
    adapter, evaluated = run_dir / "model", tmp_path / "eval"
    adapter_loss = eval_loss(adapter, evaluated, "adapter", "--tokenizer_name_or_path", str(adapter))
    merged = tmp_path / "merged"
    result = load_script(ROOT / "scripts" / "merge_lora.py").merge(adapter, merged, dtype="fp32")
    assert not (merged / "adapter_config.json").exists() and (merged / "model.safetensors").exists()
    merged_loss = eval_loss(merged, evaluated, "merged")
    assert merged_loss == pytest.approx(adapter_loss, rel=1e-4)
    # the adapter did something, so the equality above means something (the merge's own losses, on its rows)
    assert abs(result["loss_base"] - result["loss_merged"]) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["2", "3"])
def test_lora_under_zero_trains_saves_resumes_evaluates_and_merges(tmp_path, stage):
    run_dir = train_and_resume(tmp_path, stage)
    if stage == "2":
        return  # evaluation and merge read the saved adapter, which is the same for both stages
    # the adapter evaluates as a model folder, and merging it into its base (the CLI) changes nothing
    adapter, evaluated = run_dir / "model", tmp_path / "eval"
    adapter_loss = eval_loss(adapter, evaluated, "adapter", "--tokenizer_name_or_path", str(adapter))
    merged = tmp_path / "merged"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "merge_lora.py"), str(adapter), "--out",
                           str(merged), "--dtype", "fp32"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (merged / "adapter_config.json").exists() and (merged / "model.safetensors").exists()
    merged_loss = eval_loss(merged, evaluated, "merged")
    base_loss = eval_loss(run_dir / "base_model", evaluated, "base")
    assert merged_loss == pytest.approx(adapter_loss, rel=1e-4)
    assert abs(base_loss - adapter_loss) > 1e-3  # the adapter did something, so the equality above means something


def test_lora_target_modules_that_do_not_exist_are_named(tiny_tokenizer):
    """Checked on the loaded model (train_ds.build_model), before the trainer exists: nothing trains."""
    from types import SimpleNamespace

    from recipe.config import ModelArguments
    from recipe.errors import ConfigError
    from recipe.modeling import check_lora_targets, load_model

    model = load_model(ModelArguments(), SimpleNamespace(seed=0, trust_remote_code=False), tiny_tokenizer)
    check_lora_targets(model, ["q_proj", "down_proj"])  # what it has passes
    with pytest.raises(ConfigError) as err:
        check_lora_targets(model, ["q_proj", "qkv_proj"])
    assert "--lora_target_modules qkv_proj" in str(err.value) and "gate_proj" in str(err.value)


@pytest.mark.parametrize("argv,message", [
    (["--use_peft", "true", "--load_in_4bit", "true"], "needs a CUDA GPU"),
    (["--load_in_4bit", "true"], "add --use_peft true"),
])
def test_qlora_needs_lora_and_a_gpu(argv, message, process):
    import torch

    from recipe.config import parse_args
    from recipe.errors import ConfigError

    if torch.cuda.is_available() and "CUDA" in message:
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError) as err:
        parse_args([*argv, "--report_to", "none"])
    assert message in str(err.value)


def test_lora_defaults_cover_every_linear_layer(process):
    from recipe.config import parse_args
    from recipe.modeling import quantization_config

    _, training_args, model_args = parse_args(["--use_peft", "true", "--report_to", "none"])
    assert model_args.lora_target_modules == "all-linear" and model_args.use_bnb_nested_quant
    model_args.load_in_4bit = True
    training_args.bf16 = True
    quant = quantization_config(model_args, training_args)
    import torch

    assert quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_quant_storage == torch.bfloat16 == quant.bnb_4bit_compute_dtype  # ZeRO-3 can shard it
