"""The house rules: one owner per concern and no import cycles, messages for typos and for DeepSpeed JSON a user
edited, the resume decision before any weights load, loss options honoured or refused, no meaningless warnings.
In process, no launches (one end-to-end exit code through __main__)."""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from recipe import REPO_ROOT
from recipe.config import parse_args
from recipe.errors import ConfigError
from recipe.hardware import prepare_process

prepare_process()  # what train_ds.py does before parsing: a world of one process


def import_graph() -> dict[str, set[str]]:
    """recipe module -> the recipe modules it imports, at the top or inside a function."""
    graph = {}
    for path in sorted((REPO_ROOT / "recipe").glob("*.py")):
        name = "recipe" if path.stem == "__init__" else f"recipe.{path.stem}"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("recipe"):
                deps |= {f"recipe.{a.name}" for a in node.names} if node.module == "recipe" else {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("recipe.")}
        graph[name] = {d for d in deps if d != name and (REPO_ROOT / (d.replace(".", "/") + ".py")).exists()}
    return graph


def test_no_import_cycles():
    graph, cycles = import_graph(), []

    def visit(node, stack):
        if node in stack:
            cycles.append(" -> ".join(stack[stack.index(node):] + [node]))
            return
        for dep in sorted(graph.get(node, ())):
            visit(dep, stack + [node])

    for node in graph:
        visit(node, [])
    assert not cycles, cycles
    assert graph["recipe.errors"] == set(), "errors.py imports nothing of ours"


