"""Run reports (``rlctl report``): one PNG of the training curves of one or more runs, and a text summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from rlctl.errors import RlctlError
from rlctl.metrics import read_metrics

# (metric key, panel title); a panel is drawn when any run has the metric
PANELS = (
    ("reward", "reward"),
    ("accuracy", "accuracy (train samples)"),
    ("eval/accuracy", "held-out accuracy"),
    ("kl", "KL to reference"),
    ("entropy", "entropy"),
    ("completion_len", "response length (tokens)"),
    ("tokens_per_s", "tokens / s"),
    ("loss", "loss"),
)


def load_run(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step rows, evaluation rows) of a run directory."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise RlctlError(f"{run_dir}: not a run directory (no metrics.jsonl)")
    rows = read_metrics(path)
    return [r for r in rows if "eval" not in r], [r for r in rows if "eval" in r]


def summarize(run_dir: Path) -> dict[str, Any]:
    steps, evals = load_run(run_dir)
    out: dict[str, Any] = {"run": str(run_dir), "steps": len(steps)}
    if steps:
        last = steps[-1]
        for key in ("reward", "accuracy", "kl", "completion_len"):
            if key in last:
                out[f"final {key}"] = last[key]
        speeds = [r["tokens_per_s"] for r in steps if "tokens_per_s" in r]
        if speeds:
            out["mean tokens/s"] = sum(speeds) / len(speeds)
    for row in evals:
        out[f"eval {row['eval']} accuracy"] = row["eval/accuracy"]
    return out


def make_report(run_dirs: Sequence[str | Path], output: str | Path) -> list[dict[str, Any]]:
    """Plot every available metric of every run (one colour per run) to ``output``; return summaries."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RlctlError("rlctl report needs matplotlib: pip install 'rlctl[report]'") from exc

    runs = [(Path(d), *load_run(Path(d))) for d in run_dirs]
    panels = [(key, title) for key, title in PANELS
              if any(key in r for _, steps, evals in runs for r in (evals if key.startswith("eval/") else steps))]
    if not panels:
        raise RlctlError("no metrics to plot")
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for run_dir, steps, evals in runs:
            source = evals if key.startswith("eval/") else steps
            points = [(r["step"], r[key]) for r in source if key in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if key.startswith("eval/") else None, markersize=3,
                        label=run_dir.name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize="small")
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return [summarize(run_dir) for run_dir, _, _ in runs]
