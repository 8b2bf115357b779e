"""The two errors a run stops with; every module raises them, this one imports nothing of ours.

ConfigError (exit 2): bad input found before any weights load, every problem at once, each with its fix.
TrainingError (exit 3): training stopped for a reason the user can fix (nan loss, out of memory, full disk).
"""


class ConfigError(ValueError):
    """One or more problems with the user's configuration, each with its remedy."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) with the configuration:\n{lines}")


class TrainingError(RuntimeError):
    """Training stopped for a reason the user can fix; the message says how. Exit code 3."""
