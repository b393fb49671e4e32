"""The loss and eval curves of a run as one PNG, drawn from its metrics records (see `train.metrics`).

Top panel: training loss per step and held-out loss per eval step. Bottom panel, only when some eval
record has `exact_match` (a fraction in [0, 1]): held-out exact match in percent. Missing, None and NaN
values leave gaps; a record-less run still gets a (labelled, empty) figure.

Drawn with matplotlib's object API and Agg canvas, so no pyplot state or global backend is touched.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_curves(records: list[dict], path) -> Path:
    """Write the curves of `records` to `path` (PNG, replaced atomically) and return the path."""
    path = Path(path)
    train = _series(records, "train", "loss")
    eval_loss = _series(records, "eval", "loss")
    exact = _series(records, "eval", "exact_match")
    with_exact = any(math.isfinite(v) for _, v in exact)

    figure = Figure(figsize=(7, 6.5 if with_exact else 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes = figure.add_subplot(2 if with_exact else 1, 1, 1)
    _draw(loss_axes, train, "training loss", "-", "tab:blue")
    _draw(loss_axes, eval_loss, "held-out loss", "o-", "tab:orange")
    loss_axes.set_ylabel("loss")
    loss_axes.set_xlabel("step")
    loss_axes.grid(alpha=0.3)
    if train or eval_loss:
        loss_axes.legend()
    else:
        loss_axes.text(0.5, 0.5, "no records", ha="center", va="center", transform=loss_axes.transAxes)
    if with_exact:
        exact_axes = figure.add_subplot(2, 1, 2, sharex=loss_axes)
        _draw(exact_axes, [(s, 100 * v) for s, v in exact], "held-out exact match", "o-", "tab:green")
        exact_axes.set_ylabel("exact match (%)")
        exact_axes.set_xlabel("step")
        exact_axes.set_ylim(-2, 102)
        exact_axes.grid(alpha=0.3)

    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    figure.savefig(temp, format="png")
    os.replace(temp, path)
    return path


def _series(records: list[dict], kind: str, key: str) -> list[tuple[float, float]]:
    """(step, value) for the records of `kind` that have a numeric `key`; None becomes NaN (a gap)."""
    out = []
    for record in records:
        if record.get("kind") != kind or key not in record or not isinstance(record.get("step"), (int, float)):
            continue
        value = record[key]
        if value is None or isinstance(value, (int, float)):
            out.append((record["step"], math.nan if value is None else float(value)))
    return sorted(out)


def _draw(axes, points: list[tuple[float, float]], label: str, style: str, color: str) -> None:
    if points:
        steps, values = zip(*points)
        axes.plot(steps, values, style, label=label, color=color, markersize=4)