def test_main_is_a_short_pipeline_of_phases():
    tree = ast.parse((REPO_ROOT / "train_ds.py").read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 60
    called = {n.func.id for n in ast.walk(main) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert {"prepare_run", "build_data", "build_model", "build_trainer", "train_or_raise", "finish"} <= called


def test_parsing_changes_nothing_in_the_process(monkeypatch):
    """Process set-up is prepare_process's alone: TrainConfig.__post_init__ leaves the environment as it finds it."""
    import os

    ours = ("TORCH_CUDA_ARCH_LIST", "OMP_NUM_THREADS", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
            "MASTER_ADDR", "MASTER_PORT")  # what TrainConfig.__post_init__ used to set or fix
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = {k: os.environ.get(k) for k in ours}
    parse_args(["--report_to", "none"])
    assert {k: os.environ.get(k) for k in ours} == before


def test_the_readme_tree_lists_every_file():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.split()
    readme = (REPO_ROOT / "README.md").read_text()
    tree = readme[readme.index("## Tree"):]
    missing = []
    for path in tracked:
        if path.startswith(("results/", ".")) or path in ("README.md",):
            continue  # results/ is described by results/README.md; dot-files by the tree's first line
        parts = Path(path).parts
        top = parts[0] + ("/" if len(parts) > 1 else "")
        # a file is listed by its name (recipe/config.py, scripts/train.sh, tests/test_config.py) or, for data and
        # config folders, by its folder (configs/models/, ds_configs/)
        if Path(path).name not in tree and not (len(parts) > 1 and f"{parts[-2]}/" in tree and parts[0] in
                                                 ("configs", "ds_configs", "data", "docs")):
            missing.append(path)
        assert top in tree or Path(path).name in tree, path
    assert not missing, f"README's tree lacks: {missing}"


# ---------------------------------------------------------------- 1. typos: exit 2, the closest name, no traceback


def test_a_misspelt_flag_exits_2_with_the_closest_name_and_no_traceback():
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "train_ds.py"), "--learning_rat", "1e-4"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "unknown flag --learning_rat: did you mean --learning_rate?" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and "[rank0]" not in proc.stderr


# ---------------------------------------------------------------- 2. a DeepSpeed JSON edited the guides' way


def edited_stage2(tmp_path: Path, **values) -> Path:
    config = json.loads((REPO_ROOT / "ds_configs" / "stage2.json").read_text())
    for dotted, value in values.items():
        node = config
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    path = tmp_path / "stage2.json"
    path.write_text(json.dumps(config))
    return path


def plain_recipe(tmp_path: Path) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("report_to: none\nmax_steps: 4\n")
    return recipe


def test_explicit_json_values_are_adopted_and_logged_once(tmp_path, caplog):
    path = edited_stage2(tmp_path, gradient_accumulation_steps=4, train_micro_batch_size_per_gpu=8,
                         gradient_clipping=0.5, bf16__enabled=False, optimizer__params__lr=2e-4)
    with caplog.at_level(logging.WARNING, logger="recipe.config"):
        _, args, _ = parse_args(["--config", str(plain_recipe(tmp_path)), "--deepspeed", str(path)])
    assert (args.gradient_accumulation_steps, args.per_device_train_batch_size) == (4, 8)
    assert (args.max_grad_norm, args.learning_rate, args.bf16) == (0.5, 2e-4, False)
    said = [r.getMessage() for r in caplog.records if "using it" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("stage2.json sets ") and "gradient_accumulation_steps=4" in said[0]
    assert args.hf_deepspeed_config.mismatches == []  # what HF raises on after the model loads
    assert args.deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"] == 4


def test_an_explicit_json_value_also_set_on_the_cli_or_in_the_recipe_names_both_places(tmp_path):
    path = edited_stage2(tmp_path, gradient_accumulation_steps=4, train_micro_batch_size_per_gpu=8)
    with pytest.raises(ConfigError) as e:
        parse_args(["--config", str(plain_recipe(tmp_path)), "--deepspeed", str(path),
                    "--gradient_accumulation_steps", "2"])
    (problem,) = e.value.problems
    assert "stage2.json sets gradient_accumulation_steps=4 and the command line sets --gradient_accumulation_steps" \
           in problem and 'write "auto"' in problem
    with pytest.raises(ConfigError) as e:  # the default recipe sets the batch (global 64, 32 per device)
        parse_args(["--config", str(REPO_ROOT / "configs" / "default.yaml"), "--deepspeed", str(path)])
    assert any("configs/default.yaml sets --per_device_train_batch_size 32" in p for p in e.value.problems)
    assert any("configs/default.yaml sets --global_batch_size 64" in p for p in e.value.problems)
    # the same value in both places is no conflict
    _, args, _ = parse_args(["--config", str(plain_recipe(tmp_path)), "--deepspeed", str(path),
                             "--gradient_accumulation_steps", "4"])
    assert args.gradient_accumulation_steps == 4 and args.hf_deepspeed_config.mismatches == []


def test_train_batch_size_in_the_json_sets_the_global_batch(tmp_path):
    path = edited_stage2(tmp_path, train_batch_size=32, train_micro_batch_size_per_gpu=4)
    _, args, _ = parse_args(["--config", str(plain_recipe(tmp_path)), "--deepspeed", str(path)])
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 8)
    assert args.hf_deepspeed_config.mismatches == []


# ---------------------------------------------------------------- 3. the resume decision before any weights load


@pytest.fixture
def no_weights(monkeypatch):
    from recipe import modeling

    def refuse(*a, **k):
        raise AssertionError("weights loaded before the resume checks")

    monkeypatch.setattr(modeling, "load_model", refuse)
    monkeypatch.setattr(modeling, "load_tokenizer", refuse)


def test_a_bad_resume_path_stops_before_any_weights_load(tmp_path, no_weights):
    import train_ds

    argv = ["--report_to", "none", "--results_dir", str(tmp_path), "--resume_from_checkpoint", str(tmp_path / "nope")]
    with pytest.raises(ConfigError, match="no such checkpoint folder"):
        train_ds.main(*parse_args(argv))


def test_a_checkpoint_of_another_method_stops_before_any_weights_load(tmp_path, no_weights):
    from recipe.checkpoints import Marker

    import train_ds

    argv = ["--report_to", "none", "--results_dir", str(tmp_path)]
    script, args, model = parse_args(argv)
    ckpt = tmp_path / train_ds.run_name_for(script, args, model) / "checkpoints" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    Marker(2, 1, {"model": "tiny-llama", "method": "lora", "lora_r": 16, "lora_target_modules": ["all-linear"]}
           ).write(ckpt)
    with pytest.raises(ConfigError, match="trains something else"):
        train_ds.main(*parse_args(argv))


# ---------------------------------------------------------------- 4. loss options under the fused loss paths


def loss_of(tmp_path, tiny_tokenizer, loss_type: str) -> tuple[float, dict, object]:
    from datasets import Dataset

    from recipe.modeling import load_model
    from recipe.trainer import RecipeTrainer

    _, args, margs = parse_args(["--report_to", "none", "--loss_type", loss_type, "--eval_strategy", "no",
                                 "--output_dir", str(tmp_path / loss_type)])
    rows = [{"prompt": [{"role": "user", "content": "abc"}], "completion": [{"role": "assistant", "content": "cba"}]}]
    model = load_model(margs, args, tiny_tokenizer)
    trainer = RecipeTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows * 2),
                            processing_class=tiny_tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    return float(trainer.compute_loss(model, dict(batch))), batch, model


def test_loss_type_dft_is_computed_not_ignored(tmp_path, tiny_tokenizer):
    import torch

    nll, batch, model = loss_of(tmp_path, tiny_tokenizer, "nll")
    dft, _, _ = loss_of(tmp_path, tiny_tokenizer, "dft")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    want_nll = float(-(logp * mask).sum() / mask.sum())
    want_dft = float(-(logp * logp.exp() * mask).sum() / mask.sum())  # DFT: each token's NLL weighted by its p
    assert nll == pytest.approx(want_nll, rel=1e-4)
    assert dft == pytest.approx(want_dft, rel=1e-4) and dft < nll


