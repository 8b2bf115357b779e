"""Datasets: load local files or hub datasets (one or a mixture), detect each row format, tokenise and mask.

Every row becomes `input_ids` + `assistant_masks` (1 where the loss applies), which TRL's SFTTrainer takes as a
processed dataset (it builds the labels, truncates to max_length, packs):
- chats (`messages`, ShareGPT `conversations`, alpaca, prompt/completion lists of messages): every assistant turn
  is trained, its content and the end-of-turn token the chat template closes it with; system, user and tool turns
  and the template's role headers are masked (`--train_on_turns last`: the last assistant turn only). The spans
  come from rendering prefixes of the conversation with the tokenizer's own template, so any template works,
  with or without `{% generation %}` markers;
- prompt/completion strings: the completion and EOS; text: every token and EOS; tokens: every token as given.
`--dataset_columns question:prompt,answer:completion` maps a user's column names onto these.
JSON Lines files are checked line by line (a 10 GB file is never read whole); tokenisation is a `datasets.map`,
cached, run by the main process first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from recipe import REPO_ROOT
from recipe.errors import ConfigError

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
FORMAT_COLUMNS = {  # detection order: the first format whose columns are all present wins
    "tokens": ("input_ids",),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "system": "system", "tool": "tool",
                  "function_response": "tool", "observation": "tool"}


def resolve_local(name: str) -> Path | None:
    """A local path as given (relative to the working directory) or relative to the repo; else None."""
    for candidate in (Path(name), REPO_ROOT / name):
        if candidate.exists():
            return candidate
    return None


def looks_local(name: str) -> bool:
    return Path(name).suffix in LOCAL_BUILDERS or name.startswith((".", "/", "~")) or name.count("/") > 1


def first_char(path: Path) -> str:
    with open(path, encoding="utf-8") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return chunk.lstrip()[0]
    return ""


def check_json_file(path: Path) -> None:
    """Check a .json/.jsonl file row by row, reading one line at a time (memory: one line, not the file); a bad row
    is reported with its line number. A .json file holding one top-level list is parsed whole (JSON allows no
    other way): use JSON Lines for large data."""
    first = first_char(path)
    if not first:
        raise ConfigError([f"{path} is empty: it has no rows. Point --dataset_name at a file with data."])
    if path.suffix == ".json" and first == "[":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError([f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}."]) from None
        if not all(isinstance(r, dict) for r in rows):
            raise ConfigError([f"{path}: every element of the top-level list must be a JSON object."])
        return
    with open(path, encoding="utf-8") as lines:
        check_json_lines(path, lines)


def check_json_lines(path: Path, lines) -> None:
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(
                [f"{path}: line {lineno} is not valid JSON ({e.msg}, column {e.colno}). Fix or delete that line."]
            ) from None
        if not isinstance(row, dict):
            raise ConfigError([f"{path}: line {lineno} must be a JSON object, not {type(row).__name__}."])


def load_split(name: str, config: str | None, split: str):
    """Load one split from a local file/directory or the hub."""
    from datasets import load_dataset

    local = resolve_local(name)
    if local is None and looks_local(name):
        raise ConfigError([f"data file {name} does not exist. Check the path, or run `python data/make_data.py` "
                           "to regenerate the shipped data."])
    if local is not None and local.is_file():
        builder = LOCAL_BUILDERS.get(local.suffix)
        if builder is None:
            raise ConfigError([f"{local}: unsupported file type {local.suffix!r}; use one of "
                               f"{', '.join(LOCAL_BUILDERS)}."])
        if builder == "json":
            check_json_file(local)
        elif local.stat().st_size == 0:
            raise ConfigError([f"{local} is empty: it has no rows. Point --dataset_name at a file with data."])
        return load_dataset(builder, data_files=str(local), split="train")
    source = str(local) if local is not None else name
    try:
        return load_dataset(source, config, split=split)
    except ValueError as e:
        if "Unknown split" in str(e) or "split" in str(e).lower():
            raise KeyError(split) from e
        raise


def detect_format(columns: list[str]) -> str:
    for fmt, needed in FORMAT_COLUMNS.items():
        if all(c in columns for c in needed):
            return fmt
    expected = "; ".join(f"{fmt}: {', '.join(cols)}" for fmt, cols in FORMAT_COLUMNS.items())
    raise ConfigError([f"no usable columns in the dataset (found: {', '.join(columns) or 'none'}). "
                       f"Expected one of: {expected}. Rename the columns, map them with --dataset_columns "
                       "(e.g. question:prompt,answer:completion), or pass --dataset_format."])


def parse_columns(spec: str | None) -> dict[str, str]:
    """--dataset_columns "question:prompt,answer:completion" -> {"question": "prompt", "answer": "completion"}."""
    if not spec:
        return {}
    pairs = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        source, sep, target = part.partition(":")
        if not sep or not source or not target:
            raise ConfigError([f"--dataset_columns {spec!r}: {part!r} is not 'their_column:our_column' "
                               "(e.g. question:prompt,answer:completion or dialog:messages)."])
        pairs[source.strip()] = target.strip()
    return pairs


def map_columns(dataset, columns: dict[str, str], source: str, strict: bool = True):
    """Rename the user's columns onto ours; a mapping from a column that is absent names the columns present. In a
    mixture (strict False) a source with none of the mapped columns is left as it is."""
    if not columns:
        return dataset
    missing = [c for c in columns if c not in dataset.column_names]
    if not strict and len(missing) == len(columns):
        return dataset
    if missing:
        raise ConfigError([f"--dataset_columns maps {', '.join(missing)}, which {source} does not have; its columns "
                           f"are: {', '.join(dataset.column_names)}."])
    clash = [t for s, t in columns.items() if t in dataset.column_names and t not in columns]
    if clash:
        dataset = dataset.remove_columns(clash)  # the mapped column replaces one of the same name
    return dataset.rename_columns(columns)


def _messages(value, where: str, roles=None) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: the conversation must be a non-empty list of {{role, content}} objects.")
    out = []
    for i, m in enumerate(value):
        if roles is not None:  # ShareGPT: from/value
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise ValueError(f"{where}: turn {i} needs 'from' and 'value' (ShareGPT).")
            if m["from"] not in roles:
                raise ValueError(f"{where}: turn {i} is from {m['from']!r}; ShareGPT roles are "
                                 f"{', '.join(sorted(roles))}.")
            m = {"role": roles[m["from"]], "content": m["value"]}
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: message {i} needs 'role' and 'content'.")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: message {i} has role {m['role']!r}; use one of {sorted(ROLES)}.")
        out.append({"role": m["role"], "content": "" if m["content"] is None else str(m["content"])})
    return out


def _chat(messages: list[dict], trained: list[bool], where: str) -> dict:
    """A conversation and which of its turns carry the loss; the rules every chat row must satisfy."""
    for i, (m, t) in enumerate(zip(messages, trained)):
        if t and not m["content"].strip():
            raise ValueError(f"{where}: assistant turn {i} is empty: nothing to learn from. Remove the row, or give "
                             "the turn its answer.")
    if messages[-1]["role"] == "user":
        raise ValueError(f"{where}: the conversation ends on a user turn, which nothing answers: end it with the "
                         "assistant's reply, or drop the last turn.")
    if not any(trained):
        raise ValueError(f"{where}: a chat needs a user turn followed by an assistant turn to train on.")
    first = trained.index(True)
    if first == 0 or not any(m["role"] == "user" for m in messages[:first]):
        raise ValueError(f"{where}: a chat needs a user turn followed by an assistant turn to train on.")
    return {"chat": messages, "trained": trained}


def to_example(row: dict, fmt: str, where: str = "row", train_on_turns: str = "all") -> dict:
    """One dataset row in our canonical shape: {"chat", "trained"} (a conversation and the turns with loss),
    {"prompt", "completion"} (strings), {"text"} or {"input_ids"}. Raises ValueError naming the row."""
    if fmt in ("messages", "sharegpt"):
        messages = (_messages(row.get("messages"), where) if fmt == "messages"
                    else _messages(row.get("conversations"), where, SHAREGPT_ROLES))
        trained = [m["role"] == "assistant" for m in messages]
        if train_on_turns == "last" and any(trained):
            last = len(trained) - 1 - trained[::-1].index(True)
            trained = [i == last for i in range(len(trained))]
        return _chat(messages, trained, where)
    if fmt == "alpaca":
        instruction, output = row.get("instruction"), row.get("output")
        if not instruction or output is None:
            raise ValueError(f"{where}: alpaca rows need a non-empty 'instruction' and an 'output'.")
        extra = row.get("input") or ""
        user = f"{instruction}\n\n{extra}" if extra else str(instruction)
        return _chat([{"role": "user", "content": user}, {"role": "assistant", "content": str(output)}],
                     [False, True], where)
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if prompt is None or completion is None:
            raise ValueError(f"{where}: 'prompt' and 'completion' must both be set.")
        if isinstance(prompt, list):
            prompt, completion = _messages(prompt, where), _messages(completion, where)
            return _chat(prompt + completion, [False] * len(prompt) + [m["role"] == "assistant" for m in completion],
                         where)
        if not str(completion):
            raise ValueError(f"{where}: the completion is empty: nothing to learn from.")
        return {"prompt": str(prompt), "completion": str(completion)}
    if fmt == "text":
        text = row.get("text")
        if not isinstance(text, str) or not text:
            raise ValueError(f"{where}: 'text' must be a non-empty string.")
        return {"text": text}
    if fmt == "tokens":
        ids = row.get("input_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ValueError(f"{where}: 'input_ids' must be a non-empty list of token ids (integers >= 0).")
        return {"input_ids": ids}
    raise ValueError(f"unknown dataset format {fmt!r}")


def to_sft_row(row: dict, fmt: str, where: str = "row") -> dict:
    """A row as TRL's prompt/completion (chats: everything before the last assistant turn is the prompt), text or
    tokens shape: what scripts/generate.py and merge_lora.py ask a model."""
    example = to_example(row, fmt, where)
    if "chat" in example:
        last = len(example["trained"]) - 1 - example["trained"][::-1].index(True)
        return {"prompt": example["chat"][:last], "completion": [example["chat"][last]]}
    return example


# ---------------------------------------------------------------- tokenising and masking


def assistant_spans(tokenizer, chat: list[dict], trained: list[bool], where: str) -> tuple[str, list[tuple]]:
    """The rendered conversation and the character spans of its trained assistant turns: from the end of the
    assistant header (the prefix rendered with add_generation_prompt) to the end of the turn (the prefix with the
    turn), trailing whitespace left out. Needs a template that renders a prefix of a conversation as a prefix of its
    rendering, which chat templates do (they are built to continue a conversation)."""
    def render(messages, generation_prompt=False):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    full, spans = render(chat), []
    for i, train in enumerate(trained):
        if not train:
            continue
        before, after = render(chat[:i], generation_prompt=True), render(chat[:i + 1])
        if not (after.startswith(before) and full.startswith(after)):
            raise ConfigError([f"{where}: the chat template renders assistant turn {i} differently once more turns "
                               "follow (it is not prefix-stable), so its trained span cannot be found. Use "
                               "--train_on_turns last, or a template without per-position rewriting."])
        end = len(after)
        while end > len(before) and after[end - 1].isspace():
            end -= 1
        spans.append((len(before), end))
    return full, spans


def encode(example: dict, tokenizer) -> dict:
    """A canonical example -> input_ids and assistant_masks (1: the token carries loss)."""
    return encode_batch([example], tokenizer)[0]


def encode_batch(examples: list[dict], tokenizer) -> list[dict]:
    """encode for many examples: the chats' rendered texts go through the (Rust) tokenizer in one batched call."""
    out: list[dict | None] = [None] * len(examples)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    chats = []
    for i, example in enumerate(examples):
        if "input_ids" in example:
            out[i] = {"input_ids": example["input_ids"], "assistant_masks": [1] * len(example["input_ids"])}
        elif "text" in example:
            ids = tokenizer(example["text"])["input_ids"]
            ids += [] if ids[-1:] == eos else eos
            out[i] = {"input_ids": ids, "assistant_masks": [1] * len(ids)}
        elif "prompt" in example:
            prompt = tokenizer(example["prompt"])["input_ids"]
            completion = tokenizer(example["completion"], add_special_tokens=False)["input_ids"] + eos
            out[i] = {"input_ids": prompt + completion, "assistant_masks": [0] * len(prompt) + [1] * len(completion)}
        else:
            chats.append((i, *assistant_spans(tokenizer, example["chat"], example["trained"],
                                              example.get("where", "row"))))
    if chats:
        enc = tokenizer([full for _, full, _ in chats], add_special_tokens=False, return_offsets_mapping=True)
        for (i, _, spans), ids, offsets in zip(chats, enc["input_ids"], enc["offset_mapping"]):
            out[i] = {"input_ids": ids, "assistant_masks": span_mask(offsets, spans)}
    return out


