"""The measurement behind the estimates chapter (rotvq.lab.estimates), on tiny models."""
from __future__ import annotations

import json
import math

import pytest
import torch

from rotvq.lab import estimates as E
from rotvq.lab import gradients as G
from rotvq.lab.models import MLPVQVAE
from rotvq.lab.study import init_name


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = MLPVQVAE(12, 16, 3, 6, num_latents=2)
    x = torch.randn(40, 12)
    return model, x


def test_kept_runs_are_the_declared_twelve():
    runs = E.kept_runs()
    assert len(runs) == 12
    assert {r.config.estimator for _, r in runs} == {"ste", "rotation"}
    assert {init_name(r.config) for _, r in runs} == {"small", "kmeans"}
    assert {(r.dataset, r.config.latent_dim) for _, r in runs} == set(E.SIZES)
    assert all(r.config.seed == 0 and r.config.gamma == 0.25 for _, r in runs)


def test_tau_matches_the_gaussian_width():
    scales = {"b": 0.1, "delta": 0.6}
    # logistic scale tau/(2 delta) with standard deviation pi/sqrt(3) times it equals sigma = c b
    for c in E.SCALES:
        beta = E.tau_of(c, scales) / (2 * scales["delta"])
        assert beta * math.pi / math.sqrt(3) == pytest.approx(c * scales["b"], rel=1e-12)


def test_summarize_on_known_vectors():
    ref = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    est = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    cells = torch.tensor([0, 0, 0, 1])
    bins = torch.tensor([0, 1, 2, 3])
    out = E.summarize(est, ref, cells=cells, rel_bin=bins, boundary_bin=bins, baseline=ref * 2)
    assert out["cos"][1] == 1.0 and out["cos"][0] == pytest.approx(0.0, abs=1e-12)  # zero ref left out
    assert out["err"] == [0.25, 0.5, 1.25]  # errors 0, 0.5, 2 -> quartiles
    assert out["cos_rel"][:3] == [1.0, 1.0, -1.0] and math.isnan(out["cos_rel"][3])
    assert out["cell"]["n"] == 1  # cell 0 has three outputs, cell 1 one
    assert out["vs_ste"]["farther"] == pytest.approx(1 / 3, abs=1e-3)
    draws = torch.stack([est, est])
    noisy = E.summarize(est, ref, cells=cells, rel_bin=bins, boundary_bin=bins, draws=draws)
    assert noisy["noise"] == [0.0, 0.0, 0.0] and noisy["cos1"][1] == 1.0


def test_measure_rows_are_complete_serializable_and_seeded(tiny):
    model, x = tiny
    size = E.Size(24, 64, 3)
    rows = E.measure(model, x, size, scales_c=(0.5, 2.0))
    assert [(r["reference"], r["c"]) for r in rows] == [
        ("unquantized", None), ("taylor", None), ("gaussian", 0.5), ("gaussian", 2.0),
        ("softmax", 0.5), ("softmax", 2.0)]
    for row in rows:
        assert set(row["estimators"]) == set(E.ESTIMATORS)
        assert row["n"] == 24
        json.dumps(row)
    assert "mc_rel_se" in rows[2]["ref"] and "cos_gaussian" in rows[4]
    assert rows[0]["ref"]["cos_unquantized"] == [1.0, 1.0, 1.0]
    assert "noise" in rows[0]["estimators"]["nsvq"] and "vs_ste" in rows[0]["estimators"]["rotation"]
    again = E.measure(model, x, size, scales_c=(0.5, 2.0))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert json.dumps(strip(rows)) == json.dumps(strip(again))
    # the scale of each smoothed reference follows the model's geometry
    full = G.LatentObjective(model, x)
    scales = E.model_scales(full)
    assert rows[2]["sigma"] == pytest.approx(0.5 * scales["b"], rel=1e-5)
    assert rows[5]["tau"] == pytest.approx(E.tau_of(2.0, scales), rel=1e-5)


def test_live_values_recompute_bitwise(tiny):
    model, x = tiny
    a = E.live_values(model, x, latents=4, pairs=32, draws=2)
    b = E.live_values(model, x, latents=4, pairs=32, draws=2)
    assert a == b and len(a["ste"]) == 4
    json.dumps(a)


def test_select():
    rows = [{"kind": "compare", "key": "a", "c": None}, {"kind": "compare", "key": "b", "c": 1.0},
            {"kind": "live", "key": "a"}]
    assert [r["key"] for r in E.select(rows, key="a")] == ["a"]
    assert [r["key"] for r in E.select(rows, key=("a", "b"))] == ["a", "b"]
    assert E.select(rows, kind="live") == [rows[2]]
    assert E.select(rows, c=1.0) == [rows[1]]
