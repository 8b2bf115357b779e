"""Real conversations trained right: every assistant turn masked in, everything else out, for any chat template;
ShareGPT, column mapping, mixtures, streaming validation, the truncation count, packing without cross-talk."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from recipe.config import ScriptArguments
from recipe.data import assistant_spans, build_datasets, check_json_file, encode, mask_view, to_example
from recipe.errors import ConfigError

CHAT = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": "reverse: ab"}, {"role": "assistant", "content": "ba"},
        {"role": "user", "content": "reverse: xyz"}, {"role": "assistant", "content": "zyx"},
        {"role": "tool", "content": "ok"}, {"role": "user", "content": "and cd?"},
        {"role": "assistant", "content": "dc"}]
ANSWERS = ["ba", "zyx", "dc"]
LLAMA3_TEMPLATE = (  # Llama-3's layout: headers, <|eot_id|> closes every turn, no {% generation %} markers
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def tokenizer_with(template: str | None, tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    if template == "llama3":
        tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": [
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
        tok.eos_token = "<|eot_id|>"
        tok.chat_template = LLAMA3_TEMPLATE
    elif template == "plain":
        from recipe.modeling import DEFAULT_CHAT_TEMPLATE

        tok.chat_template = DEFAULT_CHAT_TEMPLATE  # what base models without a template get: ### headers + EOS
    return tok


def trained_runs(tokenizer, ids, mask) -> list[str]:
    """The decoded runs of consecutive trained tokens, special tokens kept."""
    runs, current = [], []
    for token, m in zip(ids + [None], mask + [0]):
        if m:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


@pytest.mark.parametrize("template,close", [(None, "<|end|>"), ("llama3", "<|eot_id|>"), ("plain", "<|end|>")])
def test_every_assistant_turn_and_its_end_token_is_trained_and_nothing_else(tiny_tokenizer, template, close):
    tok = tokenizer_with(template, tiny_tokenizer)
    out = encode(to_example({"messages": CHAT}, "messages"), tok)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids == tok(tok.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    assert trained_runs(tok, ids, mask) == [a + close for a in ANSWERS]
    # token by token: a token is trained exactly when its characters lie in an assistant turn's content or close
    full, spans = assistant_spans(tok, CHAT, [m["role"] == "assistant" for m in CHAT], "row")
    offsets = tok(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for (start, end), m in zip(offsets, mask):
        inside = any(s <= start and end <= e for s, e in spans)
        assert bool(m) == inside, (full[start:end], m)
    for s, e in spans:  # no header, no user/system/tool text in a span
        assert "user" not in full[s:e] and "assistant" not in full[s:e] and "be brief" not in full[s:e]


def test_train_on_turns_last_trains_only_the_last(tiny_tokenizer):
    out = encode(to_example({"messages": CHAT}, "messages", train_on_turns="last"), tiny_tokenizer)
    assert trained_runs(tiny_tokenizer, out["input_ids"], out["assistant_masks"]) == ["dc<|end|>"]


def test_the_mask_as_a_user_reads_it(tiny_tokenizer):
    out = encode(to_example({"messages": CHAT[:3]}, "messages"), tiny_tokenizer)
    assert mask_view(tiny_tokenizer, out["input_ids"], out["assistant_masks"]) == \
        "<|system|>be brief<|end|><|user|>reverse: ab<|end|><|assistant|>[[ba<|end|>]]"


@pytest.mark.parametrize("row,message", [
    ({"messages": CHAT[:2]}, "row 7: the conversation ends on a user turn"),
    ({"messages": [CHAT[1], {"role": "assistant", "content": "  "}]}, "row 7: assistant turn 1 is empty"),
    ({"messages": [CHAT[1], {"role": "robot", "content": "x"}]}, "row 7: message 1 has role 'robot'"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "wizard", "value": "x"}]},
     "row 7: turn 1 is from 'wizard'"),
])
def test_bad_conversations_are_named(row, message):
    fmt = "messages" if "messages" in row else "sharegpt"
    with pytest.raises(ValueError, match=message):
        to_example(row, fmt, "chats.jsonl row 7")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def args_for(path=None, **kw):
    return ScriptArguments(dataset_name=str(path), eval_dataset_name=None, eval_split_ratio=0, **kw)


def test_sharegpt_is_detected_and_trains_every_gpt_turn(tmp_path, tiny_tokenizer):
    share = {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "reverse: ab"},
                               {"from": "gpt", "value": "ba"}, {"from": "human", "value": "and cd?"},
                               {"from": "gpt", "value": "dc"}]}
    data = build_datasets(args_for(write_jsonl(tmp_path / "s.jsonl", [share] * 3)), 0, tiny_tokenizer)
    assert data.fmt == "sharegpt"
    row = data.train[0]
    assert trained_runs(tiny_tokenizer, row["input_ids"], row["assistant_masks"]) == ["ba<|end|>", "dc<|end|>"]


def test_dataset_columns_map_the_users_names(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2=", "answer": "4", "id": 1}] * 3)
    data = build_datasets(args_for(path, dataset_columns="question:prompt,answer:completion"), 0, tiny_tokenizer)
    assert data.fmt == "prompt_completion"
    row = data.train[0]
    assert trained_runs(tiny_tokenizer, row["input_ids"], row["assistant_masks"]) == ["4<|end|>"]
    dialog = write_jsonl(tmp_path / "d.jsonl", [{"dialog": CHAT}] * 2)
    assert build_datasets(args_for(dialog, dataset_columns="dialog:messages"), 0, tiny_tokenizer).fmt == "messages"
    with pytest.raises(ConfigError, match=r"maps questoin, which .* does not have; its columns are: question, "
                                          r"answer, id"):
        build_datasets(args_for(path, dataset_columns="questoin:prompt,answer:completion"), 0, tiny_tokenizer)


def test_a_mixture_takes_its_counts_deterministically(tmp_path, tiny_tokenizer):
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [CHAT[1], {"role": "assistant", "content": str(i)}]}
                                                   for i in range(40)])
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": f"document {i}"} for i in range(10)])
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(8)])
    mix = [f"{chats}:25", f"{texts}:1.5", str(qa)]
    args = ScriptArguments(dataset_mixture=mix, eval_split_ratio=0)
    data = build_datasets(args, 0, tiny_tokenizer)
    assert data.rows_per_source == {str(chats): 25, str(texts): 15, str(qa): 8}
    assert len(data.train) == 48 and data.fmt == "messages+text+prompt_completion"
    again = build_datasets(args, 0, tiny_tokenizer)
    assert again.train["input_ids"] == data.train["input_ids"]
    other = build_datasets(args, 1, tiny_tokenizer)
    assert other.train["input_ids"] != data.train["input_ids"]
    with pytest.raises(ConfigError, match="a row count must be >= 1"):
        build_datasets(ScriptArguments(dataset_mixture=[f"{qa}:0"]), 0, tiny_tokenizer)


def test_validation_reads_a_large_file_line_by_line(tmp_path):
    """A 64 MiB JSON Lines file is checked within a few MiB of Python memory (the file is never read whole)."""
    path = tmp_path / "big.jsonl"
    line = json.dumps({"messages": [CHAT[1], {"role": "assistant", "content": "x" * 1000}]}) + "\n"
    with open(path, "w") as f:
        for _ in range((64 << 20) // len(line)):
            f.write(line)
    tracemalloc.start()
    check_json_file(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert path.stat().st_size > 60 << 20 and peak < 4 << 20, peak
    with open(path, "a") as f:
        f.write('{"messages": [oops\n')
    with pytest.raises(ConfigError, match=r"line \d+ is not valid JSON"):
        check_json_file(path)


def test_only_rows_really_cut_count_as_truncated(tiny_tokenizer):
    from datasets import Dataset

    from recipe.data import check_truncation

    ours = Dataset.from_list([{"input_ids": [1] * n, "assistant_masks": [1] * n} for n in (8, 8, 9, 12, 3)])
    prepared = Dataset.from_list([{"input_ids": [1] * min(n, 8)} for n in (8, 8, 9, 12, 3)])
    errors, warnings = check_truncation(prepared, ours, 8, "train")
    assert errors == [] and warnings == ["2 of 5 train examples are longer than --max_length 8 and are truncated "
                                         "(raise it if their endings matter)."]


@pytest.mark.parametrize("attn", ["eager", "sdpa", pytest.param("sdpa_varlen", marks=pytest.mark.gpu)])
def test_packed_documents_do_not_see_each_other(tiny_tokenizer, attn):
    """TRL's packing (padding-free, position_ids restarting per document): each document's per-token loss in the
    packed row equals its loss alone (fp32), for the attention implementations the recipe uses. Transformers builds
    a block-diagonal causal mask from the position_ids for eager and SDPA (a materialised seq x seq mask for SDPA);
    recipe.attention's varlen flash attention (GPU, bf16: flash kernels take no fp32) takes the document boundaries
    and no mask."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from recipe import attention

    if attn == attention.NAME:
        attention.register()
    device, dtype = ("cuda", torch.bfloat16) if attn == attention.NAME else ("cpu", torch.float32)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    model = LlamaForCausalLM(config).to(device, dtype).eval()
    docs = [encode(to_example({"messages": chat}, "messages"), tiny_tokenizer) for chat in (CHAT[1:3], CHAT[1:5], CHAT)]
    examples = [{"input_ids": d["input_ids"], "labels": [t if m else -100 for t, m in zip(d["input_ids"],
                                                                                       d["assistant_masks"])]}
                for d in docs]
    collate = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.pad_token_id, padding_free=True,
                                              return_position_ids=True)

    def per_token_loss(batch):
        with torch.no_grad():
            # use_cache=False as RecipeTrainer.compute_loss passes: transformers looks for packed documents in the
            # position_ids only without a cache (and without an attention mask)
            logits = model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()
                              if k != "labels"}, use_cache=False).logits
        shift = torch.nn.functional.cross_entropy(logits[0, :-1].float().cpu(), batch["labels"][0, 1:],
                                                  reduction="none", ignore_index=-100)
        return shift

    packed = collate(examples)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1 and packed["position_ids"][0].tolist().count(0) == 3
    packed_loss, start = per_token_loss(packed), 0
    for example in examples:
        alone = per_token_loss(collate([example]))
        n = len(example["input_ids"])
        tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(packed_loss[start:start + n - 1], alone, **tol)
        start += n