def test_loss_options_that_liger_cannot_honour_are_refused():
    from types import SimpleNamespace

    from recipe.config import loss_option_problems

    liger = {"fused_loss": "liger"}
    assert loss_option_problems(SimpleNamespace(speed=liger, loss_type="nll", label_smoothing_factor=0.0)) == []
    (dft,) = loss_option_problems(SimpleNamespace(speed=liger, loss_type="dft", label_smoothing_factor=0.0))
    assert dft.startswith("--loss_type dft:") and "--fused_loss trl" in dft
    (smooth,) = loss_option_problems(SimpleNamespace(speed=liger, loss_type="nll", label_smoothing_factor=0.1))
    assert "--label_smoothing_factor" in smooth
    trl = {"fused_loss": "trl"}
    assert loss_option_problems(SimpleNamespace(speed=trl, loss_type="dft", label_smoothing_factor=0.1)) == []
    with pytest.raises(ConfigError, match="--use_liger_kernel"):
        parse_args(["--report_to", "none", "--use_liger_kernel", "true"])


def test_every_option_the_loss_reads_is_honoured_or_refused():
    """Each `self.args.X` that SFTTrainer.compute_loss or Trainer.compute_loss reads is either one the fused path
    honours itself, or one recipe.config routes to SFTTrainer's loss (LOSS_OPTIONS): a new option in a newer TRL
    fails here until it is classified."""
    import inspect

    from transformers import Trainer
    from trl import SFTTrainer

    from recipe.config import LOSS_OPTIONS

    read = set()
    for method in (SFTTrainer.compute_loss, Trainer.compute_loss):
        tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(method)))
        read |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
                 and n.value.attr == "args" and isinstance(n.value.value, ast.Name) and n.value.value.id == "self"}
    # honoured by Trainer.compute_loss, which the fused path calls (token averaging across devices, DataParallel's
    # mean, label names), or not about the loss (max_length: SFTTrainer's error message for truncated images)
    honoured = {"average_tokens_across_devices", "n_gpu", "past_index", "label_names", "max_length"}
    unclassified = read - honoured - set(LOSS_OPTIONS)
    assert not unclassified, f"classify in recipe.config.LOSS_OPTIONS or here: {sorted(unclassified)}"


# ---------------------------------------------------------------- 5. noise


def test_the_arch_list_fix_is_logged_once(monkeypatch, caplog):
    import os

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    with caplog.at_level(logging.INFO, logger="recipe.hardware"):
        prepare_process()
        prepare_process()
    said = [r.getMessage() for r in caplog.records if "TORCH_CUDA_ARCH_LIST" in r.getMessage()]
    assert len(said) == 1 and "9.0a -> 9.0" in said[0]
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"


def test_noise_filters_drop_only_what_they_name():
    from recipe.noise import NoCudaRuntimeOnCpu, OptionalLigerBackends

    def record(msg, *args):
        return logging.LogRecord("x", logging.WARNING, __file__, 1, msg, args, None)

    liger = OptionalLigerBackends()
    template = "Backend impl '%s' for op '%s' could not be imported: %s: %s"
    assert not liger.filter(record(template, "liger_kernel.ops.backends._cutedsl.rope", "rope", "ImportError", "x"))
    assert not liger.filter(record(template, "liger_kernel.ops.backends._ascend.rope", "rope", "ImportError", "x"))
    assert liger.filter(record(template, "liger_kernel.ops.backends._triton.rope", "rope", "ImportError", "x"))
    assert liger.filter(record("something else %s", "liger_kernel.ops.backends._cutedsl.rope"))
    cpu = NoCudaRuntimeOnCpu()
    assert not cpu.filter(record("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local"))
    assert cpu.filter(record("Error building extension '%s'", "cpu_adam"))
    assert any(isinstance(f, OptionalLigerBackends) for f in logging.getLogger("liger_kernel.backends.registry").filters)


def test_gradient_checkpointing_is_taken_without_transformers_rename_warning():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, args, _ = parse_args(["--report_to", "none", "--gradient_checkpointing", "true"])
    assert args.gradient_checkpointing is True and args.activation_checkpointing is True
    assert not [w for w in caught if "gradient_checkpointing" in str(w.message)]


def test_accelerate_gets_the_accumulation_steps_deepspeed_has(tmp_path, tiny_tokenizer):
    """accelerate warns "Gradient accumulation steps mismatch" when its count differs from the DeepSpeed config's
    (transformers hands it 1); RecipeTrainer hands it the real one."""
    from datasets import Dataset

    from recipe.modeling import load_model
    from recipe.trainer import RecipeTrainer

    _, args, margs = parse_args(["--report_to", "none", "--eval_strategy", "no", "--output_dir", str(tmp_path)])
    assert args.gradient_accumulation_steps == 2  # the default recipe on one process: 64 = 32 x 2 x 1
    rows = [{"prompt": [{"role": "user", "content": "abc"}], "completion": [{"role": "assistant", "content": "cba"}]}]
    trainer = RecipeTrainer(model=load_model(margs, args, tiny_tokenizer), args=args,
                            train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer)
    plugin = trainer.accelerator.state.deepspeed_plugin
    assert trainer.accelerator.gradient_accumulation_steps == plugin.get_value("gradient_accumulation_steps") == 2
