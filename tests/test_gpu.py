"""GPU tests (marked `gpu`, skipped without CUDA): every shipped ds_config on the tiny model on 1 and
2 GPUs, and bf16 stage parity. Run on a GPU machine: uv run pytest -m gpu"""

from __future__ import annotations

import json
import math

import pytest

from conftest import ROOT, check_ok, launch, load_script, only_run_dir, read_summary, train_losses
from recipe.ds_config import aio_available

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.xdist_group("gpu")]  # one worker: the GPUs are shared
CONFIGS = ["0", "1", "2", "3", "2_offload", "2_offload_bf16", "2_offload_zenflow", "3_offload", "3_partial_offload",
           "3_nvme"]
STEPS = ["--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
         "--heldout_max_samples", "8", "--seed", "0"]


def gpus() -> int:
    import torch

    return torch.cuda.device_count()


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("stage", CONFIGS)
def test_ds_config_on_gpus(tmp_path, stage, nproc):
    if gpus() < nproc:
        pytest.skip(f"needs {nproc} GPUs")
    # ZenFlow accumulates itself (update_interval): no accumulation of the Trainer's own on top
    own = ["--per_device_train_batch_size", "8", "--global_batch_size", str(8 * nproc)] if "zenflow" in stage else []
    proc = launch([*STEPS, "--max_steps", "2", "--zero_stage", stage, "--nvme_path", str(tmp_path), *own],
                  tmp_path / "r", nproc=nproc, launcher="deepspeed" if nproc > 1 else "python",
                  env={"NCCL_NVLS_ENABLE": "0"})
    if stage == "3_nvme" and not aio_available():
        # no libaio here: refused at start with the remedy, nothing trained
        assert proc.returncode == 2 and "libaio" in proc.stderr, proc.stderr[-2000:]
        return
    check_ok(proc)
    tmp_path = tmp_path / "r"
    summary = read_summary(tmp_path)
    assert summary["precision"] == "bf16" and summary["global_step"] == 2
    assert math.isfinite(summary["train_loss"]) and summary["peak_memory_gib"] > 0


def test_bf16_stage_parity(tmp_path):
    losses = {}
    for stage in ["0", "1", "2", "3"]:
        out = tmp_path / stage
        # the fast path at every stage (the default task turns compiling off): ZeRO-3 with leaf layers compiled
        check_ok(launch([*STEPS, "--max_steps", "20", "--zero_stage", stage, "--compile_layers", "true",
                         "--fused_loss", "liger"], out))
        losses[stage] = train_losses(only_run_dir(out))
        summary = read_summary(out)
        assert summary["compile_layers"] and summary["fused_loss"] == "liger", (stage, summary)
        assert summary["zero3_leaf_layers"] == (stage == "3"), (stage, summary)
    for stage in ["1", "2", "3"]:
        assert losses[stage][-1] == pytest.approx(losses["0"][-1], rel=0.02), (stage, losses)


SHAPE_1B = ["--model_name_or_path", "configs/models/llama-3.2-1b", "--random_init", "true",
            "--tokenizer_name_or_path", "tiny", "--max_length", "2048", "--heldout_eval", "false"]


def test_dry_run_recommends_on_this_gpu(tmp_path):
    import json

    proc = launch([*STEPS, *SHAPE_1B, "--dry_run", "--per_device_train_batch_size", "8"], tmp_path)
    check_ok(proc)
    result = json.loads((only_run_dir(tmp_path) / "memory_estimate.json").read_text())
    assert result["hardware"]["gpu_memory_gib"] > 10 and result["recommendation"]["config"]
    assert not (only_run_dir(tmp_path) / "summary.json").exists()