@pytest.mark.xdist_group("mixture")
def test_two_processes_train_a_multi_turn_mixture(tmp_path):
    """End to end, 2 processes (deepspeed launcher, gloo): a mixture of multi-turn chats, ShareGPT and
    prompt/completion rows trains, and summary.json counts each source."""
    from conftest import FAST, check_ok, launch, read_summary

    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}] * 24)
    share = write_jsonl(tmp_path / "share.jsonl", [{"conversations": [
        {"from": "human", "value": f"reverse: {w}"}, {"from": "gpt", "value": w[::-1]},
        {"from": "human", "value": "again"}, {"from": "gpt", "value": w[::-1]}]} for w in ("abc", "hello", "xyz")] * 8)
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"q": f"{i}+{i}=", "a": str(2 * i)} for i in range(16)])
    cap = FAST.index("--max_train_samples")
    fast = FAST[:cap] + FAST[cap + 2:]  # the mixture sets its own rows
    proc = launch([*fast, "--dataset_mixture", f"{chats}:16", f"{share}:0.5", str(qa), "--dataset_columns",
                   "q:prompt,a:completion", "--eval_split_ratio", "0", "--max_length", "256",
                   "--heldout_eval", "false"], tmp_path / "results", nproc=2, launcher="deepspeed")
    check_ok(proc)
    summary = read_summary(tmp_path / "results")
    assert summary["rows_per_dataset"] == {str(chats): 16, str(share): 12, str(qa): 16}
    assert summary["dataset_format"] == "messages+sharegpt+prompt_completion" and summary["world_size"] == 2
    assert summary["global_step"] == 4 and 0 < summary["train_loss"] < 10
