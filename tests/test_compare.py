"""Tests for rotvq.lab.compare: paired comparisons over configurations of a record."""
from __future__ import annotations

import numpy as np
import pytest

from rotvq.lab.compare import best_value, compare, fmt
from rotvq.lab.study import Record, init_fields
from rotvq.lab.training import TrainConfig


def row(estimator, gamma, seed, recon, d=8, init="small", usage=0.5, steps=10):
    config = TrainConfig(estimator=estimator, gamma=gamma, seed=seed, latent_dim=d, steps=steps,
                         **init_fields(init, 64))
    test = {"recon_loss": recon, "usage": usage}
    return {"key": f"{estimator}{gamma}{seed}{d}{init}", "dataset": "digits", "evals": [5, steps],
            "config": config.to_dict(), "test": {"5": test, str(steps): test}, "error": None}


def record():
    rows = []
    for seed in range(3):
        # gamma 0.25: rotation better on every seed; gamma 1: worse on every seed; gamma 4: mixed
        rows += [row("ste", 0.25, seed, 1.0 + seed), row("rotation", 0.25, seed, 0.9 + seed),
                 row("ste", 1.0, seed, 1.0), row("rotation", 1.0, seed, 1.2),
                 row("ste", 4.0, seed, 1.0), row("rotation", 4.0, seed, [0.9, 1.1, 1.0][seed])]
    return Record(rows)


def test_paired_verdicts_per_configuration():
    c = compare(record(), "recon_loss", a={"estimator": "rotation"}, b={"estimator": "ste"},
                over=("gamma",))
    assert [cell.config["gamma"] for cell in c.cells] == [0.25, 1.0, 4.0]
    assert [cell.better for cell in c.cells] == ["a", "b", "tie"]
    assert c.counts() == {"a": 1, "b": 1, "tie": 1, "n": 3}
    assert c.where("b") == [{"gamma": 1.0}] and not c.all("a")
    np.testing.assert_allclose(c.cells[0].diff, [-0.1, -0.1, -0.1])
    assert c.select(gamma=1.0).all("b")
    lo, hi = c.spread()
    assert lo == pytest.approx(-0.1) and hi == pytest.approx(0.2)
    rows = c.rows()
    assert rows[1]["better"] == "b" and rows[1]["diff"] == "+20%" and rows[0]["a"] == "1.90"


def test_pairing_is_by_seed_not_by_mean():
    # means favour rotation at gamma 0.25 even when one seed is worse: that is a tie
    rows = [row("ste", 0.25, s, v) for s, v in enumerate([1.0, 1.0, 1.0])]
    rows += [row("rotation", 0.25, s, v) for s, v in enumerate([0.5, 0.5, 1.01])]
    c = compare(Record(rows), "recon_loss", a={"estimator": "rotation"}, b={"estimator": "ste"},
                over=("gamma",))
    assert c.cells[0].a.mean() < c.cells[0].b.mean() and c.cells[0].better == "tie"


def test_higher_is_better_metrics():
    rows = [row("ste", 0.25, s, 1.0, usage=0.5) for s in range(2)]
    rows += [row("rotation", 0.25, s, 1.0, usage=0.9) for s in range(2)]
    c = compare(Record(rows), "usage", a={"estimator": "rotation"}, b={"estimator": "ste"},
                over=("gamma",), lower_is_better=False)
    assert c.all("a")


def test_arms_as_functions_of_the_configuration():
    rec = record()
    best = {e: best_value(rec, "recon_loss", "gamma", estimator=e) for e in ("ste", "rotation")}
    # ste: gamma 1 and 4 tie on the mean (1.0); the first in the record wins
    assert best == {"ste": 1.0, "rotation": 4.0}
    c = compare(rec, "recon_loss", a=lambda cfg: {"estimator": "rotation", "gamma": best["rotation"]},
                b=lambda cfg: {"estimator": "ste", "gamma": best["ste"]}, over=("latent_dim",))
    assert c.counts() == {"a": 0, "b": 0, "tie": 1, "n": 1}  # 0.9, 1.1, 1.0 against 1.0 each


def test_unpaired_or_missing_arms_raise():
    rows = [row("ste", 0.25, s, 1.0) for s in (0, 1)] + [row("rotation", 0.25, s, 1.0) for s in (0, 2)]
    with pytest.raises(ValueError, match="same seeds"):
        compare(Record(rows), "recon_loss", a={"estimator": "rotation"}, b={"estimator": "ste"},
                over=("gamma",))
    with pytest.raises(KeyError, match="no runs"):
        compare(record(), "recon_loss", a={"estimator": "rotation"}, b={"estimator": "rotation_tangent"},
                over=("gamma",))
    with pytest.raises(ValueError, match="over"):
        compare(record(), "recon_loss", a={"estimator": "rotation"}, b={"estimator": "ste"}, over=())


def test_intermediate_step():
    rows = [row("ste", 0.25, s, 1.0) for s in range(2)] + [row("rotation", 0.25, s, 0.5) for s in range(2)]
    rows[2]["test"]["5"] = {"recon_loss": 2.0, "usage": 0.5}
    rows[3]["test"]["5"] = {"recon_loss": 2.0, "usage": 0.5}
    rec = Record(rows)
    assert compare(rec, "recon_loss", a={"estimator": "rotation"}, b={"estimator": "ste"},
                   over=("gamma",)).all("a")
    assert compare(rec, "recon_loss", a={"estimator": "rotation"}, b={"estimator": "ste"},
                   over=("gamma",), step=5).all("b")


def test_fmt():
    assert fmt(0.0263) == "0.0263" and fmt(1234.5) == "1234" and fmt(12.34) == "12.3"
    assert fmt(1.5e-6) == "1.50e-06" and fmt(0.0) == "0.0"
