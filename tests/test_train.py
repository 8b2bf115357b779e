"""The real entry point, end to end on CPU: every ZeRO stage and offload with 1 and 2 processes, stage parity,
learning, files written, reload, resume, W&B offline, bad input.

Default run: ZeRO 0-3 on 1 process (one launch each, read by the stage and parity checks), the shared 2-process
ZeRO-2 run (conftest.zero2_run, deepspeed launcher), ZeRO-3 with CPU offload on 2 processes through torchrun, ZeRO-2
offload on 1 process, the default recipe learning and resuming; bad input in process (the end-to-end exit code:
test_faults). `-m slow`: every stage x process count, each its own launch.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import (FAST, ZERO2_GROUP, ZERO2_STEPS, check_ok, launch, logged, only_run_dir, read_summary,
                      train_losses)

STAGES = ["0", "1", "2", "3", "2_offload", "3_offload"]
PARITY = ["0", "1", "2", "3"]


def check_trained(proc, results, stage: str, nproc: int, steps: int = 4) -> None:
    """A run of `stage` on `nproc` processes trained, evaluated and saved a whole model."""
    check_ok(proc)
    summary = read_summary(results)
    run_dir = only_run_dir(results)
    assert summary["global_step"] == steps and summary["world_size"] == nproc
    assert summary["zero_stage"] == int(stage[0]) and summary["precision"] == "fp32"
    assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["eval_loss"])
    assert (run_dir / "model" / "model.safetensors").stat().st_size > 100_000  # gathered, not empty shards
    assert json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == int(stage[0])
    offload = json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"].get("offload_optimizer", {})
    assert (offload.get("device") == "cpu") == stage.endswith("_offload")


# ── default: one launch per case, many checks ────────────────────────────────


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory):
    """ZeRO 0-3, 1 process, one seed: {stage: (process, results folder)}."""
    runs = {}
    for stage in PARITY:
        results = tmp_path_factory.mktemp(f"stage{stage}")
        runs[stage] = launch([*FAST, "--zero_stage", stage, "--seed", "0"], results), results
    return runs


@pytest.mark.xdist_group("stages")
@pytest.mark.parametrize("stage", PARITY)
def test_stage_trains_on_one_process(stage_runs, stage):
    check_trained(*stage_runs[stage], stage, 1)


@pytest.mark.xdist_group("stages")
def test_stages_give_equal_losses(stage_runs):
    """Same seed, fp32: ZeRO stages 0-3 are the same maths, so the same loss at every step."""
    losses = {stage: train_losses(only_run_dir(results)) for stage, (_, results) in stage_runs.items()}
    assert len(losses["0"]) == 4
    for stage in ["1", "2", "3"]:
        assert losses[stage] == pytest.approx(losses["0"], rel=1e-4), stage
    assert losses["0"][-1] != losses["0"][0]  # it trained: equal curves of an unchanged model would prove nothing


@ZERO2_GROUP
def test_zero2_on_two_processes_trains(zero2_run):
    run_dir = zero2_run["dir"]
    check_trained(zero2_run["proc"], run_dir.parent, "2", 2, steps=ZERO2_STEPS)
    assert sorted(logged(run_dir)) == list(range(1, ZERO2_STEPS + 1))


@ZERO2_GROUP
def test_wandb_unreachable_while_logged_in_goes_offline(zero2_run):
    """A key is set (logged in) but the W&B server does not answer: the run says so, logs offline, trains on."""
    proc, run_dir = zero2_run["proc"], zero2_run["dir"]
    assert "does not answer" in proc.stderr and "logging offline" in proc.stderr
    assert read_summary(run_dir.parent)["wandb"] == "offline"
    assert list((run_dir / "wandb").glob("**/offline-run-*"))


@ZERO2_GROUP
def test_wandb_offline_when_not_logged_in(killed_and_rerun):
    """No key, no `wandb login` (a fresh HOME): offline into the run folder, with the command that uploads it."""
    proc, run_dir = killed_and_rerun["proc"], killed_and_rerun["dir"]
    check_ok(proc)
    assert read_summary(run_dir.parent)["wandb"] == "offline"
    assert list((run_dir / "wandb").glob("**/offline-run-*")), "no offline W&B run written"
    assert "wandb sync" in proc.stdout + proc.stderr
    assert "wandb sync" in killed_and_rerun["after_kill"]["log"]  # the first start said it too


@pytest.mark.xdist_group("offload")
def test_zero3_offload_on_two_processes_through_torchrun(tmp_path):
    """ZeRO-3 with optimizer and parameters offloaded to CPU (DeepSpeed's CPU Adam), 2 ranks, torchrun."""
    proc = launch([*FAST, "--zero_stage", "3_offload", "--seed", "0"], tmp_path, nproc=2, launcher="torchrun")
    check_trained(proc, tmp_path, "3_offload", 2)


@pytest.mark.xdist_group("offload")
def test_zero2_offload_on_one_process(tmp_path):
    proc = launch([*FAST, "--zero_stage", "2_offload", "--seed", "0"], tmp_path)
    check_trained(proc, tmp_path, "2_offload", 1)
    summary = read_summary(tmp_path)
    assert summary["optimizer_state_dtypes"] == {"master_weights": "float32", "adam_moments": "float32"}
    model_bytes = (only_run_dir(tmp_path) / "model" / "model.safetensors").stat().st_size
    assert summary["disk_written_gib"] * 2**30 >= model_bytes  # this process wrote at least the saved model


@pytest.mark.xdist_group("offload")
def test_zenflow_takes_its_full_updates_every_update_interval(tmp_path):
    """stage2_offload_zenflow.json through the HF Trainer: ZenFlow steps the top-k columns on every step and all
    parameters every update_interval (4) steps. accelerate's wrapper would set every Trainer step as the boundary
    (8 full updates in 8 steps); recipe.trainer lets the engine decide (2)."""
    proc = launch([*FAST, "--zero_stage", "2_offload_zenflow", "--global_batch_size", "4", "--max_steps", "8",
                   "--seed", "0"], tmp_path)
    check_ok(proc)
    summary = read_summary(tmp_path)
    assert summary["zenflow"] == {"update_interval": 4, "topk_ratio": 0.05, "full_updates": 2, "steps": 8}, summary
    assert math.isfinite(summary["train_loss"]) and summary["global_batch_size"] == summary["per_device_batch_size"]


@pytest.mark.xdist_group("offload")
def test_zero2_offload_with_bf16_states_keeps_them_in_bf16(tmp_path):
    """stage2_offload_bf16.json: DeepSpeedCPUAdam keeps bf16 master weights and bf16 moments (half the host memory
    of fp32 ones), as read back from the engine, not the config; it asks for a bf16 run (on CPU too)."""
    proc = launch([*FAST, "--zero_stage", "2_offload_bf16", "--bf16", "true", "--seed", "0"], tmp_path)
    check_ok(proc)
    summary = read_summary(tmp_path)
    assert summary["precision"] == "bf16" and summary["global_step"] == 4 and math.isfinite(summary["train_loss"])
    assert summary["optimizer_state_dtypes"] == {"master_weights": "bfloat16", "adam_moments": "bfloat16"}
    assert summary["ds_config"] == "ds_configs/stage2_offload_bf16.json"


@pytest.mark.xdist_group("learn")
def test_default_recipe_learns_writes_everything_and_resumes(tmp_path, process):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    # the default recipe (lr 3e-3, cosine) on a 16-sequence global batch and 1,024 of its rows
    common = ["--logging_steps", "5", "--eval_strategy", "steps", "--eval_steps", "15", "--save_steps", "15",
              "--heldout_max_samples", "16", "--report_to", "none", "--warmup_steps", "5", "--max_train_samples",
              "1024", "--max_eval_samples", "64", "--global_batch_size", "16", "--per_device_train_batch_size", "16"]
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

    # the saved model reloads and differs from the seeded initial weights
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
    steps = sorted(logged(run_dir))
    assert steps[:6] == [5, 10, 15, 20, 25, 30] and steps[-2:] == [35, 40]


def test_zero3_partitions_the_model_as_it_loads(process, tiny_tokenizer):
    """Under ZeRO-3 each parameter is partitioned as the model is built (deepspeed.zero.Init), never whole in one
    process first; other stages load it whole."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from recipe.config import parse_args
    from recipe.modeling import load_model

    try:
        for stage, partitioned in (("3", True), ("2", False)):
            _, targs, margs = parse_args([*FAST, "--zero_stage", stage])
            params = list(load_model(margs, targs, tiny_tokenizer).parameters())
            assert all(hasattr(p, "ds_id") for p in params) == partitioned, stage
            assert any(hasattr(p, "ds_id") for p in params) == partitioned, stage
    finally:
        unset_hf_deepspeed_config()  # transformers' global ZeRO-3 flag: not for the tests after this one


@pytest.mark.parametrize("args,message", [
    (["--zero_stage", "7"], "--zero_stage 7"),
    (["--fp16", "true"], "needs a CUDA GPU"),
    (["--max_stepz", "3"], "did you mean --max_steps?"),
])
def test_bad_arguments_are_named(process, args, message):
    """What train_ds.py exits 2 with (test_faults runs one such case through __main__)."""
    import torch

    from recipe.config import parse_args
    from recipe.errors import ConfigError

    if torch.cuda.is_available() and "CUDA" in message:
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError) as err:
        parse_args([*FAST, *args])
    assert message in str(err.value)


def test_a_missing_dataset_is_named(process):
    from recipe.config import parse_args
    from recipe.data import build_datasets
    from recipe.errors import ConfigError

    script_args, _, _ = parse_args([*FAST, "--dataset_name", "data/missing.jsonl"])
    with pytest.raises(ConfigError) as err:
        build_datasets(script_args, 0)
    assert "data/missing.jsonl does not exist" in str(err.value)


# ── -m slow: the exhaustive matrix ───────────────────────────────────────────


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("stage", STAGES)
def test_stage_trains(tmp_path, stage, nproc):
    launcher = "python" if nproc == 1 else ("torchrun" if stage == "1" else "deepspeed")
    proc = launch([*FAST, "--zero_stage", stage, "--seed", "0"], tmp_path, nproc=nproc, launcher=launcher)
    check_trained(proc, tmp_path, stage, nproc)
