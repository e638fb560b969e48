"""Metrics: ``metrics.jsonl`` in the run directory, a live progress view, and the final summary."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

# metrics shown live, in this order, with their short labels
LIVE_FIELDS = (("reward", "reward"), ("accuracy", "acc"), ("kl", "kl"), ("loss", "loss"),
               ("tokens_per_s", "tok/s"))
# metrics that depend on wall-clock time (excluded when comparing runs for determinism)
TIMING_FIELDS = frozenset({"tokens_per_s", "step_time", "sample_time", "update_time", "time", "samples_per_s",
                           "learner_tokens_per_s", "rollout_wait_time", "learner_idle_frac", "worker_idle_frac"})


# tracker name -> the package it needs (logged through accelerate's tracker API)
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


def check_trackers(names: list[str]) -> None:
    import importlib.util

    from rlctl.errors import RlctlError

    missing = [n for n in names if importlib.util.find_spec(TRACKERS[n]) is None]
    if missing:
        raise RlctlError(f"[train] trackers: {', '.join(missing)} not installed; pip install "
                         + " ".join(TRACKERS[n] for n in missing))


def tracker_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics, as trackers want them."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def format_value(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
            return f"{value:.2e}"
        return f"{value:.3f}"
    return str(value)


class MetricsLog:
    """Appends one JSON object per step (and per evaluation) to ``metrics.jsonl``."""

    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        self._fh.write(json.dumps(dict(record), allow_nan=True) + "\n")
        self._fh.flush()  # a killed run keeps every completed step

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


class LiveView:
    """A progress bar with the latest metrics on a terminal; periodic plain lines otherwise."""

    def __init__(self, total_steps: int, console: Console | None = None, enabled: bool = True,
                 messages: bool = True):
        self.console = console or Console(stderr=True)
        self.total = total_steps
        self.enabled = enabled  # progress (bar or periodic lines)
        self.messages = messages  # evaluations, warnings, resume notes: shown even without progress
        self.interactive = enabled and self.console.is_terminal
        self.every = max(1, total_steps // 20)
        self.started = time.perf_counter()
        self._progress: Progress | None = None
        if self.interactive:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[metrics]}"), TimeRemainingColumn(), console=self.console,
            )
            self._task = self._progress.add_task("train", total=total_steps, metrics="")
            self._progress.start()

    def update(self, step: int, stage: str, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        shown = "  ".join(f"{label} {format_value(metrics[key])}" for key, label in LIVE_FIELDS if key in metrics)
        if self._progress is not None:
            self._progress.update(self._task, completed=step + 1, description=stage, metrics=shown)
        elif (step + 1) % self.every == 0 or step + 1 == self.total:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / (step + 1) * (self.total - step - 1)
            self.console.print(escape(f"step {step + 1}/{self.total} [{stage}]  {shown}  eta {eta:.0f}s"),
                               highlight=False, soft_wrap=True)

    def message(self, text: str) -> None:
        if self.messages:
            self.console.print(escape(text), highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def summary_table(title: str, rows: Mapping[str, Any]) -> Table:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in rows.items():
        table.add_row(key, format_value(value))
    return table
