"""Arguments, shipped configs and DeepSpeed-config resolution, through the real parser (in-process)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from recipe import REPO_ROOT
from recipe.config import parse_args
from recipe.ds_check import nvme_problems
from recipe.ds_config import resolve
from recipe.errors import ConfigError
from recipe.hardware import fix_cuda_arch_list, prepare_process, resolve_precision

prepare_process()  # what train_ds.py does before parsing: a world of one process


def resolve_ds_config(deepspeed, zero_stage, nvme_path, problems):
    """(config, path) of recipe.ds_config.resolve, its problems appended to `problems`."""
    try:
        ds = resolve(deepspeed, zero_stage, nvme_path)
    except ConfigError as e:
        problems += e.problems
        return None, None
    return ds.config, ds.path

RECIPES = sorted((REPO_ROOT / "configs").glob("*.yaml"))
DS_CONFIGS = sorted((REPO_ROOT / "ds_configs").glob("*.json"))
# Keys TrainingArguments also sets: the JSON must leave them to HF ("auto").
HF_OWNED = [
    ("train_batch_size",), ("train_micro_batch_size_per_gpu",), ("gradient_accumulation_steps",),
    ("gradient_clipping",), ("bf16", "enabled"), ("fp16", "enabled"),
    ("optimizer", "params", "lr"), ("optimizer", "params", "betas"), ("optimizer", "params", "eps"),
    ("optimizer", "params", "weight_decay"),
]


def test_shipped_recipes_exist():
    assert {p.name for p in RECIPES} >= {"default.yaml", "llama-3.2-1b.yaml", "llama-3.2-3b.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses(recipe):
    script, train, model = parse_args(["--config", str(recipe), "--report_to", "none"])
    assert train.ds_config_path and Path(train.ds_config_path).exists()
    assert train.deepspeed_plugin is not None
    header = recipe.read_text().splitlines()[0]
    assert header.startswith("#"), "every recipe opens with a header comment (launch command, hardware)"


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_every_ds_config_leaves_hf_values_auto_and_parses(path, monkeypatch):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    config = json.loads(path.read_text())
    for keys in HF_OWNED:
        node = config
        for k in keys:
            node = node[k]
        assert node == "auto", f"{path.name}: {'.'.join(keys)} must be \"auto\" (TrainingArguments sets it)"
    zero = dict(config["zero_optimization"])
    for k, v in list(zero.items()):
        if v == "auto":
            zero.pop(k)
    for section in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(section), dict) and zero[section].get("nvme_path") == "auto":
            zero[section] = {**zero[section], "nvme_path": "/tmp"}
    parsed = DeepSpeedZeroConfig(**zero)  # DeepSpeed's own schema
    stage = int(path.stem.removeprefix("stage")[0])
    assert parsed.stage == stage
    # the name says everything inside: offload appears in the config exactly when the name says so
    offloads = [s for s in ("offload_optimizer", "offload_param") if s in config["zero_optimization"]]
    assert bool(offloads) == ("offload" in path.stem or "nvme" in path.stem)


def test_cli_overrides_yaml_and_zero_stage_picks_file():
    _, train, _ = parse_args(["--config", str(REPO_ROOT / "configs/default.yaml"), "--learning_rate", "0.5",
                              "--zero_stage", "3", "--deepspeed", "", "--report_to", "none"])
    assert train.learning_rate == 0.5
    assert Path(train.ds_config_path).name == "stage3.json"
    assert train.deepspeed_plugin.zero_stage == 3


def test_no_arguments_is_the_embedded_default():
    script, train, model = parse_args([])
    assert model.model_name_or_path is None
    assert script.dataset_name == "data/train.jsonl"
    assert Path(train.ds_config_path).name == "stage2.json"
    assert train.use_cpu and not train.bf16 and not train.fp16  # CPU: fp32


def test_global_batch_size_sets_accumulation():
    _, train, _ = parse_args(["--per_device_train_batch_size", "4", "--global_batch_size", "32",
                              "--report_to", "none"])
    assert train.gradient_accumulation_steps == 8  # one process


def test_unknown_yaml_key_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.1\nmax_steps: 3\nwarmup_stepz: 2\n")
    with pytest.raises(ConfigError) as e:
        parse_args(["--config", str(bad)])
    assert e.value.problems == [
        f"{bad}: unknown key learning_rat: did you mean learning_rate? (`uv run python train_ds.py --help` lists "
        "them all)",
        f"{bad}: unknown key warmup_stepz: did you mean warmup_steps? (`uv run python train_ds.py --help` lists "
        "them all)"]


def test_unknown_cli_flag_fails():
    with pytest.raises(ConfigError) as e:
        parse_args(["--learning_rat", "0.1", "--max_stepz=3", "--logging_steps", "1", "--zzzzzz"])
    assert [p.split(":")[0] for p in e.value.problems] == ["unknown flag --learning_rat", "unknown flag --max_stepz",
                                                           "unknown flag --zzzzzz"]
    assert "did you mean --learning_rate?" in e.value.problems[0]
    assert "did you mean --max_steps?" in e.value.problems[1]
    assert "no such argument" in e.value.problems[2]


def test_stage_that_does_not_exist():
    with pytest.raises(ConfigError,
                       match=r"--zero_stage 5.*Choose one of 0, 1, 2, 2_offload, 2_offload_bf16, 2_offload_zenflow, 3"):
        parse_args(["--zero_stage", "5"])


def test_invalid_json_names_line(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 2,}\n}\n')
    problems = []
    resolve_ds_config(str(bad), None, None, problems)
    assert len(problems) == 1 and "line 2" in problems[0] and "broken.json" in problems[0]


def test_missing_ds_config_lists_shipped():
    problems = []
    resolve_ds_config("ds_configs/stage9.json", None, None, problems)
    assert "does not exist" in problems[0] and "ds_configs/stage2.json" in problems[0]


def test_nvme_needs_a_path(monkeypatch, tmp_path):
    monkeypatch.delenv("DS_NVME_PATH", raising=False)
    problems = []
    resolve_ds_config(None, "3_nvme", None, problems)
    assert "--nvme_path" in problems[0] and "DS_NVME_PATH" in problems[0]
    problems = []
    config, _ = resolve_ds_config(None, "3_nvme", str(tmp_path), problems)
    assert not problems
    assert config["zero_optimization"]["offload_param"]["nvme_path"] == str(tmp_path)


def test_nvme_checks_libaio_and_the_directory(tmp_path):
    ds = resolve(None, "3_nvme", str(tmp_path))
    assert nvme_problems(ds, aio=lambda: True) == []
    assert "libaio" in nvme_problems(ds, aio=lambda: False)[0]
    missing = resolve(None, "3_nvme", str(tmp_path / "nope"))
    assert "mkdir -p" in nvme_problems(missing, aio=lambda: True)[0]
    assert nvme_problems(resolve(None, "3_offload", None), aio=lambda: False) == []


def test_zero_stage_replaces_a_recipes_deepspeed():
    problems = []
    config, path = resolve_ds_config("ds_configs/stage2.json", "3", None, problems)
    assert not problems and path.endswith("stage3.json") and config["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("bf16,fp16,cuda,cuda_bf16,expected", [
    (None, False, True, True, (True, False)),    # Ampere+: bf16
    (None, False, True, False, (False, True)),   # V100/T4: fp16 with loss scaling
    (None, False, False, False, (False, False)),  # CPU: fp32
    (False, False, True, True, (False, False)),  # explicit fp32 on GPU wins
    (None, True, True, True, (False, True)),     # explicit fp16 wins over auto bf16
    (True, False, False, False, (True, False)),  # bf16 on CPU is possible (use_cpu)
])
def test_precision_choice(bf16, fp16, cuda, cuda_bf16, expected):
    got_bf16, got_fp16, problems = resolve_precision(bf16, fp16, cuda, cuda_bf16)
    assert (got_bf16, got_fp16) == expected and not problems


def test_impossible_precision_is_an_error():
    assert "needs a CUDA GPU" in resolve_precision(None, True, False, False)[2][0]
    assert "no bf16 support" in resolve_precision(True, False, True, False)[2][0]
    with pytest.raises(ConfigError, match="fp16"):
        parse_args(["--fp16", "true"])  # this machine has no GPU in CI


def test_cuda_arch_list_suffix_is_stripped():
    env = {"TORCH_CUDA_ARCH_LIST": "8.0;9.0a"}
    assert fix_cuda_arch_list(env) == "8.0;9.0"
    env = {"TORCH_CUDA_ARCH_LIST": "9.0 9.0a 10.0+PTX"}
    assert fix_cuda_arch_list(env) == "9.0;10.0+PTX"
    env = {"TORCH_CUDA_ARCH_LIST": "8.6;9.0"}
    assert fix_cuda_arch_list(env) is None and env["TORCH_CUDA_ARCH_LIST"] == "8.6;9.0"


def test_deepspeed_builder_accepts_the_fixed_list(monkeypatch):
    """The list DeepSpeed's JIT builder choked on ('9.0a') parses after the fix."""
    from deepspeed.ops.op_builder.builder import CUDAOpBuilder

    class Probe(CUDAOpBuilder):
        NAME = "probe"

        def __init__(self):
            super().__init__(name=self.NAME)
            self.jit_mode = True

        def absolute_name(self):
            return "probe"

        def sources(self):
            return []

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    with pytest.raises(ValueError, match="0a"):  # the bug users hit without the fix
        Probe().compute_capability_args()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    fix_cuda_arch_list()
    Probe().compute_capability_args()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0+PTX"


