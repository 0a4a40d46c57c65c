"""Verdicts computed from a record: paired comparisons of two arms over configurations.

The scaling chapter states its empirical findings as predicates over the study's record
(:mod:`rotvq.lab.study`), never as a mean alone.  The unit is a *configuration*: every
setting of the fields named in ``over`` (say the dataset, ``d``, the initialisation and
``gamma``).  In each configuration the two arms (say the rotation trick and the STE) were
trained from the same seeds, and a seed fixes the model's initialisation and the order of
the batches, so the arms are compared *seed by seed*: the paired differences
``metric(A, seed) - metric(B, seed)``.  A configuration is decided for an arm only when
that arm is better on every seed; otherwise it is unresolved.  A sentence about "every
configuration" is then ``counts()["a"] == n``, and one about "most" names ``k`` of ``n``.

>>> from rotvq.lab.compare import compare            # doctest: +SKIP
>>> c = compare(record, "recon_loss", a={"estimator": "rotation"}, b={"estimator": "ste"},
...             over=("latent_dim", "init_name", "gamma"))  # doctest: +SKIP
>>> c.counts()                                       # doctest: +SKIP
{'a': 7, 'b': 3, 'tie': 2, 'n': 12}
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .study import Record

__all__ = ["Cell", "Comparison", "compare", "best_value", "fmt"]

Arm = Mapping[str, Any] | Callable[[Mapping[str, Any]], Mapping[str, Any]]


@dataclasses.dataclass
class Cell:
    """One configuration of a comparison.

    Attributes:
        config: the values of the ``over`` fields.
        seeds: the seeds both arms were trained from, in order.
        a, b: the metric per seed for each arm.
        better: ``"a"`` if ``a`` is better than ``b`` on every seed, ``"b"`` for the
            reverse, ``"tie"`` otherwise (the direction set by ``lower_is_better``).
    """

    config: dict[str, Any]
    seeds: list[int]
    a: np.ndarray
    b: np.ndarray
    better: str

    @property
    def diff(self) -> np.ndarray:
        """Paired differences ``a - b``, one per seed."""
        return self.a - self.b

    @property
    def relative(self) -> np.ndarray:
        """Paired differences relative to ``b``: ``(a - b) / b``."""
        return (self.a - self.b) / self.b


@dataclasses.dataclass
class Comparison:
    """The cells of a comparison of arm ``a`` with arm ``b`` on ``metric``."""

    metric: str
    step: int | None
    over: tuple[str, ...]
    cells: list[Cell]

    def counts(self) -> dict[str, int]:
        """How many configurations each arm wins on every seed, and how many are unresolved."""
        out = {"a": 0, "b": 0, "tie": 0}
        for cell in self.cells:
            out[cell.better] += 1
        return {**out, "n": len(self.cells)}

    def summary(self, a_name: str, b_name: str) -> str:
        """The counts in words: "the rotation trick is better on every seed in 3 of 25
        configurations, the STE in 19, and neither in 3"."""
        c = self.counts()
        return (f"{a_name} is better on every seed in {c['a']} of {c['n']} configurations, "
                f"{b_name} in {c['b']}, and neither in {c['tie']}")

    def where(self, better: str) -> list[dict[str, Any]]:
        """The configurations decided as ``better`` (``"a"``, ``"b"`` or ``"tie"``)."""
        if better not in ("a", "b", "tie"):
            raise ValueError(f"better must be 'a', 'b' or 'tie', got {better!r}")
        return [c.config for c in self.cells if c.better == better]

    def all(self, better: str) -> bool:
        """Whether every configuration is decided as ``better``."""
        return bool(self.cells) and len(self.where(better)) == len(self.cells)

    def select(self, **where: Any) -> "Comparison":
        """The cells whose configuration has the given values."""
        cells = [c for c in self.cells if all(c.config[k] == v for k, v in where.items())]
        return Comparison(self.metric, self.step, self.over, cells)

    def spread(self) -> tuple[float, float]:
        """The smallest and largest paired relative difference over every seed and cell."""
        values = np.concatenate([c.relative for c in self.cells])
        return float(values.min()), float(values.max())

    def rows(self, labels: Mapping[str, Callable[[Any], str]] | None = None) -> list[dict[str, str]]:
        """One dict per cell for a table: the configuration, both means, the paired relative
        difference ``[min, max]`` over seeds, and which arm is better on every seed."""
        labels = labels or {}
        out = []
        for cell in self.cells:
            row = {k: labels.get(k, str)(v) for k, v in cell.config.items()}
            lo, hi = cell.relative.min(), cell.relative.max()
            row.update(a=fmt(cell.a.mean()), b=fmt(cell.b.mean()),
                       diff=f"{lo:+.0%} … {hi:+.0%}" if lo != hi else f"{lo:+.0%}",
                       better=cell.better)
            out.append(row)
        return out


