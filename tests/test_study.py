"""Tests for rotvq.lab.study: declared grids, the record, resuming, live checks, the CLI."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from rotvq.lab import study as S
from rotvq.lab.training import METRICS, TrainConfig, build_model, evaluate, train
from rotvq.lab.datasets import load_digits

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden=8, batch_size=16, codebook_size=8, steps=6, latent_dim=4, num_latents=2)


def tiny_runs(seeds=(0, 1), estimators=("ste", "rotation")):
    return [S.Run("digits", TrainConfig(**TINY, estimator=e, seed=s), (3,))
            for e in estimators for s in seeds]


def test_run_validates_and_always_evaluates_at_the_end():
    run = S.Run("digits", TrainConfig(**TINY), (3,))
    assert run.evals == (3, 6)
    with pytest.raises(ValueError, match="dataset"):
        S.Run("mnist", TrainConfig(**TINY))
    with pytest.raises(ValueError, match="evals"):
        S.Run("digits", TrainConfig(**TINY), (7,))
    with pytest.raises(ValueError, match="evals"):
        S.Run("digits", TrainConfig(**TINY), (0,))
    with pytest.raises(TypeError, match="TrainConfig"):
        S.Run("digits", dict(TINY))


def test_key_names_everything_that_defines_the_results():
    a = S.Run("digits", TrainConfig(**TINY), (3,))
    assert a.key == S.Run("digits", TrainConfig(**TINY), (3,)).key
    assert a.key != S.Run("digits", TrainConfig(**TINY, seed=1), (3,)).key
    assert a.key != S.Run("patches", TrainConfig(**TINY), (3,)).key
    assert a.key != S.Run("digits", TrainConfig(**TINY), (2,)).key


def test_declared_studies_are_the_issue_grid():
    digits, patches = S.study("scaling-digits"), S.study("scaling-patches")
    assert len({r.key for r in digits}) == len(digits) and len({r.key for r in patches}) == len(patches)
    assert len(digits) + len(patches) >= 250
    # digits: every estimator at every gamma of the grid, both inits, 5 seeds
    for est in S.DIGITS_ESTIMATORS:
        for init in ("small", "kmeans"):
            for gamma in (0.25, 1.0, 4.0):
                seeds = {r.config.seed for r in digits if r.config.estimator == est
                         and S.init_name(r.config) == init and r.config.gamma == gamma}
                assert seeds == set(range(5)), (est, init, gamma)
        assert any(S.init_name(r.config) == "layer" and r.config.estimator == est for r in digits)
    # patches: d = 8, 32, 128, K >= 512, STE / rotation / unscaled, gamma 1/4 and 1, 3 inits, 3 seeds
    assert {r.config.latent_dim for r in patches} == {8, 32, 128}
    assert min(r.config.codebook_size for r in patches) >= 512
    for est in ("ste", "rotation", "rotation_unscaled"):
        for init in ("small", "kmeans", "layer"):
            for gamma in (0.25, 1.0):
                for d in (8, 32, 128):
                    n = sum(1 for r in patches if (r.config.estimator, S.init_name(r.config),
                                                   r.config.gamma, r.config.latent_dim) == (est, init, gamma, d))
                    assert n >= 3
    assert all(len(r.evals) >= 2 for r in digits + patches)  # the ranking at two points of the same runs
    kept = [r for r in digits + patches if r.keep_weights]
    assert {(r.dataset, r.config.estimator) for r in kept} >= {("digits", "ste"), ("patches", "rotation")}


def test_studies_pin_every_field():
    """A study's runs do not depend on TrainConfig's defaults: every field is set."""
    assert set(S.STUDY_DEFAULTS) == {f.name for f in dataclasses.fields(TrainConfig)}
    TrainConfig(**S.STUDY_DEFAULTS)  # valid values


def test_records_match_their_declaration(repo_root):
    """Every row of a committed record is a run its study declares (same key)."""
    for name in S.STUDIES:
        path = repo_root / "book" / "records" / f"{name}.jsonl"
        declared = {r.key for r in S.study(name)}
        rows = S.load_record(path).rows
        assert rows, f"{path} is missing or empty"
        assert {r["key"] for r in rows} <= declared


def test_init_names_round_trip():
    for name in S.INIT_NAMES:
        assert S.init_name(TrainConfig(**S.init_fields(name, 64), codebook_size=64)) == name
    assert S.init_name(TrainConfig(init="normal")) == "other"
    with pytest.raises(ValueError, match="init"):
        S.init_fields("zeros", 8)


def test_evaluation_inside_a_long_run_is_the_shorter_run():
    """What the record relies on: the model after s steps of a longer run (evaluated there)
    is bitwise the model of an s-step run, with k-means and dead-code resets on."""
    x, xt = load_digits("train").x, load_digits("test").x
    config = TrainConfig(**{**TINY, "steps": 12}, init="kmeans", dead_code_threshold=None)
    seen = {}
    long = build_model(config, x)
    train(long, x, config, callback=lambda s, m: seen.__setitem__(s, evaluate(m, xt)) if s == 5 else None)
    short_config = dataclasses.replace(config, steps=5)
    short = build_model(short_config, x)
    train(short, x, short_config)
    assert seen[5] == evaluate(short, xt)
    plain = build_model(config, x)
    train(plain, x, config)
    assert all(torch.equal(a, b) for a, b in zip(long.state_dict().values(), plain.state_dict().values()))


def test_run_study_writes_rows_and_resumes(tmp_path, monkeypatch):
    runs = tiny_runs()
    record = S.run_study("tiny", tmp_path, runs=runs, command="test", progress=False)
    assert [r["key"] for r in record.rows] == [r.key for r in runs]
    row = record.rows[0]
    assert row["config"] == runs[0].config.to_dict() and row["dataset"] == "digits"
    assert set(row["test"]) == {"3", "6"} and set(row["test"]["6"]) == set(METRICS)
    assert set(row["first"]) == set(METRICS) and row["error"] is None
    assert len(row["curves"]["recon_loss"]) == 6 and row["curves"]["block"] == 1
    assert row["machine"]["torch"] == torch.__version__ and row["command"] == "test"
    assert row["threads"] == 1 and row["wall_time_s"] > 0
    assert S.load_record(tmp_path / "tiny.jsonl").rows == record.rows

    calls = []
    real = S._train_run
    monkeypatch.setattr(S, "_train_run", lambda *a, **k: calls.append(a[0].key) or real(*a, **k))
    S.run_study("tiny", tmp_path, runs=runs, progress=False)
    assert calls == []  # a finished run is never rerun

    # an interruption mid-write leaves a cut-off last line: that run alone is redone
    path = tmp_path / "tiny.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    assert len(S.load_record(path)) == len(runs) - 1
    again = S.run_study("tiny", tmp_path, runs=runs, progress=False)
    assert calls == [runs[-1].key]
    assert again.rows[-1]["test"] == record.rows[-1]["test"]  # same machine, same threads: bitwise

    # a subset, forced: only those rerun, rows replaced in place, order kept
    calls.clear()
    S.run_study("tiny", tmp_path, runs=runs, only={"seed": [1], "estimator": ["ste"]}, force=True,
                progress=False)
    assert calls == [runs[1].key]
    assert [r["key"] for r in S.load_record(path).rows] == [r.key for r in runs]


def test_damaged_record_line_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"key": 1}\nnot json\n{"key": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        S.load_record(path)


def test_only_rejects_unknown_fields(tmp_path):
    with pytest.raises(ValueError, match="unknown field"):
        S.run_study("tiny", tmp_path, runs=tiny_runs(), only={"colour": ["red"]}, progress=False)


def test_parallel_workers_give_the_same_rows(tmp_path):
    runs = tiny_runs(seeds=(0,), estimators=("ste", "rotation", "rotation_unscaled"))
    one = S.run_study("one", tmp_path / "a", runs=runs, progress=False)
    two = S.run_study("two", tmp_path / "b", runs=runs, workers=2, progress=False)
    assert [r["key"] for r in two.rows] == [r.key for r in runs]  # declared order, not finishing order
    assert [r["test"] for r in two.rows] == [r["test"] for r in one.rows]


def test_kept_weights_load_back(tmp_path):
    run = dataclasses.replace(tiny_runs(seeds=(0,), estimators=("rotation",))[0], keep_weights=True)
    record = S.run_study("w", tmp_path, runs=[run], progress=False)
    state = torch.load(S.weights_path(tmp_path, "w", run.key), weights_only=True)
    x, xt = load_digits("train").x, load_digits("test").x
    model = build_model(run.config, x)
    model.load_state_dict(state)
    assert evaluate(model, xt) == record.rows[0]["test"]["6"]


def test_record_selection_and_values(tmp_path):
    record = S.run_study("tiny", tmp_path, runs=tiny_runs(seeds=(1, 0)), progress=False)
    ste = record.values("recon_loss", 3, estimator="ste")
    assert ste.shape == (2,)
    assert ste[0] == record.select(estimator="ste", seed=0).rows[0]["test"]["3"]["recon_loss"]
    assert len(record.select(estimator=("ste", "rotation"))) == 4
    assert record.distinct("estimator") == ["ste", "rotation"]
    with pytest.raises(KeyError, match="no rows"):
        record.values("recon_loss", 3, estimator="rotation_tangent")
    with pytest.raises(KeyError, match="not evaluated"):
        record.values("recon_loss", 4, estimator="ste")
    provenance = record.provenance()
    assert provenance["runs"] == 4 and provenance["torch"] == [torch.__version__]


def test_live_check_reproduces_the_record_and_catches_a_change(tmp_path):
    runs = tiny_runs(seeds=(0, 1, 2))
    record = S.run_study("tiny", tmp_path, runs=runs, progress=False)
    keys = [runs[0].key, runs[3].key]
    check = S.check_live(record, keys, 3, ("recon_loss", "perplexity"))
    assert check.ok and check.worst() == 0.0  # the same machine reproduces the record bitwise
    assert {e["metric"] for e in check.entries} == {"recon_loss", "perplexity"}
    # a retrained value just beyond the tolerance fails
    def shifted(row, step):
        values = dict(S.retrain(row, step))
        values["recon_loss"] += 1.01 * S.tolerance(record, row, "recon_loss", step)
        return values
    broken = S.check_live(record, keys, 3, ("recon_loss",), retrain_fn=shifted)
    assert not broken.ok and len(broken.failures()) == 2
    with pytest.raises(ValueError, match="evaluation steps"):
        S.retrain(record.rows[0], 4)


def test_retrain_refuses_a_row_that_no_longer_matches_its_config(tmp_path):
    record = S.run_study("tiny", tmp_path, runs=tiny_runs(seeds=(0,)), progress=False)
    row = json.loads(json.dumps(record.rows[0]))
    row["config"]["lr"] = 0.5
    with pytest.raises(ValueError, match="does not match"):
        S.retrain(row, 3)


def test_tolerance_is_never_below_the_resolution_of_usage(tmp_path):
    record = S.run_study("tiny", tmp_path, runs=tiny_runs(seeds=(0, 1)), progress=False)
    row = dict(record.rows[0])
    rows = [json.loads(json.dumps(r)) for r in record.rows]
    for r in rows:  # every seed used every code: no spread
        r["test"]["3"]["usage"] = 1.0
    flat = S.Record(rows)
    assert S.seed_range(flat, rows[0], "usage", 3) == 0.0
    assert S.tolerance(flat, rows[0], "usage", 3) == 1 / 8  # one code of K = 8
    # two seeds: 3.29 standard deviations of a difference of two seeds, sigma = range / 1.128
    expected = 3.29 * 2 ** 0.5 / 1.128 * S.seed_range(record, row, "recon_loss", 3)
    assert S.tolerance(record, row, "recon_loss", 3) == pytest.approx(expected)


def test_seed_range_needs_two_seeds(tmp_path):
    record = S.run_study("tiny", tmp_path, runs=tiny_runs(seeds=(0,)), progress=False)
    with pytest.raises(ValueError, match="two or more"):
        S.seed_range(record, record.rows[0], "recon_loss", 3)


def test_cli_list_status_and_only(tmp_path, capsys, monkeypatch):
    assert S.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "scaling-digits" in out and "scaling-patches" in out
    assert S.main(["status", "scaling-digits", "--records", str(tmp_path), "--only", "seed=0"]) == 0
    assert "0 of 60 runs recorded" in capsys.readouterr().out
    seen = {}
    monkeypatch.setattr(S, "run_study", lambda name, records, **kw: seen.update(kw, name=name))
    assert S.main(["run", "scaling-patches", "--records", str(tmp_path), "--only",
                   "latent_dim=8,32", "estimator=ste", "init_name=small", "--workers", "2"]) == 0
    assert seen["only"] == {"latent_dim": [8, 32], "estimator": ["ste"], "init_name": ["small"]}
    assert seen["workers"] == 2 and seen["command"].startswith("rotvq-study run scaling-patches")
    for bad in (["--only", "latent_dim=eight"], ["--only", "colour=red"], ["--only", "seed"]):
        with pytest.raises(SystemExit):
            S.main(["run", "scaling-digits", "--records", str(tmp_path), *bad])


def test_the_stored_emulation_measurement_matches_the_record_and_the_live_runs():
    """book/records/live-emulation-scaling.json (tools/live_emulation.py) is about the runs the
    chapter retrains, with the record's values, and its fractions follow from its own numbers."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    records = root / "book" / "records"
    stored = json.loads((records / "live-emulation-scaling.json").read_text(encoding="utf-8"))
    record = S.Record([r for name in ("scaling-digits.jsonl", "scaling-patches.jsonl")
                       for r in S.load_record(records / name).rows])
    rows = [record.select(**where).rows for where in S.LIVE_RUNS["scaling"]]
    assert all(len(found) == 1 for found in rows)
    by_key = {found[0]["key"]: found[0] for found in rows}
    assert stored["runs"] == list(by_key)
    assert stored["settings"]["native"]["worst"] == 0.0  # this machine reproduces its own record
    for setting in stored["settings"].values():
        assert len(setting["entries"]) == len(by_key) * len(S.LIVE_METRICS)
        for e in setting["entries"]:
            row = by_key[e["key"]]
            step = row["evals"][0]
            assert e["record"] == row["test"][str(step)][e["metric"]]
            allowed = S.tolerance(record, row, e["metric"], step)
            assert e["fraction"] == pytest.approx(abs(e["live"] - e["record"]) / allowed, rel=1e-12)
        assert setting["worst"] == max(e["fraction"] for e in setting["entries"])
    assert stored["worst"] == max(s["worst"] for s in stored["settings"].values()) < 1
