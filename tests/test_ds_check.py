"""recipe/ds_check.py against the installed DeepSpeed: shipped configs pass, broken ones name key and fix."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest

from recipe import REPO_ROOT
from recipe.ds_check import CONSTANT_MODULES, check_ds_config, cpu_adam_available, unknown_key_problems

from recipe.hardware import prepare_process  # noqa: E402

prepare_process()  # what train_ds.py does before parsing: a world of one process

DS_DIR = REPO_ROOT / "ds_configs"
DELETE = object()
# TrainingArguments as the default recipe (configs/default.yaml) resolves them: 2 CPU processes.
RECIPE_TRAINING = {
    "bf16": False, "fp16": False, "optim": "adamw_torch_fused", "lr_scheduler_type": "cosine",
    "per_device_train_batch_size": 32, "gradient_accumulation_steps": 1, "world_size": 2,
    "gradient_checkpointing": False, "save_final_model": True, "learning_rate": 3e-3, "max_grad_norm": 1.0,
}
KNOWN_BROKEN: dict[str, str] = {}  # shipped configs with a known problem (strict xfail until fixed)


def edited(base: str, changes: dict) -> dict:
    """A shipped config with dotted-path keys set (or DELETEd)."""
    config = json.loads((DS_DIR / base).read_text())
    for path, value in changes.items():
        *parents, key = path.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(key, None)
        else:
            node[key] = value
    return config


def check(config: dict, training: dict | None = None, cpu_adam: bool = True):
    return check_ds_config(config, "test.json", {**RECIPE_TRAINING, **(training or {})}, cpu_adam=lambda: cpu_adam)


def shipped() -> list:
    return [pytest.param(path, id=path.name, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_BROKEN[path.name])]
                         if path.name in KNOWN_BROKEN else []) for path in sorted(DS_DIR.glob("*.json"))]


@pytest.mark.parametrize("path", shipped())
def test_shipped_config_has_no_errors_or_warnings(path):
    config = json.loads(path.read_text())
    bf16_states = "bf16_master_weights_and_grads" in config.get("bf16", {})  # asks for a bf16 run (its own case)
    training = {**RECIPE_TRAINING, "bf16": True} if bf16_states else RECIPE_TRAINING
    errors, warnings = check_ds_config(config, path.name, training, cpu_adam=lambda: True)
    assert errors == []
    if bf16_states:  # the one warning: what bf16 master weights cost, measured
        assert len(warnings) == 1 and "smaller updates are lost" in warnings[0] and "0.27" in warnings[0]
    else:
        assert warnings == []


def test_every_key_of_every_shipped_config_is_known():
    for path in sorted(DS_DIR.glob("*.json")):
        problems = unknown_key_problems(json.loads(path.read_text()), path.name)
        assert [p for p in problems if path.name not in KNOWN_BROKEN] == []


CASES = [
    # (id, base config, changes, training overrides, cpu_adam, "error"/"warning", substrings of one message)
    ("top-level typo", "stage2.json", {"gradient_clipp1ng": 1.0}, {}, True, "error",
     ["gradient_clipp1ng:", "did you mean gradient_clipping?"]),
    ("zero typo", "stage3.json", {"zero_optimization.stage3_prefech_bucket_size": 1e6}, {}, True, "error",
     ["zero_optimization.stage3_prefech_bucket_size:", "did you mean stage3_prefetch_bucket_size?"]),
    ("offload typo", "stage2_offload.json", {"zero_optimization.offload_optimizer.pin_memroy": True}, {}, True,
     "error", ["zero_optimization.offload_optimizer.pin_memroy:", "did you mean pin_memory?"]),
    ("bf16 typo", "stage2.json", {"bf16.enabeld": True}, {}, True, "error", ["bf16.enabeld:", "did you mean enabled?"]),
    ("plain-section typo", "stage3_nvme.json", {"aio.queue_dept": 8}, {}, True, "error",
     ["aio.queue_dept:", "ignores it silently", "did you mean queue_depth?"]),
    ("monitor typo", "stage2.json", {"tensorboard.output_pth": "tb"}, {}, True, "error",
     ["tensorboard.output_pth:", "did you mean output_path?"]),
    ("removed key", "stage2.json", {"elasticity": {"enabled": False}}, {}, True, "error",
     ["elasticity:", "removed from DeepSpeed", "delete it"]),
    ("offload_param at stage 2", "stage2.json", {"zero_optimization.offload_param": {"device": "cpu"}}, {}, True,
     "error", ["zero_optimization.offload_param.device:", "only stage 3", "set stage 3"]),
    ("offload at stage 0", "stage0.json", {"zero_optimization.offload_optimizer": {"device": "cpu"}}, {}, True,
     "error", ["zero_optimization.offload_optimizer.device:", "stage 0", "set stage 2 or 3"]),
    ("nvme optimizer at stage 2", "stage2_offload.json",
     {"zero_optimization.offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}}, {}, True, "error",
     ["zero_optimization.offload_optimizer.device:", '"nvme" at stage 2', "set stage 3"]),
    ("bf16 and fp16", "stage2.json", {"bf16.enabled": True, "fp16.enabled": True}, {}, True, "error",
     ["bf16.enabled:", "fp16.enabled", "set one of them to false"]),
    ("stage 5", "stage2.json", {"zero_optimization.stage": 5}, {}, True, "error",
     ["zero_optimization.stage:", "must be one of 0, 1, 2, 3;"]),
    ("stage auto", "stage2.json", {"zero_optimization.stage": "auto"}, {}, True, "error",
     ["zero_optimization.stage:", "only by accelerate", "set 0, 1, 2 or 3"]),
    ("auto nobody fills", "stage3.json", {"zero_optimization.sub_group_size": "auto"}, {}, True, "error",
     ["zero_optimization.sub_group_size:", "accelerate raises", "set a value"]),
    ("optimizer typo", "stage2.json", {"optimizer.type": "Adamm"}, {}, True, "error",
     ["optimizer.type:", "'Adamm'", "did you mean Adam?"]),
    ("torch optimizer under ZeRO", "stage2.json", {"optimizer.type": "SGD", "optimizer.params": {"lr": "auto"}}, {},
     True, "error", ["optimizer.type:", "'SGD'", "zero_allow_untested_optimizer"]),
    ("non-Adam optimizer with CPU offload", "stage2_offload.json", {"optimizer.type": "Lamb"}, {}, True, "error",
     ["optimizer.type:", "'Lamb' has no CPU version", "use AdamW"]),
    ("HF optimizer swapped under offload", "stage2_offload.json", {"optimizer": DELETE}, {"optim": "sgd"}, True,
     "error", ["zero_optimization.offload_optimizer:", "DeepSpeedCPUAdam", '"zero_force_ds_cpu_optimizer": false']),
    ("CPUAdam cannot build", "stage2_offload.json", {}, {}, False, "error",
     ["zero_optimization.offload_optimizer.device:", "CPUAdam", "C++ compiler", "without offload"]),
    ("max_grad_norm in optimizer params", "stage2.json", {"optimizer.params.max_grad_norm": 1.0}, {}, True, "error",
     ["optimizer.params.max_grad_norm:", "gradient_clipping"]),
    ("scheduler typo", "stage2.json", {"scheduler": {"type": "WarmupLRR", "params": {}}},
     {"lr_scheduler_type": "linear"}, True, "error", ["scheduler.type:", "did you mean WarmupLR?"]),
    ("value not an integer", "stage2.json", {"zero_optimization.reduce_bucket_size": "big"}, {}, True, "error",
     ["zero_optimization.reduce_bucket_size:", "'big' is invalid", "valid integer", "default: 500,000,000"]),
    ("value negative", "stage3_offload.json", {"zero_optimization.offload_param.buffer_count": -1}, {}, True, "error",
     ["zero_optimization.offload_param.buffer_count:", "greater than or equal to 0", "default: 5"]),
    ("bf16 states without bf16 master weights", "stage2_offload_bf16.json",
     {"bf16.bf16_master_weights_and_grads": False}, {}, True, "error",
     ["bf16.bf16_optimizer_states:", "without bf16_master_weights_and_grads", "add \"bf16_master_weights_and_grads\""]),
    ("bf16 master weights alone on the GPU", "stage2.json", {"bf16.bf16_master_weights_and_grads": True}, {}, True,
     "error", ["bf16.bf16_master_weights_and_grads:", "without CPU optimizer offload", "bf16_optimizer_states"]),
    ("bf16 states at stage 0", "stage0.json", {"bf16.bf16_master_weights_and_grads": True,
                                              "bf16.bf16_optimizer_states": True}, {}, True, "error",
     ["bf16.bf16_master_weights_and_grads:", "at stage 0", "stage 1-3"]),
    ("bf16 states in an fp32 run", "stage2_offload_bf16.json", {}, {"bf16": False}, True, "error",
     ["bf16.bf16_master_weights_and_grads:", "fp32 run", "--bf16 true", "stage2_offload.json"]),
    ("zenflow with the Trainer's accumulation", "stage2_offload_zenflow.json", {}, {"gradient_accumulation_steps": 4}, True,
     "error", ["zero_optimization.zenflow.update_interval:", "--gradient_accumulation_steps 4",
               "--gradient_accumulation_steps 1"]),
    ("zenflow without offload", "stage2.json", {"zero_optimization.zenflow": {"update_interval": 4}}, {}, True,
     "error", ["zero_optimization.zenflow:", "offload_optimizer none", "stage2_offload_zenflow.json"]),
    ("model-level value check", "stage2_offload.json", {"zero_optimization.offload_optimizer.ratio": 0.5}, {}, True,
     "error", ["zero_optimization:", "Partial offloading only supported for ZeRO Stage 3"]),
    ("fp16 value", "stage2.json", {"fp16.loss_scale": -1}, {}, True, "error",
     ["fp16.loss_scale:", "must be >= 0"]),
    ("batch triple", "stage2.json", {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8,
                                     "gradient_accumulation_steps": 2}, {}, True, "error",
     ["train_batch_size:", "64 != 8 (micro) x 2 (accumulation) x 2 (processes) = 32", '"auto"']),
    ("batch not a multiple", "stage2.json", {"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4,
                                             "gradient_accumulation_steps": DELETE}, {}, True, "error",
     ["train_batch_size:", "30 is not a multiple of 4 (micro) x 2 (processes)"]),
    ("missing zero_optimization", "stage2.json", {"zero_optimization": DELETE}, {}, True, "error",
     ["zero_optimization:", "missing", '"stage"']),
    ("scheduler with lr_scheduler_type", "stage2.json", {"scheduler": {"type": "WarmupLR", "params": {}}},
     {"lr_scheduler_type": "cosine"}, True, "warning", ["scheduler:", "ignores --lr_scheduler_type cosine"]),
    ("optimizer with --optim", "stage2.json", {}, {"optim": "adafactor"}, True, "warning",
     ["optimizer:", "ignores --optim adafactor"]),
    ("gather false with save_final_model", "stage3.json",
     {"zero_optimization.stage3_gather_16bit_weights_on_model_save": False}, {}, True, "warning",
     ["zero_optimization.stage3_gather_16bit_weights_on_model_save:", "no weights", "zero_to_fp32", "set it true"]),
    ("deprecated key", "stage2.json", {"zero_optimization.cpu_offload": False}, {}, True, "warning",
     ["zero_optimization.cpu_offload:", "deprecated", "use offload_optimizer"]),
    ("section not an object", "stage2.json", {"optimizer": "AdamW"}, {}, True, "error",
     ["optimizer:", "must be a JSON object", '"optimizer": {...}']),
]


@pytest.mark.parametrize("base, changes, training, cpu_adam, kind, expected",
                         [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_broken_config_is_reported_with_path_and_fix(base, changes, training, cpu_adam, kind, expected):
    errors, warnings = check(edited(base, changes), training, cpu_adam)
    found = errors if kind == "error" else warnings
    matching = [m for m in found if all(s in m for s in expected)]
    assert len(matching) == 1, f"no single {kind} has {expected}:\nerrors: {errors}\nwarnings: {warnings}"
    assert matching[0].startswith("test.json: ") and "; fix: " in matching[0] and "\n" not in matching[0]


def test_unknown_key_in_pydantic_section_is_reported_once():
    errors, _ = check(edited("stage2_offload.json", {"zero_optimization.offload_optimizer.pin_memroy": True}))
    assert len([e for e in errors if "pin_memroy" in e]) == 1


def test_deprecated_gather_name_still_saves_weights():
    config = edited("stage3.json", {"zero_optimization.stage3_gather_16bit_weights_on_model_save": DELETE,
                                    "zero_optimization.stage3_gather_fp16_weights_on_model_save": True})
    errors, warnings = check(config)
    assert errors == [] and len(warnings) == 1 and "deprecated" in warnings[0], warnings


def test_cpu_adam_probe_answers():
    assert isinstance(cpu_adam_available(), bool)


def test_every_problem_is_reported_at_once():
    config = edited("stage2.json", {
        "gradient_clipp1ng": 1.0, "bf16.enabled": True, "fp16.enabled": True, "optimizer.type": "Adamm",
        "zero_optimization.reduce_bucket_size": -5, "zero_optimization.offload_param": {"device": "cpu"},
        "zero_optimization.stage3_prefech_bucket_size": 1, "train_batch_size": 7, "gradient_accumulation_steps": 2,
        "train_micro_batch_size_per_gpu": 2,
    })
    errors, _ = check(config)
    for path in ("gradient_clipp1ng", "bf16.enabled", "optimizer.type", "zero_optimization.reduce_bucket_size",
                 "zero_optimization.offload_param.device", "zero_optimization.stage3_prefech_bucket_size",
                 "train_batch_size"):
        assert any(e.startswith(f"test.json: {path}:") for e in errors), (path, errors)


# Rare but real keys, each from DeepSpeed's code (0.19.8), with a value it accepts.
RARE_KEYS = {
    "communication_data_type": "fp32", "seq_parallel_communication_data_type": "fp32", "prescale_gradients": False,
    "gradient_predivide_factor": 1.0, "gradient_allreduce_op": "mean", "zero_allow_untested_optimizer": True,
    "zero_force_ds_cpu_optimizer": True, "memory_breakdown": False, "dump_state": False, "disable_allgather": False,
    "disable_python_gc": False, "dataloader_drop_last": False, "managed_gradient_accumulation": True,
    "vocabulary_size": 32000, "use_data_before_expert_parallelism": False, "sequence_parallel_size": 1,
    "flops_profiler": {"enabled": False, "recompute_fwd_factor": 0.0, "profile_step": 1, "module_depth": -1,
                       "top_modules": 1, "detailed": True, "output_file": None},
    "tensorboard": {"enabled": False, "output_path": "tb", "job_name": "run"},
    "wandb": {"enabled": False, "project": "p", "group": None, "team": None},
    "csv_monitor": {"enabled": False, "output_path": "csv", "job_name": "run"},
    "comet": {"enabled": False, "project": "p", "samples_log_interval": 100},
    "comms_logger": {"enabled": False, "verbose": False, "prof_all": True, "debug": False, "prof_ops": []},
    "activation_checkpointing": {"partition_activations": False, "cpu_checkpointing": False, "profile": False,
                                 "contiguous_memory_optimization": False, "number_checkpoints": None,
                                 "synchronize_checkpoint_boundary": False},
    "aio": {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
            "overlap_events": True, "use_gds": False},
    "data_types": {"grad_accum_dtype": "fp32", "param_dtype": "bf16", "keep_in_fp32_modules": []},
    "compile": {"deepcompile": False, "offload_activation": False},
    "checkpoint": {"tag_validation": "Warn", "load_universal": False, "use_node_local_storage": False,
                   "parallel_write": {"pipeline_stage": False}, "checkpoint_serialization": True},
    "timers": {"throughput": {"enabled": True, "synchronized": True}},
    "torch_autocast": {"enabled": False, "dtype": "bfloat16"},
    "hybrid_engine": {"enabled": False, "max_out_tokens": 512},
    "tensor_parallel": {"autotp_size": 0},
    "pipeline": {"partition": "best"},
    "data_efficiency": {"enabled": False},
    "autotuning": {"enabled": False, "start_profile_step": 3, "model_info": {"num_params": 1}},
    "expert_parallel": {"enabled": False},
    "datastates_ckpt": False,
}
RARE_ZERO_KEYS = {
    "round_robin_gradients": False, "zero_hpz_partition_size": 1, "zero_quantized_weights": False,
    "stage3_module_granularity_threshold": 0, "memory_efficient_linear": True, "ignore_unused_parameters": True,
    "prefetch_bucket_size": 1000, "leaf_module": {"classes": [], "names": []}, "use_multi_rank_bucket_allreduce": True,
}


def test_rare_but_real_keys_are_accepted():
    config = edited("stage2.json", {**RARE_KEYS, **{f"zero_optimization.{k}": v for k, v in RARE_ZERO_KEYS.items()}})
    assert check(config) == ([], [])


def snippet(text: str) -> dict:
    """The keys of one of DeepSpeed's *_FORMAT example snippets, nested by indentation."""
    root: dict = {}
    stack = [(-1, root)]
    for line in text.splitlines():
        m = re.match(r'(\s*)"(\w+)"\s*:\s*(\{)?', line)
        if not m:
            continue
        while stack[-1][0] >= len(m.group(1)):
            stack.pop()
        stack[-1][1][m.group(2)] = child = {} if m.group(3) else None
        if m.group(3):
            stack.append((len(m.group(1)), child))
    return root.get("session_params", root)