def fmt(value: float, digits: int = 3) -> str:
    """A number to ``digits`` significant digits, plainly (no exponent for 1e-4 .. 1e5)."""
    if value == 0 or not np.isfinite(value):
        return str(value)
    magnitude = int(np.floor(np.log10(abs(value))))
    if -4 <= magnitude < 5:
        decimals = max(digits - 1 - magnitude, 0)
        return f"{value:.{decimals}f}"
    return f"{value:.{digits - 1}e}"


def _arm(arm: Arm, config: Mapping[str, Any]) -> dict[str, Any]:
    return dict(arm(config) if callable(arm) else arm)


def compare(record: Record, metric: str, *, a: Arm, b: Arm, over: Sequence[str],
            step: int | None = None, where: Mapping[str, Any] | None = None,
            lower_is_better: bool = True) -> Comparison:
    """Compare arm ``a`` with arm ``b`` on ``metric``, seed by seed, in every configuration.

    Args:
        record: the study's record.
        metric: a test metric (``recon_loss``, ``usage``, ...).
        a, b: each arm's field values (e.g. ``{"estimator": "rotation"}``), or a function
            of the configuration returning them (e.g. each estimator at its own best gamma).
        over: the fields whose combinations are the configurations (``dataset``,
            ``init_name`` or TrainConfig fields); they take the values present in the
            record's rows selected by ``where`` and arm ``a``.
        step: the evaluation step (default: each run's last).
        where: a restriction applied to both arms.
        lower_is_better: ``True`` for losses, ``False`` for usage or perplexity.

    Raises:
        KeyError: a configuration has no runs for one of the arms.
        ValueError: the arms were not trained from the same seeds in a configuration.
    """
    where = dict(where or {})
    over = tuple(over)
    if not over:
        raise ValueError("over must name at least one field")
    if callable(a):
        base = record.select(**where)
    else:
        base = record.select(**where, **_arm(a, {}))
    axes = [base.distinct(name) for name in over]
    cells = []
    for values in itertools.product(*axes):
        config = dict(zip(over, values))
        if not len(base.select(**config)):
            continue  # a combination the grid does not have
        arms = []
        for arm in (a, b):
            selection = {**where, **config, **_arm(arm, config)}
            rows = sorted(record.select(**selection).rows, key=lambda r: r["config"]["seed"])
            if not rows:
                raise KeyError(f"no runs with {selection}")
            arms.append(rows)
        seeds = [r["config"]["seed"] for r in arms[0]]
        if seeds != [r["config"]["seed"] for r in arms[1]] or len(set(seeds)) != len(seeds):
            raise ValueError(f"{config}: the arms have seeds {seeds} and "
                             f"{[r['config']['seed'] for r in arms[1]]}; a paired comparison "
                             "needs the same seeds, once each")
        va, vb = (Record(rows).values(metric, step) for rows in arms)
        diff = va - vb if lower_is_better else vb - va  # < 0: a better
        better = "a" if (diff < 0).all() else "b" if (diff > 0).all() else "tie"
        cells.append(Cell(config, seeds, va, vb, better))
    if not cells:
        raise KeyError(f"no configurations of {over} with {where}")
    return Comparison(metric, step, over, cells)


def best_value(record: Record, metric: str, field: str, *, step: int | None = None,
               lower_is_better: bool = True, **where: Any) -> Any:
    """The value of ``field`` (e.g. ``gamma``) whose seed-mean ``metric`` is best among the
    rows selected by ``where`` (on a tie, the value that comes first in the record)."""
    rows = record.select(**where)
    if not len(rows):
        raise KeyError(f"no rows with {where}")
    means = {v: np.nanmean(rows.values(metric, step, **{field: v})) for v in rows.distinct(field)}
    pick = min if lower_is_better else max
    return pick(means, key=means.get)
