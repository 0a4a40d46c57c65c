r"""The record of the chapter "What do the estimators estimate?": gradients against references.

For the trained models whose weights the scaling study keeps (:func:`kept_runs`: seed 0 of
the STE and of the rotation trick at ``γ = 1/4`` with small and with k-means codes, on the
digits at ``d = 8`` and on the patches at ``d = 8`` and 128), at every evaluation step of
their runs, this module compares the gradient each estimator sends to an encoder output
with the reference gradients of :mod:`rotvq.lab.gradients`, over a seeded sample of the
test split's encoder outputs, and writes one JSON line per (model, step, reference, scale)
to ``book/records/estimates.jsonl``:

.. code-block:: bash

    python -m rotvq.lab.estimates snapshots   # retrain the kept runs, save the weights at
                                              # every evaluation step (not committed)
    python -m rotvq.lab.estimates check       # are the snapshots the study's runs?
    python -m rotvq.lab.estimates run         # measure; resumable, one line per result
    python -m rotvq.lab.estimates live        # the per-vector values of the live check

**Snapshots.** The learning rate is constant, so the model after ``s`` steps of a run is
the ``s``-step model; :func:`make_snapshots` retrains each kept run exactly as
:mod:`rotvq.lab.study` did (one thread, the same callback evaluations) and saves its
``state_dict`` at each evaluation step under ``--snapshots`` (default
``.snapshots/estimates``, ignored by git). It checks that the retrained run reproduces the
record's test metrics at every step and, where the study kept them, the final weights
bitwise (:func:`check_snapshots`); the result is one row per model (``kind = "retrain"``).

**Scales.** The two smoothed references need a scale. Both are tied to the model's own
geometry, measured on the whole test split at that step: ``b``, the median distance of an
encoder output to the boundary of its cell, and ``δ``, the median distance from a used
code to its nearest other code. For a multiplier ``c`` of :data:`SCALES` the Gaussian
reference has ``σ = c b`` and the softmax reference ``τ = (2√3/π) δ c b``: across a
boundary between two codes at distance ``δ`` both then smooth the step of the loss over
the same width (the softmax's logistic step and the Gaussian's normal step have the same
standard deviation, :eq:`est-width`).

**Rows** (``kind = "compare"``): the model (``study``, ``key``, ``dataset``,
``latent_dim``, ``init_name``, ``trained_with``), ``step``, ``reference`` and ``c`` (None
for the unscaled references), ``sigma``/``tau``, the scales, the sample (``n``, the bin
edges of ``|z - q|/|z|`` and of the boundary distance), the reference's own statistics
(``ref``: quartiles of ``|r|/|g|``, of the Monte Carlo relative standard error, of the
cosine with the unquantized gradient and with the quantization error ``z - q`` (the
direction of the commitment gradient), and the fraction of zero references) and, per estimator, :func:`summarize` of the cosine similarity and the
relative error against the reference (quartiles over all encoder outputs and per bin;
the bias and spread over the encoder outputs of one cell; for NSVQ and DiVeQ the single
draw's cosine and the relative noise). One more row per live-check latent set
(``kind = "live"``) keeps a few per-vector results for the chapter to recompute. Each row
carries the machine, torch version, command and time.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from . import gradients as G
from .study import Run, _data, init_name, load_record, machine, study
from .training import TrainConfig, build_model, evaluate, train

__all__ = ["ESTIMATORS", "DETERMINISTIC", "STOCHASTIC", "SCALES", "REFERENCES", "Size", "SIZES",
           "kept_runs", "make_snapshots", "load_model", "measure", "summarize", "model_scales",
           "tau_of", "live_values", "load_estimates", "select", "check_snapshots", "main"]

#: The deterministic estimators compared (the variants of the scaling study).
DETERMINISTIC = ("ste", "rotation", "rotation_unscaled", "rotation_clipped", "rotation_interp",
                 "rotation_tangent")
#: The stochastic estimators compared (:mod:`rotvq.stochastic`, DiVeQ at its default noise).
STOCHASTIC = ("nsvq", "diveq")
ESTIMATORS = DETERMINISTIC + STOCHASTIC
#: The multipliers ``c`` of the scale (see the module docstring).
SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
#: The references, in the order of the chapter.
REFERENCES = ("unquantized", "taylor", "softmax", "gaussian")
_STUDIES = ("scaling-digits", "scaling-patches")


@dataclasses.dataclass(frozen=True)
class Size:
    """How much is measured per model and step.

    Attributes:
        latents: encoder outputs sampled from the test split (seeded, the same positions at
            every step of a model).
        pairs: antithetic Monte Carlo pairs per encoder output and scale (Gaussian reference).
        draws: noise draws per encoder output for NSVQ and DiVeQ.
    """

    latents: int
    pairs: int
    draws: int


#: The sizes, per (dataset, d): chosen so that one model-step costs about a minute on one
#: CPU thread (the Gaussian reference dominates). The median Monte Carlo relative standard
#: error they give at ``c = 1`` is below 10 % at ``d = 8`` but not at ``d = 128`` (the
#: chapter's table gives it per group at the end of training, and asserts this).
SIZES = {("digits", 8): Size(512, 8192, 64), ("patches", 8): Size(256, 4096, 32),
         ("patches", 128): Size(128, 8192, 16)}


def kept_runs() -> list[tuple[str, Run]]:
    """``(study name, run)`` of every run the scaling study keeps the weights of."""
    return [(name, run) for name in _STUDIES for run in study(name) if run.keep_weights]


def snapshot_path(snapshots: str | os.PathLike, name: str, key: str, step: int) -> pathlib.Path:
    return pathlib.Path(snapshots) / name / f"{key}-{step}.pt"


def _equal_states(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def make_snapshots(name: str, run: Run, snapshots: str | os.PathLike,
                   records: str | os.PathLike = "book/records") -> dict[str, Any]:
    """Retrain ``run`` as the study did and save its weights at every evaluation step.

    Returns:
        ``{"record": bool, "kept": bool | None}``: whether the retrained run's test metrics
        equal the record's at every evaluation step, and whether its final weights equal
        the kept ones (``None`` where the study has not kept them yet).
    """
    torch.set_num_threads(1)  # as the study's workers
    x_train, x_test = _data(run.dataset, run.config.model)
    model = build_model(run.config, x_train)
    test: dict[str, dict[str, float]] = {}

    def at_step(done: int, trained: torch.nn.Module) -> None:
        if done in run.evals:
            test[str(done)] = evaluate(trained, x_test)  # as the study's callback
            path = snapshot_path(snapshots, name, run.key, done)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(trained.state_dict(), path)

    train(model, x_train, run.config, progress=False, callback=at_step)
    recorded = load_record(pathlib.Path(records) / f"{name}.jsonl").by_key().get(run.key)
    same_record = recorded is not None and recorded["test"] == test
    kept = pathlib.Path(records) / "weights" / name / f"{run.key}.pt"
    same_kept = (_equal_states(model.state_dict(), torch.load(kept, weights_only=True))
                 if kept.is_file() else None)
    return {"record": same_record, "kept": same_kept}


def check_snapshots(name: str, run: Run, snapshots: str | os.PathLike,
                    records: str | os.PathLike = "book/records") -> dict[str, Any]:
    """Whether the snapshots of ``run`` are the study's run: their test metrics equal the
    record's at every evaluation step (``"record"``, ``None`` if the record has no such row
    yet), and the last one equals the kept weights bitwise (``"kept"``, ``None`` if none)."""
    torch.set_num_threads(1)
    x_train, x_test = _data(run.dataset, run.config.model)
    recorded = load_record(pathlib.Path(records) / f"{name}.jsonl").by_key().get(run.key)
    same_record = None if recorded is None else True
    for step in run.evals:
        model = build_model(run.config, x_train)
        model.load_state_dict(torch.load(snapshot_path(snapshots, name, run.key, step),
                                         weights_only=True))
        if recorded is not None and evaluate(model, x_test) != recorded["test"][str(step)]:
            same_record = False
    kept = pathlib.Path(records) / "weights" / name / f"{run.key}.pt"
    same_kept = (_equal_states(model.state_dict(), torch.load(kept, weights_only=True))
                 if kept.is_file() else None)
    return {"record": same_record, "kept": same_kept}


def load_model(name: str, run: Run, step: int, snapshots: str | os.PathLike,
               records: str | os.PathLike = "book/records") -> torch.nn.Module:
    """The model of ``run`` after ``step`` steps: the kept weights at the last step when
    they exist, else the snapshot."""
    x_train, _ = _data(run.dataset, run.config.model)
    model = build_model(run.config, x_train)
    kept = pathlib.Path(records) / "weights" / name / f"{run.key}.pt"
    path = kept if step == run.config.steps and kept.is_file() else snapshot_path(
        snapshots, name, run.key, step)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


# ----------------------------------------------------------------------------------------
# Measuring one model at one step

def _quantiles(values: torch.Tensor) -> list[float]:
    v = values[torch.isfinite(values)].double()
    if len(v) == 0:
        return [math.nan] * 3
    return [_sig(x) for x in torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=v.dtype)).tolist()]


def _sig(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}") if math.isfinite(value) else value


def _edges(values: torch.Tensor) -> list[float]:
    return torch.quantile(values.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()


def _bins(values: torch.Tensor, edges: Sequence[float]) -> torch.Tensor:
    return torch.bucketize(values.double(), torch.tensor(edges, dtype=torch.float64))


def summarize(estimate: torch.Tensor, reference: torch.Tensor, *, cells: torch.Tensor,
              rel_bin: torch.Tensor, boundary_bin: torch.Tensor,
              draws: torch.Tensor | None = None,
              baseline: torch.Tensor | None = None) -> dict[str, Any]:
    """The statistics of one estimator against one reference over a sample of encoder outputs.

    Args:
        estimate: ``(n, d)`` the estimator's gradient (for NSVQ and DiVeQ: the mean of its
            draws); reference: ``(n, d)``.
        cells: ``(n,)`` the code index of each encoder output.
        rel_bin, boundary_bin: ``(n,)`` the quartile bin (0..3) of ``|z - q|/|z|`` and of
            the boundary distance.
        draws: ``(draws, n, d)`` the individual draws of a stochastic estimator.
        baseline: ``(n, d)`` another estimator's gradient (the STE's) for the paired
            comparison ``"vs_ste"``.

    Returns:
        a dict with the keys ``cos`` and ``err`` (quartiles ``[q25, median, q75]``),
        ``cos_rel``, ``cos_boundary``, ``err_rel``, ``err_boundary`` (a median per bin) and
        ``cell``, plus, with ``draws``, ``"cos1"`` (quartiles of one draw's cosine) and ``"noise"``
        (quartiles of ``sqrt(E|draw - mean|²)/|reference|``); with ``baseline``, ``"vs_ste"``:
        the fraction of encoder outputs where this estimator's cosine is higher than the
        baseline's (``"closer"``) and lower (``"farther"``), the same for the relative
        error (``"lower_err"``), and the quartiles of the paired cosine difference.
    """
    defined = reference.norm(dim=-1) > 0  # a zero reference has no direction: left out
    cos = torch.where(defined, G.cosine(estimate, reference), torch.full_like(defined, math.nan,
                                                                              dtype=reference.dtype))
    err = torch.where(defined, G.relative_error(estimate, reference),
                      torch.full_like(cos, math.nan))
    out: dict[str, Any] = {"cos": _quantiles(cos), "err": _quantiles(err)}
    if baseline is not None:
        base_cos = G.cosine(baseline, reference)[defined]
        base_err = G.relative_error(baseline, reference)[defined]
        mine_cos, mine_err = cos[defined], err[defined]
        count = max(int(defined.sum()), 1)
        out["vs_ste"] = {"closer": _sig(float((mine_cos > base_cos).sum()) / count),
                         "farther": _sig(float((mine_cos < base_cos).sum()) / count),
                         "lower_err": _sig(float((mine_err < base_err).sum()) / count),
                         "diff": _quantiles(mine_cos - base_cos)}
    for label, bins in (("rel", rel_bin), ("boundary", boundary_bin)):
        out[f"cos_{label}"] = [_quantiles(cos[bins == b])[1] for b in range(4)]
        out[f"err_{label}"] = [_quantiles(err[bins == b])[1] for b in range(4)]
    # over the encoder outputs of one cell: the mean error (bias) and its spread, relative
    # to the mean reference norm of the cell, for cells with at least 3 sampled outputs
    bias, spread, ref_spread = [], [], []
    for code in cells.unique():
        members = cells == code
        if int(members.sum()) < 3:
            continue
        e = estimate[members] - reference[members]
        scale = reference[members].norm(dim=-1).mean()
        if not scale > 0:
            continue
        bias.append(float(e.mean(0).norm() / scale))
        spread.append(float((e - e.mean(0)).pow(2).sum(-1).mean().sqrt() / scale))
        r = reference[members]
        ref_spread.append(float((r - r.mean(0)).pow(2).sum(-1).mean().sqrt() / scale))
    out["cell"] = {"n": len(bias), "bias": _quantiles(torch.tensor(bias or [math.nan])),
                   "spread": _quantiles(torch.tensor(spread or [math.nan])),
                   "ref_spread": _quantiles(torch.tensor(ref_spread or [math.nan]))}
    if draws is not None:
        single = G.cosine(draws, reference.expand_as(draws))[:, defined]  # (draws, n')
        out["cos1"] = _quantiles(single.flatten())
        noise = (draws - estimate).pow(2).sum(-1).mean(0).sqrt()[defined] / reference.norm(dim=-1)[defined]
        out["noise"] = _quantiles(noise)
    return out


def _sample_positions(objective: G.LatentObjective, count: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(objective), generator=gen)[:count]
    return objective.positions[order.sort().values]


def model_scales(objective: G.LatentObjective) -> dict[str, float]:
    """``b`` (median boundary distance), ``δ`` (median nearest-other-code distance of the
    used codes), and the medians of ``|z|`` and ``|z - q|``, over all of ``objective``."""
    b = G.boundary_distance(objective.z, objective.codebook, objective.index)
    delta = G.nearest_other_code(objective.index, objective.codebook)
    return {"b": float(b.median()), "delta": float(delta.median()),
            "z": float(objective.z.norm(dim=-1).median()),
            "zq": float((objective.z - objective.q).norm(dim=-1).median())}


def tau_of(c: float, scales: Mapping[str, float]) -> float:
    """The softmax temperature of multiplier ``c``: ``(2√3/π) δ c b`` (eq. est-width)."""
    return 2 * math.sqrt(3) / math.pi * scales["delta"] * c * scales["b"]


def measure(model: torch.nn.Module, x_test: torch.Tensor, size: Size, *, seed: int = 0,
            scales_c: Sequence[float] = SCALES, references: Sequence[str] = REFERENCES,
            estimators: Sequence[str] = ESTIMATORS,
            progress: bool = False) -> list[dict[str, Any]]:
    """Compare every estimator with every reference for one model; one dict per
    (reference, c) with the row fields that do not name the model (see the module
    docstring). ``seed`` fixes the sample of encoder outputs, the Monte Carlo draws and
    the stochastic estimators' noise."""
    full = G.LatentObjective(model, x_test)
    scales = model_scales(full)
    objective = G.LatentObjective(model, x_test, _sample_positions(full, size.latents, seed))
    z, q, index = objective.z, objective.q, objective.index
    n = len(z)
    g = G.unquantized(objective, q)  # the gradient at the code: the estimators' input
    boundary = G.boundary_distance(z, objective.codebook, index)
    rel = (z - q).norm(dim=-1) / z.norm(dim=-1)
    rel_edges, boundary_edges = _edges(rel), _edges(boundary)
    rel_bin, boundary_bin = _bins(rel, rel_edges), _bins(boundary, boundary_edges)
    det = G.estimator_gradients(g, z, q, [e for e in estimators if e in DETERMINISTIC])
    stoch = {name: G.stochastic_gradients(objective, z, q, name, draws=size.draws,
                                          generator=torch.Generator().manual_seed(seed + 1 + i))
             for i, name in enumerate(e for e in estimators if e in STOCHASTIC)}
    common = {"n": n, "scales": {k: _sig(v, 6) for k, v in scales.items()},
              "rel_edges": [_sig(v) for v in rel_edges],
              "boundary_edges": [_sig(v) for v in boundary_edges],
              "sample": {"latents": size.latents, "pairs": size.pairs, "draws": size.draws,
                         "seed": seed}}
    jobs: list[tuple[str, float | None]] = []
    for reference in sorted(references, key=("unquantized", "taylor", "gaussian", "softmax").index):
        if reference in ("unquantized", "taylor"):
            jobs.append((reference, None))
        else:
            jobs += [(reference, c) for c in scales_c]
    unq = G.unquantized(objective, z)
    gaussians: dict[float, torch.Tensor] = {}
    rows = []
    for j, (reference, c) in enumerate(jobs):
        start = time.perf_counter()
        se = None
        evaluations = 0
        extra: dict[str, Any] = {}
        if reference == "unquantized":
            r = G.unquantized(objective, z)
        elif reference == "taylor":
            r = G.taylor(objective, z, q)
        elif reference == "softmax":
            extra["tau"] = _sig(tau_of(c, scales), 6)
            r = G.softmax_smoothed(objective, z, objective.codebook, extra["tau"])
            if c in gaussians:  # the two smoothings at the same width, against each other
                other = gaussians[c]
                extra["cos_gaussian"] = _quantiles(G.cosine(r, other)[other.norm(dim=-1) > 0])
        else:
            extra["sigma"] = _sig(c * scales["b"], 6)
            est = G.gaussian_smoothed(objective, z, objective.codebook, extra["sigma"],
                                      pairs=size.pairs,
                                      generator=torch.Generator().manual_seed(seed + 100 + j))
            r, se, evaluations, halves = est
            extra["split_cos"] = _quantiles(G.cosine(halves[0], halves[1])[r.norm(dim=-1) > 0])
            gaussians[c] = r
        norm = r.norm(dim=-1)
        ref = {"ratio": _quantiles(norm / g.norm(dim=-1)), "zero": _sig(float((norm == 0).double().mean())),
               "cos_unquantized": _quantiles(G.cosine(r, unq)[norm > 0]),
               "cos_residual": _quantiles(G.cosine(r, z - q)[norm > 0])}
        if se is not None:
            ref["mc_rel_se"] = _quantiles(torch.where(norm > 0, se / norm, torch.full_like(se, math.inf)))
            ref["evaluations"] = evaluations
        base = det.get("ste")
        per = {name: summarize(det[name], r, cells=index, rel_bin=rel_bin, boundary_bin=boundary_bin,
                               baseline=None if name == "ste" else base)
               for name in det}
        per.update({name: summarize(draws.mean(0), r, cells=index, rel_bin=rel_bin,
                                    boundary_bin=boundary_bin, draws=draws, baseline=base)
                    for name, draws in stoch.items()})
        rows.append({"reference": reference, "c": c, **extra, **common, "ref": ref,
                     "estimators": per, "seconds": round(time.perf_counter() - start, 2)})
        if progress:
            print(f"  {reference} c={c}: {rows[-1]['seconds']} s", file=sys.stderr, flush=True)
    return rows


# ----------------------------------------------------------------------------------------
# The live check: a few encoder outputs, every reference, kept per vector

LIVE = {"study": "scaling-digits", "latents": 8, "pairs": 4096, "draws": 64, "c": 1.0, "seed": 7}


def live_values(model: torch.nn.Module, x_test: torch.Tensor, *, latents: int = 8,
                pairs: int = 4096, draws: int = 64, c: float = 1.0,
                seed: int = 7) -> dict[str, Any]:
    """Per-vector results for ``latents`` encoder outputs (seeded): the STE's and the rotation
    trick's gradients, the unquantized, Taylor and softmax references (deterministic, float64),
    the Gaussian reference at ``c`` with its standard error, and NSVQ's mean over ``draws``
    with its standard error. The chapter recomputes them and compares."""
    full = G.LatentObjective(model, x_test)
    scales = model_scales(full)
    objective = G.LatentObjective(model, x_test, _sample_positions(full, latents, seed))
    z, q = objective.z, objective.q
    g = G.unquantized(objective, q)
    det = G.estimator_gradients(g, z, q, ["ste", "rotation"])
    gauss = G.gaussian_smoothed(objective, z, objective.codebook, c * scales["b"], pairs=pairs,
                                generator=torch.Generator().manual_seed(seed + 1))
    nsvq = G.stochastic_gradients(objective, z, q, "nsvq", draws=draws,
                                  generator=torch.Generator().manual_seed(seed + 2))
    out = {"positions": objective.positions.tolist(), "scales": scales,
           "ste": det["ste"], "rotation": det["rotation"],
           "unquantized": G.unquantized(objective, z), "taylor": G.taylor(objective, z, q),
           "softmax": G.softmax_smoothed(objective, z, objective.codebook, tau_of(c, scales)),
           "gaussian": gauss.mean, "gaussian_se": gauss.se,
           "nsvq": nsvq.mean(0), "nsvq_se": (nsvq.var(0).sum(-1) / draws).sqrt()}
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------
# The record


def load_estimates(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of an estimates record (a last line cut off by an interruption is ignored)."""
    return _read(pathlib.Path(path))


def select(rows: Iterable[Mapping[str, Any]], **where: Any) -> list[dict[str, Any]]:
    """The rows whose fields equal the given values (a list or tuple means any of them);
    ``kind`` defaults to ``"compare"``."""
    where = {"kind": "compare", **where}

    def keep(row):
        for name, wanted in where.items():
            value = row.get(name)
            if isinstance(wanted, (list, tuple, set)) and not isinstance(value, (list, tuple)):
                if value not in wanted:
                    return False
            elif value != wanted:
                return False
        return True
    return [dict(r) for r in rows if keep(r)]


def _provenance(command: str) -> dict[str, Any]:
    return {"machine": machine(), "torch": torch.__version__, "command": command,
            "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _model_fields(name: str, run: Run) -> dict[str, Any]:
    return {"study": name, "key": run.key, "dataset": run.dataset,
            "latent_dim": run.config.latent_dim, "init_name": init_name(run.config),
            "trained_with": run.config.estimator, "steps": run.config.steps}


def _read(path: pathlib.Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a last line cut off by an interruption
    return rows


def _append(path: pathlib.Path, rows: Iterable[Mapping[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, separators=(",", ":"), allow_nan=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _selected(runs, only: Mapping[str, Sequence[str]]):
    for name, run in runs:
        fields = {"study": name, "key": run.key, "latent_dim": str(run.config.latent_dim),
                  "dataset": run.dataset, "init_name": init_name(run.config),
                  "trained_with": run.config.estimator}
        if all(fields[k] in v for k, v in only.items()):
            yield name, run


def _parse_only(items: Sequence[str]) -> dict[str, list[str]]:
    only: dict[str, list[str]] = {}
    for item in items:
        key, _, values = item.partition("=")
        if key not in ("study", "key", "latent_dim", "dataset", "init_name", "trained_with") or not values:
            raise SystemExit(f"--only takes FIELD=V1,V2 with FIELD one of study, key, latent_dim, "
                             f"dataset, init_name, trained_with; got {item!r}")
        only.setdefault(key, []).extend(values.split(","))
    return only


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rotvq.lab.estimates",
                                     description="The record of the chapter on what the estimators estimate.")
    parser.add_argument("action", choices=("snapshots", "check", "run", "live", "status"))
    parser.add_argument("--records", type=pathlib.Path, default=pathlib.Path("book/records"))
    parser.add_argument("--snapshots", type=pathlib.Path, default=pathlib.Path(".snapshots/estimates"))
    parser.add_argument("--only", nargs="+", default=[], metavar="FIELD=V1,V2")
    parser.add_argument("--steps", nargs="+", type=int, default=None,
                        help="only these evaluation steps (default: every one)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    command = "python -m rotvq.lab.estimates " + " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    runs = list(_selected(kept_runs(), _parse_only(args.only)))
    path = args.records / "estimates.jsonl"
    if args.action == "snapshots":
        for name, run in runs:
            have = all(snapshot_path(args.snapshots, name, run.key, s).is_file() for s in run.evals)
            if have:
                continue
            start = time.perf_counter()
            result = make_snapshots(name, run, args.snapshots, args.records)
            print(f"{name} {run.key} ({run.config.estimator}, {init_name(run.config)}, "
                  f"d = {run.config.latent_dim}): {time.perf_counter() - start:.0f} s, {result}",
                  flush=True)
            (args.snapshots / name / f"{run.key}-check.json").write_text(json.dumps(result))
        return 0
    rows = _read(path)
    done = {(r["key"], r["step"]) for r in rows if r.get("kind") == "compare"}
    if args.action == "status":
        todo = [(name, run, s) for name, run in runs for s in run.evals if (run.key, s) not in done]
        seconds = sum(r.get("seconds", 0) for r in rows)
        print(f"{len(done)} model-steps recorded, {len(todo)} to do; {seconds / 60:.1f} CPU minutes so far")
        return 0
    if args.action == "live":
        name, run = next((n, r) for n, r in kept_runs() if n == LIVE["study"]
                         and r.config.estimator == "ste" and init_name(r.config) == "small")
        rows = [r for r in rows if r.get("kind") != "live"]
        model = load_model(name, run, run.config.steps, args.snapshots, args.records)
        values = live_values(model, _data(run.dataset, run.config.model)[1],
                             **{k: v for k, v in LIVE.items() if k != "study"})
        rows.append({"kind": "live", **_model_fields(name, run), "step": run.config.steps,
                     "settings": LIVE, "values": values, **_provenance(command)})
        path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
        return 0
    if args.action == "check":
        kept = {r["key"]: r for r in rows if r.get("kind") == "retrain"}
        for name, run in runs:
            kept[run.key] = {"kind": "retrain", **_model_fields(name, run),
                             **check_snapshots(name, run, args.snapshots, args.records),
                             **_provenance(command)}
        rows = [r for r in rows if r.get("kind") != "retrain"] + list(kept.values())
        path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
        for r in kept.values():
            print(r["key"], r["trained_with"], r["init_name"], r["latent_dim"], r["record"], r["kept"])
        return 0
    for name, run in runs:
        x_test = _data(run.dataset, run.config.model)[1]
        for step in run.evals:
            if (run.key, step) in done or (args.steps and step not in args.steps):
                continue
            size = SIZES[(run.dataset, run.config.latent_dim)]
            start = time.perf_counter()
            print(f"{name} {run.key} {run.config.estimator} {init_name(run.config)} "
                  f"d={run.config.latent_dim} step {step}", file=sys.stderr, flush=True)
            model = load_model(name, run, step, args.snapshots, args.records)
            results = measure(model, x_test, size, progress=True)
            _append(path, [{"kind": "compare", **_model_fields(name, run), "step": step,
                            **result, **_provenance(command)} for result in results])
            print(f"  {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