def test_deepspeed_example_snippets_flag_only_keys_deepspeed_rejects_or_ignores():
    """Every key of DeepSpeed's own *_FORMAT examples is accepted, except four its code never reads."""
    flagged = set()
    for module in CONSTANT_MODULES:
        for attr, text in vars(importlib.import_module(module)).items():
            if attr.endswith("_FORMAT") and isinstance(text, str):
                flagged |= {p.split(": ")[1] for p in unknown_key_problems(snippet(text), attr)}
    assert flagged == {"bf16.check_overflow", "activation_checkpointing.partitioned_activations",
                       "autotuning.start_step", "autotuning.end_step"}
    # ... and DeepSpeed itself rejects or ignores those four
    from pydantic import ValidationError

    from deepspeed.autotuning.config import DeepSpeedAutotuningConfig
    from deepspeed.runtime.activation_checkpointing.config import DeepSpeedActivationCheckpointingConfig
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config

    with pytest.raises(ValidationError, match="check_overflow"):
        DeepSpeedBF16Config(check_overflow=False)
    act = DeepSpeedActivationCheckpointingConfig({"activation_checkpointing": {"partitioned_activations": True}})
    assert act.partition_activations is False
    tuning = DeepSpeedAutotuningConfig({"autotuning": {"start_step": 7, "end_step": 9}})
    assert (tuning.start_profile_step, tuning.end_profile_step) != (7, 9)


