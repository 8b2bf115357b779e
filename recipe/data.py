"""Datasets: load local files or hub datasets, detect the row format, convert rows for SFTTrainer.

Every format becomes one of TRL's two shapes:
- prompt/completion (conversational lists of messages, or plain strings): loss on the completion only;
- text: plain language modelling, loss on every token;
- tokens: already tokenised rows (`input_ids`, a list of token ids), loss on every token.
Chat `messages` rows train the last assistant turn; the turns before it are the prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

from recipe import REPO_ROOT
from recipe.errors import ConfigError

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
FORMAT_COLUMNS = {  # detection order: the first format whose columns are all present wins
    "tokens": ("input_ids",),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
ROLES = {"system", "user", "assistant", "tool"}


def resolve_local(name: str) -> Path | None:
    """A local path as given (relative to the working directory) or relative to the repo; else None."""
    for candidate in (Path(name), REPO_ROOT / name):
        if candidate.exists():
            return candidate
    return None


def looks_local(name: str) -> bool:
    return Path(name).suffix in LOCAL_BUILDERS or name.startswith((".", "/", "~")) or name.count("/") > 1


def check_json_file(path: Path) -> None:
    """Parse a .json/.jsonl file fully; a bad row is reported with its line number."""
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ConfigError([f"{path} is empty: it has no rows. Point --dataset_name at a file with data."])
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError([f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}."]) from None
        if not all(isinstance(r, dict) for r in rows):
            raise ConfigError([f"{path}: every element of the top-level list must be a JSON object."])
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
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
                       f"Expected one of: {expected}. Rename the columns or pass --dataset_format."])


def _messages(value, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects.")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: message {i} needs 'role' and 'content'.")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: message {i} has role {m['role']!r}; use one of {sorted(ROLES)}.")
        out.append({"role": m["role"], "content": str(m["content"])})
    return out


def to_sft_row(row: dict, fmt: str, where: str = "row") -> dict:
    """One dataset row in TRL's prompt/completion or text shape. Raises ValueError naming the row."""
    if fmt == "messages":
        messages = _messages(row.get("messages"), where)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            raise ValueError(f"{where}: a chat needs a user turn followed by an assistant turn to train on.")
        return {"prompt": messages[:last], "completion": [messages[last]]}
    if fmt == "alpaca":
        instruction, output = row.get("instruction"), row.get("output")
        if not instruction or output is None:
            raise ValueError(f"{where}: alpaca rows need a non-empty 'instruction' and an 'output'.")
        extra = row.get("input") or ""
        user = f"{instruction}\n\n{extra}" if extra else str(instruction)
        return {"prompt": [{"role": "user", "content": user}],
                "completion": [{"role": "assistant", "content": str(output)}]}
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if prompt is None or completion is None:
            raise ValueError(f"{where}: 'prompt' and 'completion' must both be set.")
        if isinstance(prompt, list):
            return {"prompt": _messages(prompt, where), "completion": _messages(completion, where)}
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


def prepare(dataset, fmt: str, source: str):
    """Convert every row; the first bad row stops with its index."""
    if len(dataset) == 0:
        raise ConfigError([f"{source} has no rows. Point --dataset_name at a file with data."])
    if fmt == "auto":
        fmt = detect_format(dataset.column_names)
    elif not all(c in dataset.column_names for c in FORMAT_COLUMNS[fmt]):
        raise ConfigError([f"--dataset_format {fmt} needs columns {FORMAT_COLUMNS[fmt]}, but {source} has "
                           f"{dataset.column_names}."])

    def convert(row, idx):
        try:
            return to_sft_row(row, fmt, where=f"{source} row {idx + 1}")
        except ValueError as e:
            raise ConfigError([str(e)]) from None

    converted = dataset.map(convert, with_indices=True, remove_columns=dataset.column_names,
                            desc=f"Formatting {fmt} rows")
    return converted, fmt


def build_datasets(args, seed: int):
    """(train, eval or None, format) from ScriptArguments."""
    train = load_split(args.dataset_name, args.dataset_config, args.dataset_train_split)
    eval_ds = None
    eval_name = args.eval_dataset_name
    if eval_name and eval_name.lower() != "none":
        eval_ds = load_split(eval_name, args.dataset_config, args.dataset_test_split)
    elif resolve_local(args.dataset_name) is None:
        try:
            eval_ds = load_split(args.dataset_name, args.dataset_config, args.dataset_test_split)
        except KeyError:
            eval_ds = None
    if eval_ds is None and args.eval_split_ratio > 0:
        parts = train.train_test_split(test_size=args.eval_split_ratio, seed=seed)
        train, eval_ds = parts["train"], parts["test"]
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if eval_ds is not None and args.max_eval_samples:
        eval_ds = eval_ds.select(range(min(args.max_eval_samples, len(eval_ds))))
    train, fmt = prepare(train, args.dataset_format, args.dataset_name)
    if eval_ds is not None:
        eval_ds, _ = prepare(eval_ds, fmt, eval_name or f"{args.dataset_name} (eval split)")
    return train, eval_ds, fmt


def check_truncation(prepared, rows: int, max_length: int | None, split: str) -> tuple[list[str], list[str]]:
    """After SFTTrainer has tokenised and truncated a split: (errors, warnings) about what max_length cost.

    TRL drops rows whose completion lies wholly beyond max_length (their prompt fills it); when that is
    every row, nothing is left to train on.
    """
    if prepared is None or max_length is None:
        return [], []
    kept = len(prepared)
    if kept == 0:
        return [f"none of the {rows} {split} examples has a completion token within --max_length {max_length}: "
                "each prompt alone fills it (TRL drops such rows). Raise --max_length, shorten the prompts, or "
                "pass --truncation_mode keep_end to keep the ends of the sequences."], []
    warnings = []
    if kept < rows:
        warnings.append(f"{rows - kept} of {rows} {split} examples dropped: their prompt alone fills --max_length "
                        f"{max_length}, leaving no completion to learn from.")
    if "input_ids" in prepared.column_names:
        import pyarrow.compute as pc

        # counted in Arrow: reading the column into Python lists would copy every token id of the dataset
        lengths = pc.list_value_length(prepared.with_format("arrow")["input_ids"])
        cut = pc.sum(pc.greater_equal(lengths, max_length)).as_py() or 0
        if cut:
            warnings.append(f"{cut} of {kept} {split} examples reach --max_length {max_length} and are truncated "
                            "(raise it if their endings matter).")
    return [], warnings