def span_mask(offsets, spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token that starts inside one of the (sorted, disjoint) character spans."""
    mask, k = [], 0
    for start, _ in offsets:
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        mask.append(int(k < len(spans) and spans[k][0] <= start))
    return mask


def mask_view(tokenizer, input_ids: list[int], mask: list[int]) -> str:
    """The tokens as text, trained runs in [[...]]: how a user checks what a row trains on."""
    out, run = [], []
    for token, m in zip(input_ids + [None], mask + [0]):
        if m:
            run.append(token)
            continue
        if run:
            out.append("[[" + tokenizer.decode(run) + "]]")
            run = []
        if token is not None:
            out.append(tokenizer.decode([token]))
    return "".join(out)


def prepare(dataset, fmt: str, source: str, tokenizer=None, train_on_turns: str = "all", num_proc: int | None = None):
    """Convert (and, given a tokenizer, tokenise and mask) every row; the first bad row stops with its index.
    Batched, and on num_proc processes when given (--dataset_num_proc)."""
    if len(dataset) == 0:
        raise ConfigError([f"{source} has no rows. Point --dataset_name at a file with data."])
    if fmt == "auto":
        fmt = detect_format(dataset.column_names)
    elif not all(c in dataset.column_names for c in FORMAT_COLUMNS[fmt]):
        raise ConfigError([f"--dataset_format {fmt} needs columns {FORMAT_COLUMNS[fmt]}, but {source} has "
                           f"{dataset.column_names}: map yours with --dataset_columns (e.g. dialog:messages)."])

    def convert(batch, indices):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        examples = []
        for row, idx in zip(rows, indices):
            where = f"{source} row {idx + 1}"
            try:
                examples.append({**to_example(row, fmt, where, train_on_turns), "where": where} if tokenizer
                                else to_sft_row(row, fmt, where))
            except ValueError as e:
                raise ConfigError([str(e)]) from None
        done = encode_batch(examples, tokenizer) if tokenizer is not None else examples
        return {key: [d[key] for d in done] for key in done[0]}

    what = "Tokenizing and masking" if tokenizer is not None else "Formatting"
    converted = dataset.map(convert, with_indices=True, batched=True, batch_size=256,
                            remove_columns=dataset.column_names, num_proc=num_proc if num_proc and num_proc > 1 else None,
                            desc=f"{what} {fmt} rows of {Path(source).name}")
    return converted, fmt


# ---------------------------------------------------------------- one dataset or a mixture


@dataclass
class Source:
    """One dataset of a run: where, how many of its rows (count) or what share (weight, may up-sample)."""

    name: str
    rows: int | None = None
    weight: float | None = None

    @classmethod
    def parse(cls, spec: str) -> Source:
        """PATH_OR_ID, PATH:ROWS (an integer: that many rows) or PATH:WEIGHT (a float: that share of its rows,
        above 1 repeats rows)."""
        name, sep, amount = spec.rpartition(":") if ":" in spec and not spec.startswith(("http:", "https:")) \
            else (spec, "", "")
        if not sep or not amount.replace(".", "", 1).isdigit():
            return cls(spec)
        if amount.isdigit():
            return cls(name, rows=int(amount))
        return cls(name, weight=float(amount))


@dataclass
class Data:
    """What build_datasets gives main(): the tokenised splits, the format(s), rows per source, held-out chats."""

    train: object
    eval: object | None
    fmt: str
    rows_per_source: dict[str, int] = field(default_factory=dict)
    heldout_rows: list[dict] = field(default_factory=list)  # the first eval rows as prompt/completion (generation)


def sample(dataset, source: Source, seed: int):
    """The rows a mixture takes from one source, deterministic for the seed."""
    import random

    n = len(dataset)
    want = source.rows if source.rows is not None else round(n * source.weight) if source.weight is not None else n
    if want == n:
        return dataset
    rng = random.Random(f"{seed}:{source.name}")
    order = list(range(n))
    rng.shuffle(order)
    picked = (order * (want // n + 1))[:want]  # up-sampling repeats every row before any twice more
    return dataset.select(picked)


def build_datasets(args, seed: int, tokenizer=None, num_proc: int | None = None) -> Data:
    """The train and eval sets from ScriptArguments (--dataset_name, or --dataset_mixture), tokenised and masked."""
    from datasets import concatenate_datasets

    specs = args.dataset_mixture or [args.dataset_name]
    sources = [Source.parse(s) for s in specs]
    problems = [f"--dataset_mixture {s.name}: a row count must be >= 1 and a weight > 0" for s in sources
                if (s.rows is not None and s.rows < 1) or (s.weight is not None and s.weight <= 0)]
    if problems:
        raise ConfigError(problems)
    columns = parse_columns(getattr(args, "dataset_columns", None))
    turns = getattr(args, "train_on_turns", "all")
    trains, evals, fmts, counts, heldout = [], [], [], {}, []
    for source in sources:
        train, eval_ds = load_with_eval(args, source.name, explicit_eval=len(sources) == 1, seed=seed)
        train = map_columns(train, columns, source.name, strict=len(sources) == 1)
        eval_ds = map_columns(eval_ds, columns, source.name, strict=len(sources) == 1) if eval_ds is not None else None
        train = sample(train, source, seed)
        if args.max_train_samples:
            train = train.select(range(min(args.max_train_samples, len(train))))
        if eval_ds is not None and args.max_eval_samples:
            eval_ds = eval_ds.select(range(min(args.max_eval_samples, len(eval_ds))))
        fmt = args.dataset_format if len(sources) == 1 else "auto"
        train, fmt = prepare(train, fmt, source.name, tokenizer, turns, num_proc)
        trains.append(train)
        fmts.append(fmt)
        counts[source.name] = len(train)
        if eval_ds is not None:
            evals.append(prepare(eval_ds, fmt, f"{source.name} (eval)", tokenizer, turns, num_proc)[0])
            if not heldout:  # rows checked by prepare above
                heldout = [to_sft_row(eval_ds[i], fmt) for i in range(min(args.heldout_max_samples, len(eval_ds)))]
    train = trains[0] if len(trains) == 1 else concatenate_datasets(trains).shuffle(seed=seed)
    eval_ds = None if not evals else evals[0] if len(evals) == 1 else concatenate_datasets(evals)
    return Data(train, eval_ds, "+".join(dict.fromkeys(fmts)), counts, heldout)


def load_with_eval(args, name: str, explicit_eval: bool, seed: int):
    """One source's train split and its eval split: --eval_dataset_name (single dataset), its test split (hub), or
    eval_split_ratio of its train rows."""
    train = load_split(name, args.dataset_config, args.dataset_train_split)
    eval_ds = None
    eval_name = args.eval_dataset_name if explicit_eval else None
    if eval_name and eval_name.lower() != "none":
        eval_ds = load_split(eval_name, args.dataset_config, args.dataset_test_split)
    elif resolve_local(name) is None:
        try:
            eval_ds = load_split(name, args.dataset_config, args.dataset_test_split)
        except KeyError:
            eval_ds = None
    if eval_ds is None and args.eval_split_ratio > 0:
        parts = train.train_test_split(test_size=args.eval_split_ratio, seed=seed)
        train, eval_ds = parts["train"], parts["test"]
    return train, eval_ds


def check_truncation(prepared, ours, max_length: int | None, split: str) -> tuple[list[str], list[str]]:
    """After SFTTrainer has truncated a split (`prepared`) that this module tokenised (`ours`): (errors, warnings)
    about what max_length cost. Only rows longer than max_length count as truncated (one exactly max_length long
    loses nothing). TRL drops rows whose loss tokens all lie beyond max_length (their prompt fills it); when that is
    every row, nothing is left to train on.
    """
    if prepared is None or max_length is None:
        return [], []
    rows, kept = len(ours), len(prepared)
    if kept == 0:
        return [f"none of the {rows} {split} examples has a completion token within --max_length {max_length}: "
                "each prompt alone fills it (TRL drops such rows). Raise --max_length, shorten the prompts, or "
                "pass --truncation_mode keep_end to keep the ends of the sequences."], []
    warnings = []
    if kept < rows:
        warnings.append(f"{rows - kept} of {rows} {split} examples dropped: their prompt alone fills --max_length "
                        f"{max_length}, leaving no completion to learn from.")
    if "input_ids" in ours.column_names:
        import pyarrow.compute as pc

        # counted in Arrow: reading the column into Python lists would copy every token id of the dataset
        lengths = pc.list_value_length(ours.with_format("arrow")["input_ids"])
        cut = pc.sum(pc.greater(lengths, max_length)).as_py() or 0
        if cut:
            warnings.append(f"{cut} of {rows} {split} examples are longer than --max_length {max_length} and are "
                            "truncated (raise it if their endings matter).")
    return [], warnings