def test_a_max_length_beyond_the_models_positions_needs_rope_scaling(tmp_path):
    """The tiny default has 2048 positions: 7000 stops before any weights load unless RoPE is stretched."""
    with pytest.raises(ConfigError) as e:
        parse_args(["--max_length", "7000", "--report_to", "none"])
    assert any("--max_length 7000 is beyond the tiny default's max_position_embeddings 2048" in p
               and "--rope_scaling yarn:4" in p for p in e.value.problems)
    _, args, margs = parse_args(["--max_length", "7000", "--rope_scaling", "yarn:4", "--report_to", "none"])
    from recipe.modeling import build_tiny_tokenizer, load_model

    model = load_model(margs, args, build_tiny_tokenizer())
    assert model.config.max_position_embeddings == 8192
    assert model.config.rope_parameters["rope_type"] == "yarn" and model.config.rope_parameters["factor"] == 4.0
    with pytest.raises(ConfigError, match="even with --rope_scaling linear:2"):
        parse_args(["--max_length", "7000", "--rope_scaling", "linear:2", "--report_to", "none"])
    with pytest.raises(ConfigError, match="write TYPE:FACTOR"):
        parse_args(["--rope_scaling", "ntk:4", "--report_to", "none"])


def test_help_prints_every_flag_and_exits_0(capsys):
    """`train_ds.py --help` (argparse formats each help string with %: a bare '90%' once broke it)."""
    from recipe.config import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--fp8", "--tiled_mlp", "--varlen_attention", "--check_host_memory",
                                        "--zero_stage", "--learning_rate"))


def test_a_value_outside_a_flags_choices_is_one_line_with_the_choices():
    from recipe.config import parse_args
    from recipe.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        parse_args(["--tiled_mlp", "yes"])
    (problem,) = e.value.problems
    assert "invalid choice: 'yes'" in problem and "'auto', 'true', 'false'" in problem and "--help" in problem
