"""The real entry point, end to end on CPU: every ZeRO stage and offload with 1 and 2 processes,
stage parity, learning, files written, reload, resume, W&B offline, bad input."""

from __future__ import annotations

import json
import math

import pytest

from conftest import FAST, check_ok, launch, only_run_dir, read_summary, train_losses

STAGES = ["0", "1", "2", "3", "2_offload", "3_offload"]
LOSSES_1PROC: dict[str, list[float]] = {}

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("stage", STAGES)
def test_stage_trains(tmp_path, stage, nproc):
    launcher = "python" if nproc == 1 else ("torchrun" if stage == "1" else "deepspeed")
    proc = launch([*FAST, "--zero_stage", stage, "--seed", "0"], tmp_path, nproc=nproc, launcher=launcher)
    check_ok(proc)
    summary = read_summary(tmp_path)
    run_dir = only_run_dir(tmp_path)
    assert summary["global_step"] == 4 and summary["world_size"] == nproc
    assert summary["zero_stage"] == int(stage[0]) and summary["precision"] == "fp32"
    assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["eval_loss"])
    assert (run_dir / "model" / "model.safetensors").stat().st_size > 100_000  # gathered, not empty shards
    assert json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == int(stage[0])
    if stage == "3":
        assert "partitioned by ZeRO-3 at load: True" in proc.stdout + proc.stderr
    if nproc == 1 and "offload" not in stage:
        LOSSES_1PROC[stage] = train_losses(run_dir)


def test_stages_give_equal_losses(tmp_path):
    """Same seed, fp32: ZeRO stages 0-3 are the same maths, so the same loss at every step."""
    for stage in ["0", "1", "2", "3"]:
        if stage not in LOSSES_1PROC:
            out = tmp_path / stage
            check_ok(launch([*FAST, "--zero_stage", stage, "--seed", "0"], out))
            LOSSES_1PROC[stage] = train_losses(only_run_dir(out))
    reference = LOSSES_1PROC["0"]
    assert len(reference) == 4
    for stage in ["1", "2", "3"]:
        assert LOSSES_1PROC[stage] == pytest.approx(reference, rel=1e-4), stage


def test_default_recipe_learns_writes_everything_and_resumes(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    common = ["--logging_steps", "5", "--eval_strategy", "steps", "--eval_steps", "15", "--save_steps", "15",
              "--heldout_max_samples", "16", "--report_to", "none", "--warmup_steps", "5"]
    check_ok(launch([*common, "--max_steps", "30"], tmp_path))
    run_dir = only_run_dir(tmp_path)
    summary = read_summary(tmp_path)
    for key in ["model", "ds_config", "zero_stage", "world_size", "precision", "global_step", "train_loss",
                "eval_loss", "train_runtime_s", "tokens_per_second_per_device", "peak_memory_gib",
                "heldout_score_before", "heldout_score_after"]:
        assert key in summary, key
    for name in ["args.json", "ds_config.json", "summary.json", "loss.png", "model/model.safetensors",
                 "model/tokenizer.json", "model/config.json"]:
        assert (run_dir / name).is_file(), name
    losses = train_losses(run_dir)
    assert losses[-1] < 0.8 * losses[0], losses  # loss falls
    state = json.loads((run_dir / "checkpoints" / "trainer_state.json").read_text())
    assert any("eval_loss" in r for r in state["log_history"])

    # the saved model reloads, differs from the seeded initial weights, and gives the reported eval loss
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    from recipe.config import parse_args
    from recipe.modeling import build_tiny_tokenizer, load_model

    _, targs, margs = parse_args(["--report_to", "none"])
    init = load_model(margs, targs, build_tiny_tokenizer()).state_dict()
    trained = load_file(run_dir / "model" / "model.safetensors")
    changed = [k for k, v in trained.items() if not v.equal(init[k])]
    assert len(changed) >= 0.9 * len(trained)
    assert sum(p.numel() for p in model.parameters()) > 500_000

    # resume: continues from the newest checkpoint's step
    check_ok(launch([*common, "--max_steps", "40", "--resume_from_checkpoint", "last"], tmp_path))
    summary = read_summary(tmp_path)
    assert summary["resumed_from"].endswith("checkpoint-30")
    assert summary["global_step"] == 40
    state = json.loads((run_dir / "checkpoints" / "trainer_state.json").read_text())
    steps = [r["step"] for r in state["log_history"] if "loss" in r]
    assert steps[:6] == [5, 10, 15, 20, 25, 30] and steps[-2:] == [35, 40]


def test_wandb_offline_when_not_logged_in(tmp_path):
    env = {"HOME": str(tmp_path / "home"), "WANDB_API_KEY": "", "WANDB_SILENT": "true"}
    (tmp_path / "home").mkdir()
    proc = launch([*FAST[:-2], "--report_to", "wandb", "--max_steps", "2"], tmp_path / "r", env=env)
    check_ok(proc)
    run_dir = only_run_dir(tmp_path / "r")
    assert read_summary(tmp_path / "r")["wandb"] == "offline"
    assert list((run_dir / "wandb").glob("**/offline-run-*")), "no offline W&B run written"
    assert "wandb sync" in proc.stdout + proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--dataset_name", "data/missing.jsonl"], "data/missing.jsonl does not exist"),
    (["--zero_stage", "7"], "--zero_stage 7"),
    (["--fp16", "true"], "needs a CUDA GPU"),
])
def test_bad_input_exits_with_a_clear_message(tmp_path, args, message):
    proc = launch([*FAST, *args], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
