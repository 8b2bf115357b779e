"""Make the default dataset: reverse a 3-6 letter word, chat format, train and held-out splits.

    uv run python data/make_data.py        # rewrites data/train.jsonl and data/test.jsonl

Deterministic (seeded); the held-out words never appear in train. A ~1M-parameter Llama learns
this to 100% held-out exact match in about a minute on 2 CPU cores.
"""

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from recipe.task import make_examples  # noqa: E402

SEED, N_TRAIN, N_TEST = 1234, 8000, 200


def main(out_dir: Path = Path(__file__).resolve().parent) -> None:
    rng = random.Random(SEED)
    test = make_examples(N_TEST, rng, exclude=set())
    test_words = {r["messages"][1]["content"][::-1] for r in test}
    train = make_examples(N_TRAIN, rng, exclude=test_words)
    for name, rows in (("train", train), ("test", test)):
        with open(out_dir / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"wrote {len(rows)} rows to {out_dir / name}.jsonl")


if __name__ == "__main__":
    main()
