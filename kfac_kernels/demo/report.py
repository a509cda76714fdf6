"""The demo's outputs: the table (plain text and markdown), results JSON and the loss-curve PNG."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Sequence

from .train import Run, Task

COLORS = {"kfac": "#d62728", "adam": "#1f77b4", "sgd": "#2ca02c", "soap": "#9467bd",
          "shampoo": "#ff7f0e", "muon": "#8c564b"}


def _fmt_loss(v: float) -> str:
    if not math.isfinite(v):
        return "nan"
    if abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.4f}" if abs(v) < 1 else f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"


def _fmt_metric(task: Task, v: float) -> str:
    if not math.isfinite(v):
        return "nan"
    return f"{100 * v:.1f}%" if task.metric_higher_is_better else f"{v:.3f}"


def _reach(run: Run, thr: float) -> str:
    hit = run.reach(thr)
    if hit is None:
        return "diverged" if run.diverged_at is not None else "not reached"
    return f"{hit[0]} ({hit[1]:.2f}s)"


def table_rows(task: Task, runs: Sequence[Run]) -> List[List[str]]:
    header = (["optimiser", "ms/step"] + [f"loss<={t:g}: steps (s)" for t in task.thresholds]
              + ["final train", "final test", task.metric_name])
    rows = [header]
    for r in runs:
        f = r.final
        rows.append([r.label, f"{r.ms_per_step():.1f}"] + [_reach(r, t) for t in task.thresholds]
                    + [_fmt_loss(f["train_loss"]), _fmt_loss(f["test_loss"]),
                       _fmt_metric(task, f["test_metric"])])
    return rows


def _caption(task: Task, runs: Sequence[Run], batch_desc: str) -> str:
    steps = max(r.steps[-1] for r in runs) if runs else 0
    return f"{task.title}; {batch_desc}; {steps} steps; train loss = {task.loss_name}"


def text_table(task: Task, runs: Sequence[Run], batch_desc: str) -> str:
    rows = table_rows(task, runs)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [_caption(task, runs, batch_desc)]
    for k, r in enumerate(rows):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("settings: " + "; ".join(f"{r.label}: {r.settings}" for r in runs))
    return "\n".join(lines)


def markdown_table(task: Task, runs: Sequence[Run], batch_desc: str) -> str:
    rows = table_rows(task, runs)
    lines = [f"**{_caption(task, runs, batch_desc)}**", ""]
    lines.append("| " + " | ".join(rows[0]) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|")
    for r in rows[1:]:
        lines.append("| " + " | ".join(r) + " |")
    lines.append("")
    lines += [f"- {r.label}: {r.settings}" for r in runs]
    return "\n".join(lines)


def write_json(path: str, meta: dict, runs: Sequence[Run]) -> None:
    with open(path, "w") as fh:
        json.dump({"meta": meta, "runs": [r.to_json() for r in runs]}, fh, indent=1,
                  default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else v)


def plot(path: str, tasks: Sequence[Task], runs_by_task: Dict[str, Sequence[Run]],
         subtitle: str) -> None:
    """Train loss against steps (left, with the test loss dashed) and against training seconds
    (right), one row per model; dotted lines mark the table's thresholds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogLocator, ScalarFormatter

    def finite(vs):
        return [v if v is not None and math.isfinite(v) else float("nan") for v in vs]

    n = len(tasks)
    fig, axes = plt.subplots(n, 2, figsize=(10, 3.4 * n + 0.5), squeeze=False)
    for row, task in enumerate(tasks):
        runs = runs_by_task[task.name]
        lo = min((v for r in runs for v in r.train_loss if math.isfinite(v)), default=1.0)
        hi = max((v for r in runs for v in r.train_loss if math.isfinite(v)), default=10.0)
        for col, xkey in enumerate(("steps", "seconds")):
            ax = axes[row][col]
            for r in runs:
                ax.plot(getattr(r, xkey), finite(r.train_loss), color=COLORS.get(r.optimizer),
                        label=f"{r.label} (train)" if col == 0 else r.label, lw=1.6)
                if col == 0:
                    ax.plot(r.steps, finite(r.test_loss), color=COLORS.get(r.optimizer),
                            lw=1.0, ls="--", alpha=0.8)
            for t in task.thresholds:
                ax.axhline(t, color="0.5", lw=0.7, ls=":")
            ax.set_yscale("log")
            if hi / max(lo, 1e-30) < 20:      # less than ~a decade: plain tick labels
                ax.yaxis.set_major_locator(
                    LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0), numticks=30))
                ax.yaxis.set_major_formatter(ScalarFormatter())
                ax.yaxis.set_minor_formatter(plt.NullFormatter())
            ax.set_xlabel("optimiser steps" if xkey == "steps" else "training time (s)")
            ax.set_ylabel(task.loss_name, fontsize=9)
            what = "train (solid) and test (dashed) loss vs steps" if col == 0 else \
                "train loss vs training time"
            ax.set_title(f"{task.name}: {what}", fontsize=10)
            ax.grid(True, which="both", alpha=0.25)
            # the line styles, explained once per panel (grey keys beside the optimisers)
            handles, labels = ax.get_legend_handles_labels()
            if col == 0:
                handles.append(Line2D([], [], color="0.3", lw=1.0, ls="--"))
                labels.append("test loss (dashed)")
            if task.thresholds:
                handles.append(Line2D([], [], color="0.5", lw=0.7, ls=":"))
                labels.append("loss thresholds of the table (dotted)")
            ax.legend(handles, labels, fontsize=8, frameon=False)
    fig.suptitle(subtitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def ensure_dir(path: str) -> None:
    os.makedirs(path, exist_ok=True)