def test_autotuning_templates_shipped_with_deepspeed_are_accepted():
    import deepspeed.autotuning

    templates = sorted((Path(deepspeed.autotuning.__file__).parent / "config_templates").glob("*.json"))
    assert templates
    for path in templates:
        assert unknown_key_problems(json.loads(path.read_text()), path.name) == []


def test_a_typo_in_the_users_file_stops_the_run_before_any_weights_load(tmp_path):
    """Through the real parser: the user's file with a typo and an impossible combination, both reported."""
    from recipe.config import parse_args
    from recipe.errors import ConfigError

    config = json.loads((DS_DIR / "stage2.json").read_text())
    config["gradient_clipp1ng"] = 1.0
    config["zero_optimization"]["offload_param"] = {"device": "cpu"}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError) as err:
        parse_args(["--deepspeed", str(path), "--report_to", "none"])
    text = str(err.value)
    assert "mine.json" in text and "gradient_clipp1ng" in text and "gradient_clipping" in text
    assert "offload_param" in text and len(err.value.problems) >= 2


# ---------------------------------------------------------------- NVMe swap buffers against the model


EMBED_1B = 128256 * 2048  # Llama-3.2-1B's embedding, its largest parameter


@pytest.mark.parametrize("size, world, flagged", [
    (1e8, 1, True),  # the old stage3_nvme.json: DeepSpeed's "More elements 262668288 than buffer size 100000000"
    (DELETE, 1, True),  # absent: DeepSpeed's default, 1e8
    ("auto", 1, False),  # filled from the model
    (EMBED_1B, 1, False),
    (EMBED_1B // 2 + 1, 2, False),  # each process holds a partition: ceil(262668288 / 2)
    (EMBED_1B // 2 - 1, 2, True),
])
def test_nvme_buffer_smaller_than_the_largest_parameter_is_reported(size, world, flagged):
    from recipe.ds_check import nvme_buffer_problems

    config = edited("stage3_nvme.json", {"zero_optimization.offload_param.buffer_size": size,
                                         "zero_optimization.offload_param.nvme_path": "/nvme",
                                         "zero_optimization.offload_optimizer.nvme_path": "/nvme"})
    problems = nvme_buffer_problems(config, "test.json", EMBED_1B, world, "the embedding (128256 x 2048)")
    assert bool(problems) == flagged, problems
    if flagged:
        (text,) = problems
        partition = -(-EMBED_1B // world)
        assert text.startswith("test.json: zero_optimization.offload_param.buffer_size: ") and "; fix: " in text
        assert f"More elements {partition} than buffer size" in text and "128256 x 2048" in text
        assert 'set it to "auto"' in text and f"at least {partition:,}" in text
        assert ("absent: DeepSpeed's default" in text) == (size is DELETE)


@pytest.mark.parametrize("reuse,in_cpu,flagged", [(DELETE, DELETE, True), (1e9, 1e9, True), (0, DELETE, False),
                                                   (1e9, 2e9, False), (1e6, 0, True)])
def test_nvme_reuse_distance_that_outnumbers_the_swap_buffers_is_reported(reuse, in_cpu, flagged):
    """The 1B shape (1.24B parameters) on NVMe: past max_in_cpu its parameters go through the swap buffers, which any
    reuse distance above 0 lets ZeRO-3 outnumber (the H200 run of 2026-12-02 stopped at step 2); the shipped file's 0
    passes, as does a max_in_cpu that holds every parameter."""
    from recipe.ds_check import nvme_buffer_problems

    config = edited("stage3_nvme.json", {"zero_optimization.stage3_max_reuse_distance": reuse,
                                         "zero_optimization.offload_param.max_in_cpu": in_cpu,
                                         "zero_optimization.offload_param.buffer_size": EMBED_1B,
                                         "zero_optimization.offload_param.nvme_path": "/nvme",
                                         "zero_optimization.offload_optimizer.nvme_path": "/nvme"})
    problems = nvme_buffer_problems(config, "test.json", EMBED_1B, 1, "the embedding", n_params=1_235_814_400)
    assert bool(problems) == flagged, problems
    if flagged:
        (text,) = problems
        assert text.startswith("test.json: zero_optimization.stage3_max_reuse_distance: ") and "; fix: " in text
        assert "Not enough buffers 0 for swapping 1" in text and "set stage3_max_reuse_distance to 0" in text
        assert ("absent: DeepSpeed's default" in text) == (reuse is DELETE)
    # on 2 processes each holds 618M elements: within DeepSpeed's default max_in_cpu of 1e9
    two = nvme_buffer_problems(config, "test.json", EMBED_1B, 2, "the embedding", n_params=1_235_814_400)
    assert bool(two) == (flagged and in_cpu == 0), two


def test_nvme_buffer_check_ignores_configs_without_nvme_parameters():
    from recipe.ds_check import nvme_buffer_problems

    for name in ("stage3_offload.json", "stage2.json", "stage3_partial_offload.json"):
        assert nvme_buffer_problems(edited(name, {}), name, EMBED_1B, 1) == []


def test_filled_autos_and_partial_offload_ratio():
    """"auto" for the NVMe buffer and the partial-offload ratio is this recipe's to fill; a ratio below 1 at stage 2
    is what DeepSpeed refuses."""
    from recipe.ds_config import DsConfig, fill_model_autos, model_autos, param_buffer_elements

    config = edited("stage3_partial_offload.json", {})
    assert model_autos(config) == ["zero_optimization.offload_optimizer.ratio"] and DsConfig(config).partial_offload
    assert fill_model_autos(config, largest_param=EMBED_1B, world_size=1, offload_ratio=0.25) == \
        ["zero_optimization.offload_optimizer.ratio=0.25"]
    assert check(config) == ([], [])
    nvme = edited("stage3_nvme.json", {})
    assert model_autos(nvme) == ["zero_optimization.offload_param.buffer_size"]
    fill_model_autos(nvme, largest_param=EMBED_1B, world_size=2, offload_ratio=None)
    size = nvme["zero_optimization"]["offload_param"]["buffer_size"]
    assert size == param_buffer_elements(EMBED_1B, 2) >= EMBED_1B / 2
    errors, _ = check(edited("stage2_offload.json", {"zero_optimization.offload_optimizer.ratio": "auto"}))
    assert any("Partial offloading only supported for ZeRO Stage 3" in e for e in errors), errors