def test_zero_stage_auto_trains_within_its_estimate(tmp_path):
    """auto picks a config on this GPU, says why, trains; the measured peak stays under the estimate + 15%
    (the shipped rows are shorter than max_length, so the estimate is an upper bound here)."""

    proc = launch([*STEPS, *SHAPE_1B, "--zero_stage", "auto", "--max_steps", "3", "--per_device_train_batch_size",
                   "8", "--save_final_model", "false"], tmp_path)
    check_ok(proc)
    assert "--zero_stage auto:" in proc.stderr and "Why:" in proc.stderr
    summary = read_summary(tmp_path)
    from recipe import estimate as E

    config = summary["ds_config"].removeprefix("ds_configs/").removesuffix(".json")
    est = E.estimate(E.load_shape(str(ROOT / "configs" / "models" / "llama-3.2-1b")), E.shipped_configs()[config],
                     E.Hardware(1, 80), E.Workload(micro_batch=summary["per_device_batch_size"],
                                                   gradient_checkpointing=summary["gradient_checkpointing"]))
    assert summary["peak_memory_gib"] <= 1.15 * est["gpu_peak"] / 2**30, (summary, est["gpu_peak"] / 2**30)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny default saved as a model folder (QLoRA loads weights from disk to quantise them)."""
    from recipe import modeling

    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = modeling.build_tiny_tokenizer()
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(modeling.tiny_config(len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method,stage,nproc", [("qlora", "2", 1), ("qlora", "3", 2), ("qlora", "2", 2),
                                               ("qlora", "3", 1), ("lora", "2", 2), ("lora", "3", 1)])
def test_lora_and_qlora_with_gradient_checkpointing_save_and_resume(tmp_path, tiny_folder, method, stage, nproc):
    """LoRA and QLoRA (nf4, stored in bf16) under ZeRO-2 and ZeRO-3 on 1 and 2 GPUs with gradient checkpointing:
    the adapter is saved whole (not the empty shards ZeRO-3 gives by default) and the run resumes."""
    from safetensors.torch import load_file

    if gpus() < nproc:
        pytest.skip(f"needs {nproc} GPUs")
    args = [*STEPS, "--model_name_or_path", str(tiny_folder), "--dataset_name", "data/train.jsonl",
            "--eval_dataset_name", "data/test.jsonl", "--heldout_eval", "false", "--use_peft", "true",
            "--load_in_4bit", str(method == "qlora").lower(), "--gradient_checkpointing", "true", "--zero_stage", stage,
            "--learning_rate", "3e-3", "--save_strategy", "steps", "--save_steps", "4"]
    launcher = "deepspeed" if nproc > 1 else "python"
    env = {"NCCL_NVLS_ENABLE": "0"}
    check_ok(launch([*args, "--max_steps", "8"], tmp_path, nproc=nproc, launcher=launcher, env=env))
    run_dir = only_run_dir(tmp_path)
    tensors = load_file(run_dir / "model" / "adapter_model.safetensors")
    assert tensors and all(t.numel() > 0 for t in tensors.values())
    assert all(t.abs().sum() > 0 for n, t in tensors.items() if "lora_B" in n)
    check_ok(launch([*args, "--max_steps", "12"], tmp_path, nproc=nproc, launcher=launcher, env=env))
    summary = read_summary(tmp_path)
    assert summary["resumed_from"].endswith("checkpoint-8") and summary["global_step"] == 12
    assert math.isfinite(summary["train_loss"]) and summary["train_loss"] < train_losses(run_dir)[0]


def fp8_capable() -> bool:
    import torch

    return torch.cuda.get_device_capability() >= (8, 9)


def test_fp8_loss_follows_bf16_on_a_llama_shape(tmp_path):
    """--fp8 (torchao float8 matmuls in the decoder's linear layers) against bf16 under ZeRO-2 and ZeRO-3, through
    scripts/benchmark.py as measured: the Llama-3.2-1B shape cut to 2 layers, random weights, learnable (markov)
    tokens, 60 steps; the loss at every logged step after step 20 within 1% of bf16's. Needs FP8 tensor cores."""
    if not fp8_capable():
        pytest.skip("no FP8 tensor cores")
    config = json.loads((ROOT / "configs/models/llama-3.2-1b/config.json").read_text())
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    benchmark = load_script(ROOT / "scripts" / "benchmark.py")
    rows = benchmark.main(["--model", str(tmp_path / "model"), "--stages", "2,3", "--batch_sizes", "8",
                           "--tokens", "markov", "--max_steps", "60", "--logging_steps", "5", "--learning_rate", "1e-4",
                           "--variant", "bf16=", "--variant", "fp8=--fp8 true", "--loss_reference", "bf16",
                           "--loss_warmup", "20", "--out", str(tmp_path / "out"), "--work_dir", str(tmp_path / "w"),
                           "--timeout", "600"])
    assert [r["status"] for r in rows] == ["ok"] * 4, rows
    for r in rows:
        assert r["options"]["fp8"] == ("tensorwise" if r["variant"] == "fp8" else None), r["options"]
        if r["variant"] == "fp8":
            assert r["loss_gap_vs_reference"] is not None and r["loss_gap_vs_reference"] < 0.01, r
    assert (tmp_path / "out" / "losses.png").exists()


def test_fp8_lora_loss_follows_bf16(tmp_path):
    """--fp8 under LoRA (a frozen Float8Linear base, bf16 adapters) on the default task: every logged loss after step
    10 within 3% of the bf16 run's (passed on an H200, 2026-12-02)."""
    if not fp8_capable():
        pytest.skip("no FP8 tensor cores")
    losses = {}
    for name, flags in (("bf16", []), ("fp8", ["--fp8", "true"])):
        out = tmp_path / name
        check_ok(launch([*STEPS, "--max_steps", "40", "--zero_stage", "2", "--use_peft", "true", *flags], out))
        losses[name] = train_losses(only_run_dir(out))
        assert read_summary(out)["fp8"] == ("tensorwise" if flags else None)
    assert len(losses["fp8"]) == len(losses["bf16"]) == 40
    for step, (ref, got) in enumerate(zip(losses["bf16"], losses["fp8"]), start=1):
        if step > 10:
            assert got == pytest.approx(ref, rel=0.03), (step, losses)


def test_sequence_parallel_on_two_gpus_matches_one(tmp_path):
    """Ulysses over 2 GPUs (NCCL, bf16): the same losses and gradient norms as one GPU with whole sequences, within
    bf16's rounding. Not run yet: only single-GPU machines were at hand (2026-12-02)."""
    if gpus() < 2:
        pytest.skip("needs 2 GPUs")
    from conftest import logged

    records = {}
    for sp, nproc in ((1, 1), (2, 2)):
        out = tmp_path / f"sp{sp}"
        check_ok(launch([*STEPS, "--max_steps", "10", "--global_batch_size", "8", "--per_device_train_batch_size", "8",
                         "--zero_stage", "3", "--sequence_parallel_size", str(sp)], out, nproc=nproc,
                        launcher="deepspeed" if nproc > 1 else "python", env={"NCCL_NVLS_ENABLE": "0"}))
        records[sp] = [(r["loss"], r["grad_norm"]) for _, r in sorted(logged(only_run_dir(out)).items())]
    for (loss1, norm1), (loss2, norm2) in zip(records[1], records[2]):
        assert loss2 == pytest.approx(loss1, rel=2e-2) and norm2 == pytest.approx(norm1, rel=5e-2), records


def test_long_context_levers_keep_the_loss(tmp_path):
    """At 8K tokens on the Llama-3.2-1B shape cut to 2 layers (random weights, markov tokens, bf16, gradient
    checkpointing, layers not compiled so that only the lever differs): --tiled_mlp and --activation_offloading give
    the losses of the run without them, and --sequence_parallel_size 1 on one GPU is a no-op (the same losses, no
    parallelism config)."""
    config = json.loads((ROOT / "configs/models/llama-3.2-1b/config.json").read_text())
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    benchmark = load_script(ROOT / "scripts" / "benchmark.py")
    base = "--gradient_checkpointing true --compile_layers false --activation_offloading false"
    rows = benchmark.main(["--model", str(tmp_path / "model"), "--stages", "2", "--batch_sizes", "1",
                           "--seq_len", "8192", "--tokens", "markov", "--max_steps", "10", "--logging_steps", "1",
                           "--learning_rate", "1e-4", "--loss_reference", "plain", "--loss_warmup", "0",
                           "--variant", f"plain={base} --tiled_mlp false",
                           "--variant", f"tiled={base} --tiled_mlp true",
                           "--variant", f"offload={base} --tiled_mlp false --activation_offloading true",
                           "--variant", f"sp1={base} --tiled_mlp false --sequence_parallel_size 1",
                           "--out", str(tmp_path / "out"), "--work_dir", str(tmp_path / "w"), "--timeout", "600"])
    by = {r["variant"]: r for r in rows}
    assert [r["status"] for r in rows] == ["ok"] * 4, rows
    assert by["tiled"]["options"]["tiled_mlp"] and not by["plain"]["options"]["tiled_mlp"], by
    assert len(by["plain"]["loss_curve"]) == 10
    assert by["tiled"]["loss_gap_vs_reference"] < 5e-3, by["tiled"]
    assert by["offload"]["loss_gap_vs_reference"] < 1e-3, by["offload"]
    assert by["sp1"]["loss_gap_vs_reference"] < 1e-3, by["sp1"]
