"""What train_ds.py and scripts/ share: arguments, data, model loading, hardware, metrics, reports."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
