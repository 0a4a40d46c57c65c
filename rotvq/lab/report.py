"""Tables and figures of a study's record, for the book's pages.

The chapters show results read from a record (:mod:`rotvq.lab.study`); this module holds
the plumbing that turns rows into what a reader sees, so that a chapter's visible code is
the question it asks, not the formatting:

* :func:`markdown_table` -- a pipe table (the book renders cell outputs of type
  ``text/markdown`` as MyST, tables included);
* :func:`seed_summary` -- ``"mean [min, max]"`` over seeds, the form every table uses;
* :func:`curves` -- training curves of selected configurations from the record's block
  means: one line per configuration (the mean over its seeds) and a band spanning the seeds.

matplotlib is imported only by :func:`curves`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .compare import fmt
from .study import Record

__all__ = ["markdown_table", "seed_summary", "curves", "comparison_table", "config_label", "label", "LABELS"]

#: How the chapters name fields and values.
LABELS = {
    "estimator": {"ste": "STE", "rotation": "rotation trick", "rotation_unscaled": "unscaled",
                  "rotation_clipped": "clipped", "rotation_interp": "interpolated",
                  "rotation_tangent": "tangent"},
    "init_name": {"small": "small codes", "kmeans": "k-means codes",
                  "layer": "layer defaults", "small_reset": "small codes + resets"},
}


def label(field: str, value: Any) -> str:
    """The chapters' name for a field's value (``"rotation"`` -> ``"rotation trick"``)."""
    if field == "gamma":
        return {0.25: "1/4"}.get(value, f"{value:g}")
    return LABELS.get(field, {}).get(value, str(value))


MODELS = {"digits": "digits MLP", "patches": "patches conv"}


def config_label(config: Mapping[str, Any]) -> str:
    """A configuration named in words: ``"patches conv, d = 32, k-means codes, γ = 1/4"``."""
    parts = []
    if "dataset" in config:
        parts.append(MODELS.get(config["dataset"], config["dataset"]))
    if "latent_dim" in config:
        parts.append(f"d = {config['latent_dim']}")
    if "init_name" in config:
        parts.append(label("init_name", config["init_name"]))
    if "gamma" in config:
        parts.append(f"γ = {label('gamma', config['gamma'])}")
    for key, value in config.items():
        if key not in ("dataset", "latent_dim", "init_name", "gamma"):
            parts.append(f"{key} = {value}")
    return ", ".join(parts)


def comparison_table(comparison, a_name: str, b_name: str) -> str:
    """A pipe table of a :class:`rotvq.lab.compare.Comparison`: one row per configuration
    with both arms' seed means, the paired relative difference over seeds and which arm is
    better on every seed (``—`` where neither is)."""
    fields = comparison.over
    headers = {"dataset": "model", "latent_dim": "d", "init_name": "codes", "gamma": "γ"}
    columns = {f: headers.get(f, f) for f in fields}
    columns.update(a=a_name, b=b_name, diff=f"{a_name} vs {b_name}, per seed", better="better on every seed")
    rows = []
    for row, cell in zip(comparison.rows(), comparison.cells):
        out = {f: label(f, cell.config[f]) if f != "dataset" else MODELS.get(cell.config[f], cell.config[f])
               for f in fields}
        out.update(a=row["a"], b=row["b"], diff=row["diff"],
                   better={"a": a_name, "b": b_name, "tie": "—"}[cell.better])
        rows.append(out)
    return markdown_table(rows, columns)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Mapping[str, str]) -> str:
    """A pipe table of ``rows`` with the given ``{key: header}`` columns, in that order.
    Numbers are written with :func:`rotvq.lab.compare.fmt`; ``|`` in a cell is escaped."""
    if not rows:
        raise ValueError("a table needs at least one row")

    def cell(value: Any) -> str:
        if isinstance(value, (float, np.floating)):
            value = fmt(float(value))
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row[key]) for key in columns) + " |")
    return "\n".join(lines)


def seed_summary(values: np.ndarray, percent: bool = False) -> str:
    """``"mean [min, max]"`` over seeds (as percentages with ``percent``)."""
    values = np.asarray(values, dtype=float)
    if percent:
        return f"{values.mean():.0%} [{values.min():.0%}, {values.max():.0%}]"
    return f"{fmt(values.mean())} [{fmt(values.min())}, {fmt(values.max())}]"


def curves(record: Record, groups: Sequence[Mapping[str, Any]], metrics: Sequence[tuple[str, str]],
           *, labels: Sequence[str] | None = None, log: Sequence[str] = ("recon_loss", "codebook_loss"),
           width: float = 7.2, height: float = 2.3, title: str | None = None):
    """Training curves of ``groups`` (each a selection of the record, e.g. one estimator at
    one configuration, its seeds averaged) for ``metrics`` (``(name, axis title)``, one panel
    each, at most three per row).  Returns the matplotlib figure."""
    from matplotlib import pyplot as plt  # lazy: matplotlib is not a dependency of rotvq

    columns = min(3, len(metrics))
    rows = -(-len(metrics) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width, height * rows), squeeze=False,
                             layout="constrained")
    for index, where in enumerate(groups):
        selected = sorted(record.select(**where).rows, key=lambda r: r["config"]["seed"])
        if not selected:
            raise KeyError(f"no runs with {where}")
        block = selected[0]["curves"]["block"]
        name = labels[index] if labels else ", ".join(f"{k}={v}" for k, v in where.items())
        for ax, (metric, axis_title) in zip(axes.flat, metrics):
            values = np.array([r["curves"][metric] for r in selected])
            steps = (np.arange(values.shape[1]) + 0.5) * block
            ax.plot(steps, values.mean(0), color=f"C{index}", label=name, lw=1.4)
            if len(selected) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), color=f"C{index}", alpha=0.2,
                                lw=0)
            ax.set_title(axis_title, fontsize=10)
            if metric in log:
                ax.set_yscale("log")
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=9)
    for ax in axes.flat:
        ax.tick_params(labelsize=8)
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
