"""Every data format loads, converts and masks the prompt; bad data stops with the row named."""

from __future__ import annotations

import json

import pytest

from recipe.errors import ConfigError
from recipe.data import build_datasets, detect_format, prepare, to_sft_row
from recipe.config import ScriptArguments

from recipe.hardware import prepare_process  # noqa: E402

prepare_process()  # what train_ds.py does before parsing: a world of one process

CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}]}
ALPACA = {"instruction": "add", "input": "1 2", "output": "3"}
PC = {"prompt": "2+2=", "completion": "4"}
TEXT = {"text": "plain text row"}
TOKENS = {"input_ids": [5, 6, 7, 8]}


def write(path, rows, kind):
    import pandas as pd

    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif kind == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    return path


def args_for(path, **kw):
    return ScriptArguments(dataset_name=str(path), eval_dataset_name=None, **kw)


@pytest.mark.parametrize("row,kind,fmt", [
    (CHAT, "jsonl", "messages"), (ALPACA, "json", "alpaca"), (PC, "csv", "prompt_completion"),
    (TEXT, "parquet", "text"), (TOKENS, "parquet", "tokens"),
])
def test_each_format_loads_from_its_file_type(tmp_path, row, kind, fmt):
    path = write(tmp_path / f"d.{kind}", [row] * 50, kind)
    data = build_datasets(args_for(path, eval_split_ratio=0.1), seed=0)
    assert data.fmt == fmt
    assert len(data.train) == 45 and len(data.eval) == 5  # eval carved from train


def test_row_conversion():
    assert to_sft_row(CHAT, "messages") == {"prompt": CHAT["messages"][:2], "completion": [CHAT["messages"][2]]}
    assert to_sft_row(ALPACA, "alpaca")["prompt"][0]["content"] == "add\n\n1 2"
    assert to_sft_row(PC, "prompt_completion") == PC
    assert to_sft_row(TEXT, "text") == TEXT


@pytest.mark.parametrize("row,kind", [(CHAT, "jsonl"), (ALPACA, "jsonl"), (PC, "jsonl")])
def test_prompt_is_masked(tmp_path, tiny_tokenizer, row, kind):
    """Through SFTTrainer's own tokenisation: loss only on the answer and the end-of-turn token."""
    from recipe.config import parse_args
    from recipe.modeling import load_model
    from recipe.trainer import RecipeTrainer

    path = write(tmp_path / f"d.{kind}", [row] * 4, kind)
    train = build_datasets(args_for(path, eval_split_ratio=0), seed=0, tokenizer=tiny_tokenizer).train
    script, targs, margs = parse_args(["--report_to", "none", "--eval_strategy", "no", "--output_dir", str(tmp_path / "out")])
    trainer = RecipeTrainer(model=load_model(margs, targs, tiny_tokenizer), args=targs, train_dataset=train,
                            processing_class=tiny_tokenizer)
    ex = trainer.train_dataset[0]
    trained = [t for t in ex["labels"] if t != -100]
    answer = {"messages": "hello", "instruction": "3", "prompt": "4"}[next(iter(row))]
    assert tiny_tokenizer.decode(trained, skip_special_tokens=True) == answer
    assert trained[-1] == tiny_tokenizer.eos_token_id  # the model learns to stop
    assert ex["labels"][0] == -100 and len(trained) < len(ex["input_ids"])  # the prompt carries no loss


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(CHAT) + "\n" + json.dumps(CHAT) + "\n{\"messages\": [oops\n")
    with pytest.raises(ConfigError, match="line 3"):
        build_datasets(args_for(path), seed=0)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_datasets(args_for(tmp_path / "nope.jsonl"), seed=0)


def test_no_usable_column(tmp_path):
    path = write(tmp_path / "d.csv", [{"question": "q", "answer": "a"}] * 3, "csv")
    with pytest.raises(ConfigError, match=r"no usable columns.*question, answer.*--dataset_format"):
        build_datasets(args_for(path), seed=0)


def test_empty_dataset(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ConfigError, match="empty: it has no rows"):
        build_datasets(args_for(path), seed=0)


def test_bad_row_is_named(tmp_path):
    rows = [CHAT, {"messages": [{"role": "user", "content": "no answer"}]}]
    from datasets import Dataset

    with pytest.raises(ConfigError, match="row 2.*assistant"):
        prepare(Dataset.from_list(rows), "auto", "chats.jsonl")


def test_detect_format_order():
    assert detect_format(["messages", "text"]) == "messages"
    assert detect_format(["instruction", "input", "output"]) == "alpaca"


def test_shipped_data_is_what_make_data_writes(tmp_path):
    """data/*.jsonl are reproducible from data/make_data.py, and held-out words are unseen in train."""
    import importlib.util

    from recipe import REPO_ROOT

    spec = importlib.util.spec_from_file_location("make_data", REPO_ROOT / "data" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_text() == (REPO_ROOT / "data" / name).read_text()
    words = lambda f: {json.loads(l)["messages"][1]["content"] for l in (tmp_path / f).read_text().splitlines()}
    assert not words("train.jsonl") & words("test.jsonl")


def test_pretokenised_rows_pass_through_sft_untouched(tmp_path, tiny_tokenizer):
    """tokens rows reach the collator as they are: no template, no EOS added, loss on every token."""
    from trl import SFTConfig, SFTTrainer
    from transformers import LlamaConfig, LlamaForCausalLM

    path = write(tmp_path / "t.parquet", [TOKENS] * 8, "parquet")
    train = build_datasets(args_for(path, eval_split_ratio=0), seed=0, tokenizer=tiny_tokenizer).train
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True),
                         train_dataset=train, processing_class=tiny_tokenizer)
    assert trainer.train_dataset[0]["input_ids"] == TOKENS["input_ids"]
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert batch["labels"].tolist() == [TOKENS["input_ids"]]


def test_bad_token_row():
    with pytest.raises(ValueError, match="input_ids"):
        to_sft_row({"input_ids": ["a", "b"]}, "tokens", "row 3")
