"""Studies: declared grids of training runs, kept as results of record in the repository.

Training runs in float32 are not bitwise portable: another CPU (other vector instructions,
another BLAS code path, another thread count) changes the rounding, and a chaotic training
run carries that change into the third digit of its final metrics.  So the book does not
retrain its experiments on the reader's machine and compare the printed numbers.  It reads
them from a *record*: a JSON-lines file per study (``book/records/<study>.jsonl``), made once
by the command below, with one row per run.  A chapter computes its verdicts from the
record, and a small live part retrains a few of the record's runs and checks them against it
within a tolerance set by the record's own seed-to-seed spread (:func:`check_live`).

A study is a named list of :class:`Run` s (:data:`STUDIES`): a dataset, a full
:class:`~rotvq.lab.training.TrainConfig` and the steps at which the model is evaluated on
the held-out split.  Because the learning rate is constant, the model after ``s`` steps of a
long run is exactly the model of an ``s``-step run (:func:`rotvq.lab.training.train`'s
``callback`` runs outside its random state), so one run gives the results of every shorter
run at its evaluation steps.

Each row holds:

* ``key`` (a hash of what defines the run), ``study``, ``dataset``, ``evals`` (the
  evaluation steps) and ``config`` (every :class:`TrainConfig` field, explicit);
* ``test``: ``{step: {metric: value}}``, :func:`~rotvq.lab.training.evaluate` on the test
  split at every evaluation step (full precision);
* ``first``: the training batch's metrics at step 0 (after the codebook initialisation);
* ``curves``: the training-batch metrics of :data:`CURVE_METRICS` averaged over blocks of
  ``curve_block`` steps (5 significant digits; for figures);
* ``error``: ``null``, or the message of a run that diverged (``FloatingPointError``);
* ``wall_time_s``, ``threads``, ``machine`` (CPU, its vector capability, platform),
  ``torch``, ``rotvq``, ``command`` and ``finished`` (UTC).

Running a study (``python -m rotvq.lab.study run NAME``, console script ``rotvq-study``)
trains every run the record does not hold yet, in parallel worker processes of one thread
each, with a progress bar, and appends each finished run to the record at once: an
interrupted study loses only the runs in flight, and running the command again finishes it.
``--only FIELD=V1,V2`` restricts a command to a named subset, and ``--force`` retrains that
subset and replaces its rows.  The record is rewritten in the study's declared order at
the end, so that regenerating it gives a stable file.  Where a run was declared with
``keep_weights``, its trained ``state_dict`` is saved beside the record
(``weights/<study>/<key>.pt``).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import math
import multiprocessing
import os
import pathlib
import platform
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .._checks import check_positive_int
from . import datasets
from .training import METRICS, TrainConfig, build_model, check_field, evaluate, field_type, train

__all__ = ["Run", "Record", "STUDIES", "study", "run_study", "load_record", "retrain",
           "check_live", "LiveCheck", "LIVE_RUNS", "LIVE_METRICS", "seed_range", "tolerance", "resolution", "CURVE_METRICS", "machine", "main"]

#: Training-batch metrics whose block means are kept as curves.
CURVE_METRICS = ("recon_loss", "codebook_loss", "usage", "perplexity", "z_norm", "q_norm")
#: Points per curve (block means).
CURVE_POINTS = 100
_DATASETS = ("digits", "patches")


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a study: train ``config`` on ``dataset`` and evaluate at ``evals``.

    Attributes:
        dataset: ``"digits"`` or ``"patches"`` (embedded; :mod:`rotvq.lab.datasets`).
        config: the full configuration; ``config.steps`` is the last evaluation step.
        evals: increasing steps (1 .. ``config.steps``) at which the test split is evaluated;
            ``config.steps`` is always one of them.
        keep_weights: save the trained model's ``state_dict`` beside the record.
    """

    dataset: str
    config: TrainConfig
    evals: tuple[int, ...] = ()
    keep_weights: bool = False

    def __post_init__(self) -> None:
        if self.dataset not in _DATASETS:
            raise ValueError(f"Run.dataset must be one of {_DATASETS}, got {self.dataset!r}")
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"Run.config must be a TrainConfig, got {type(self.config).__name__}")
        evals = tuple(sorted({*self.evals, self.config.steps}))
        for step in evals:
            if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= self.config.steps:
                raise ValueError(f"Run.evals must be steps in 1..{self.config.steps}, got {step!r}")
        object.__setattr__(self, "evals", evals)

    @property
    def key(self) -> str:
        """A hash of what defines the run's results: dataset, config and evaluation steps."""
        spec = {"dataset": self.dataset, "config": self.config.to_dict(), "evals": list(self.evals)}
        return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


#: The value of every TrainConfig field that a study does not set itself, written out: a
#: study's runs (and so its record's keys) must not change when a default of TrainConfig
#: does (a new field needs an entry here, with the value that leaves old runs unchanged).
STUDY_DEFAULTS: dict[str, Any] = dict(
    steps=2000, batch_size=128, lr=1e-3, optimizer="adam", weight_decay=0.0, grad_clip=None,
    seed=0, device="cpu", log_every=100, estimator="rotation", distance="euclidean",
    init="normal", init_scale=1.0, beta=1.0, gamma=0.25, ema=False, decay=0.99,
    dead_code_threshold=0.0, model="mlp", hidden=128, latent_dim=8, codebook_size=64,
    num_latents=4, downsamples=1, encoder_scale=1.0, encoder_norm=None)


def _configs(base: Mapping[str, Any], axes: Mapping[str, Sequence[Any]]) -> list[TrainConfig]:
    """Every combination of ``axes`` over :data:`STUDY_DEFAULTS` updated with ``base``
    (seed innermost, as the experiment CLI)."""
    from .experiment import expand_grid  # the CLI's grid order, one definition

    return expand_grid({k: list(v) for k, v in axes.items()}, TrainConfig(**{**STUDY_DEFAULTS, **base}))


# ----------------------------------------------------------------------------------------
# The declared studies

#: The codebook initialisations of the scaling study, by name (:func:`init_fields`):
#: ``small``: uniform on [-1/K, 1/K] (taming-transformers' VectorQuantizer2), so |q| << |z|;
#: ``kmeans``: k-means on the first batch; ``layer``: :class:`rotvq.VectorQuantizer`'s own
#: defaults, k-means with the automatic dead-code rule; ``small_reset``: small codes with the
#: automatic dead-code rule (the ablation of the idle codes that small codes leave).
INIT_NAMES = ("small", "kmeans", "layer", "small_reset")


def init_fields(init: str, codebook_size: int) -> dict[str, Any]:
    """The :class:`TrainConfig` fields (``init``, ``init_scale``, ``dead_code_threshold``)
    of the named initialisation for ``codebook_size`` codes (see :data:`INIT_NAMES`)."""
    small = dict(init="uniform", init_scale=1.0 / codebook_size)
    fields = {"small": {**small, "dead_code_threshold": 0.0},
              "kmeans": dict(init="kmeans", init_scale=1.0, dead_code_threshold=0.0),
              "layer": dict(init="kmeans", init_scale=1.0, dead_code_threshold=None),
              "small_reset": {**small, "dead_code_threshold": None}}
    if init not in fields:
        raise ValueError(f"init must be one of {INIT_NAMES}, got {init!r}")
    return fields[init]


def init_name(config: TrainConfig | Mapping[str, Any]) -> str:
    """The name in :data:`INIT_NAMES` of a config's initialisation, or ``"other"``."""
    c = config.to_dict() if isinstance(config, TrainConfig) else config
    for name in INIT_NAMES:
        if all(c[k] == v for k, v in init_fields(name, c["codebook_size"]).items()):
            return name
    return "other"


DIGITS_ESTIMATORS = ("ste", "rotation", "rotation_unscaled", "rotation_clipped",
                     "rotation_interp", "rotation_tangent")
CONV_ESTIMATORS = ("ste", "rotation", "rotation_unscaled")


def _grid(dataset: str, base: Mapping[str, Any], evals: tuple[int, ...], inits: Sequence[str],
          axes: Mapping[str, Sequence[Any]]) -> list[Run]:
    runs = []
    for init in inits:
        fields = {**base, **init_fields(init, base["codebook_size"])}
        for config in _configs(fields, axes):
            runs.append(Run(dataset, config, evals, keep_weights=_keep(dataset, config, init)))
    return runs


def _scaling_digits() -> list[Run]:
    """The MLP VQ-VAE on the embedded digits at d = 8, K = 64 (300 runs of 2,000 steps)."""
    base = dict(model="mlp", hidden=128, latent_dim=8, codebook_size=64, num_latents=4,
                steps=2000, batch_size=128, lr=1e-3, beta=1.0)
    evals, seeds = (400, 1000, 2000), range(5)
    return (_grid("digits", base, evals, ("small", "kmeans"),
                  {"estimator": DIGITS_ESTIMATORS, "gamma": (0.0, 0.25, 1.0, 4.0), "seed": seeds})
            + _grid("digits", base, evals, ("small",),
                    {"estimator": ("ste", "rotation"), "gamma": (16.0,), "seed": seeds})
            + _grid("digits", base, evals, ("layer",),
                    {"estimator": DIGITS_ESTIMATORS, "gamma": (0.25,), "seed": seeds})
            + _grid("digits", base, evals, ("small_reset",),
                    {"estimator": ("ste", "rotation"), "gamma": (0.25, 1.0), "seed": seeds}))


def _scaling_patches() -> list[Run]:
    """The convolutional VQ-VAE on the embedded 8x8 RGB patches at d = 8, 32, 128 with
    K = 512 (180 runs of 1,000 steps)."""
    base = dict(model="conv", hidden=128, downsamples=1, codebook_size=512, steps=1000,
                batch_size=128, lr=1e-3, beta=1.0)
    evals, seeds = (100, 250, 500, 1000), range(3)
    runs = []
    for d in (8, 32, 128):
        runs += _grid("patches", {**base, "latent_dim": d}, evals, ("small", "kmeans", "layer"),
                      {"estimator": CONV_ESTIMATORS, "gamma": (0.25, 1.0), "seed": seeds})
        runs += _grid("patches", {**base, "latent_dim": d}, evals, ("small_reset",),
                      {"estimator": ("ste", "rotation"), "gamma": (0.25,), "seed": seeds})
    return runs


def _keep(dataset: str, config: TrainConfig, init: str) -> bool:
    """The trained weights kept (for the chapter on what the estimators estimate): seed 0 of
    the STE and the rotation trick at gamma = 1/4 with small and with k-means codes, on the
    digits and on the patches at d = 8 and 128."""
    return (config.seed == 0 and config.estimator in ("ste", "rotation") and config.gamma == 0.25
            and init in ("small", "kmeans") and (dataset == "digits" or config.latent_dim in (8, 128)))


#: The declared studies: name -> function returning its runs, in their record order.
STUDIES: dict[str, Callable[[], list[Run]]] = {
    "scaling-digits": _scaling_digits,
    "scaling-patches": _scaling_patches,
}


def study(name: str) -> list[Run]:
    """The runs of the declared study ``name``."""
    if name not in STUDIES:
        raise ValueError(f"no study {name!r}; the studies are {sorted(STUDIES)}")
    return STUDIES[name]()


# ----------------------------------------------------------------------------------------
# Running one run (in a worker process)

def machine() -> dict[str, Any]:
    """What made a result: CPU model, ATen's vector capability, platform, versions."""
    import rotvq

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "rotvq": rotvq.__version__}


_DATA_CACHE: dict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor]] = {}


def _data(dataset: str, model: str) -> tuple[torch.Tensor, torch.Tensor]:
    flatten = model == "mlp"
    if (dataset, flatten) not in _DATA_CACHE:
        loader = datasets.load_digits if dataset == "digits" else datasets.load_patches
        _DATA_CACHE[dataset, flatten] = (loader("train", flatten=flatten).x,
                                         loader("test", flatten=flatten).x)
    return _DATA_CACHE[dataset, flatten]


def _sig(value: float, digits: int = 5) -> float:
    return float(f"{value:.{digits}g}") if math.isfinite(value) else value


def _curves(history, steps: int) -> dict[str, Any]:
    block = max(1, steps // CURVE_POINTS)
    n = len(history) // block * block
    out: dict[str, Any] = {"block": block}
    for name in CURVE_METRICS:
        values = np.asarray(history[name][:n], dtype=np.float64).reshape(-1, block).mean(1)
        out[name] = [_sig(v) for v in values]
    return out


def _train_run(run: Run, threads: int = 1, weights_path: str | None = None,
               stop_at: int | None = None) -> dict[str, Any]:
    """Train and evaluate one run in this process; the record row without provenance.

    ``stop_at``: train only that many steps (an evaluation step of the run) and evaluate
    there; what :func:`retrain` uses."""
    torch.set_num_threads(threads)
    x_train, x_test = _data(run.dataset, run.config.model)
    config = run.config if stop_at is None else dataclasses.replace(run.config, steps=stop_at)
    evals = [s for s in run.evals if s <= config.steps]
    test: dict[str, dict[str, float]] = {}
    model = build_model(config, x_train)

    def at_step(done: int, trained: torch.nn.Module) -> None:
        if done in evals:
            test[str(done)] = evaluate(trained, x_test)

    start = time.perf_counter()
    error = None
    history = None
    try:
        history = train(model, x_train, config, progress=False, callback=at_step)
    except FloatingPointError as exc:  # a diverged run is a result, not a crash
        error = str(exc)
    row = {"test": test, "error": error, "wall_time_s": round(time.perf_counter() - start, 2),
           "threads": threads}
    if history is not None:
        row["first"] = {k: history[k][0] for k in METRICS}
        row["curves"] = _curves(history, config.steps)
        if weights_path is not None:
            pathlib.Path(weights_path).parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), weights_path)
    return row


def _worker(run: Run, threads: int, weights_path: str | None) -> tuple[str, dict[str, Any]]:
    return run.key, _train_run(run, threads, weights_path)


# ----------------------------------------------------------------------------------------
# The record

class Record:
    """The rows of a study's record, with selection by configuration.

    ``Record.rows`` is the list of row dicts (see the module docstring).  Selections name
    :class:`TrainConfig` fields, ``dataset`` or ``init_name`` (a name of :data:`INIT_NAMES`).
    """

    def __init__(self, rows: Iterable[Mapping[str, Any]]) -> None:
        self.rows = [dict(r) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    @staticmethod
    def _attribute(row: Mapping[str, Any], name: str) -> Any:
        if name == "dataset":
            return row["dataset"]
        if name == "init_name":
            return init_name(row["config"])
        if name in row["config"]:
            return row["config"][name]
        raise KeyError(f"rows have no field {name!r}")

    def select(self, **where: Any) -> "Record":
        """The rows whose fields equal the given values (a list or tuple means any of them)."""
        def keep(row):
            for name, wanted in where.items():
                value = self._attribute(row, name)
                if isinstance(wanted, (list, tuple, set)):
                    if value not in wanted:
                        return False
                elif value != wanted:
                    return False
            return True
        return Record(r for r in self.rows if keep(r))

    def values(self, metric: str, step: int | None = None, **where: Any) -> np.ndarray:
        """The test ``metric`` at ``step`` (default: each run's last) of the selected rows,
        ordered by seed; diverged runs give NaN."""
        rows = sorted(self.select(**where).rows, key=lambda r: r["config"]["seed"])
        if not rows:
            raise KeyError(f"no rows with {where}")
        out = []
        for r in rows:
            s = str(step if step is not None else r["config"]["steps"])
            if r["error"] is not None and s not in r["test"]:
                out.append(math.nan)
            elif s not in r["test"]:
                raise KeyError(f"run {r['key']} was not evaluated at step {s}; its steps are "
                               f"{list(r['test'])}")
            else:
                out.append(r["test"][s][metric])
        return np.asarray(out, dtype=np.float64)

    def distinct(self, name: str) -> list[Any]:
        """The distinct values of a field over the rows, in first-seen order."""
        return list(dict.fromkeys(self._attribute(r, name) for r in self.rows))

    def by_key(self) -> dict[str, dict[str, Any]]:
        return {r["key"]: r for r in self.rows}

    def provenance(self) -> dict[str, Any]:
        """What made the record: machines, torch versions, commands, dates and total time."""
        return {
            "machines": sorted({r["machine"]["cpu"] for r in self.rows}),
            "capabilities": sorted({r["machine"]["cpu_capability"] for r in self.rows}),
            "torch": sorted({r["machine"]["torch"] for r in self.rows}),
            "commands": sorted({r["command"] for r in self.rows}),
            "first": min(r["finished"] for r in self.rows),
            "last": max(r["finished"] for r in self.rows),
            "runs": len(self.rows),
            "cpu_seconds": sum(r["wall_time_s"] * r["threads"] for r in self.rows),
        }


def load_record(path: str | os.PathLike) -> Record:
    """Read a record (JSON lines).  A last line cut off by an interruption is ignored; a
    damaged line anywhere else raises ``ValueError`` naming it."""
    path = pathlib.Path(path)
    rows = []
    if not path.is_file():
        return Record(rows)
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):  # cut off mid-write: that run is simply not done
                break
            raise ValueError(f"{path}:{number}: not a JSON row ({error})") from None
    return Record(rows)


def _provenance(command: str) -> dict[str, Any]:
    return {"machine": machine(), "command": command,
            "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _row(name: str, run: Run, result: Mapping[str, Any], command: str) -> dict[str, Any]:
    return {"key": run.key, "study": name, "dataset": run.dataset, "evals": list(run.evals),
            "config": run.config.to_dict(), **result, **_provenance(command)}


def _write(path: pathlib.Path, rows: Sequence[Mapping[str, Any]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def _matches(run: Run, only: Mapping[str, Sequence[Any]]) -> bool:
    for name, wanted in only.items():
        if name == "dataset":
            value = run.dataset
        elif name == "init_name":
            value = init_name(run.config)
        else:
            value = getattr(run.config, name)
        if value not in wanted:
            return False
    return True


def weights_path(records: str | os.PathLike, name: str, key: str) -> pathlib.Path:
    """Where the kept weights of run ``key`` of study ``name`` are saved."""
    return pathlib.Path(records) / "weights" / name / f"{key}.pt"


def run_study(name: str, records: str | os.PathLike, *, only: Mapping[str, Sequence[Any]] | None = None,
              force: bool = False, workers: int = 1, threads: int = 1, command: str = "",
              progress: bool = True, runs: Sequence[Run] | None = None) -> Record:
    """Train the runs of study ``name`` that ``records/<name>.jsonl`` does not hold yet.

    Args:
        name: a study of :data:`STUDIES`.
        records: the folder of the records.
        only: restrict to runs whose fields (``dataset``, ``init_name`` or a TrainConfig field)
            take one of the given values.
        force: retrain the selected runs even if recorded, replacing their rows.
        workers: parallel worker processes (each runs ``threads`` torch threads).
        command: the command line stored in each new row.
        progress: show a progress bar over runs (stderr).
        runs: the runs to use instead of the declared study (tests).

    Returns:
        The whole record after the run, in the study's declared order.
    """
    check_positive_int("workers", workers)
    check_positive_int("threads", threads)
    declared = list(runs) if runs is not None else study(name)
    only = {k: list(v) for k, v in (only or {}).items()}
    for field in only:
        if field not in ("dataset", "init_name") and field not in TrainConfig.__dataclass_fields__:
            raise ValueError(f"--only: unknown field {field!r}")
    records = pathlib.Path(records)
    records.mkdir(parents=True, exist_ok=True)
    path = records / f"{name}.jsonl"
    held = load_record(path).by_key()
    selected = [r for r in declared if _matches(r, only)]
    todo = [r for r in selected if force or r.key not in held]
    if force:
        for r in todo:
            held.pop(r.key, None)
    _write(path, list(held.values()))  # drops a cut-off last line before appending
    bar = tqdm(total=len(selected), initial=len(selected) - len(todo), unit="run", file=sys.stderr,
               disable=not progress, dynamic_ncols=True, desc=name)
    try:
        with open(path, "a", encoding="utf-8") as handle, bar:
            def finished(run: Run, result: Mapping[str, Any]) -> None:
                row = _row(name, run, result, command)
                handle.write(json.dumps(row, separators=(",", ":")) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
                held[run.key] = row
                bar.update(1)

            def kept(run: Run) -> str | None:
                return str(weights_path(records, name, run.key)) if run.keep_weights else None

            if workers == 1:
                for run in todo:
                    finished(run, _train_run(run, threads, kept(run)))
            else:
                context = multiprocessing.get_context("spawn")  # no forked torch threads
                with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                    futures = {pool.submit(_worker, run, threads, kept(run)): run for run in todo}
                    try:
                        for future in concurrent.futures.as_completed(futures):
                            _, result = future.result()
                            finished(futures[future], result)
                    except BaseException:
                        for future in futures:
                            future.cancel()
                        raise
    finally:
        order = {r.key: i for i, r in enumerate(declared)}
        rows = sorted(held.values(), key=lambda r: order.get(r["key"], len(order)))
        _write(path, rows)
    return Record(rows)


# ----------------------------------------------------------------------------------------
# Live reproduction against the record

def retrain(row: Mapping[str, Any], step: int, *, threads: int = 1) -> dict[str, float]:
    """Retrain a recorded run on this machine for ``step`` steps (one of its evaluation
    steps) and return its test metrics there, to compare with ``row["test"][str(step)]``."""
    config = TrainConfig.from_dict(row["config"])
    run = Run(row["dataset"], config, tuple(row["evals"]))
    if run.key != row["key"]:
        raise ValueError(f"row {row['key']} does not match its own configuration "
                         f"(key {run.key}): the TrainConfig schema changed since it was recorded")
    if step not in run.evals:
        raise ValueError(f"step must be one of the run's evaluation steps {run.evals}, got {step!r}")
    with torch.random.fork_rng(devices=[]):
        result = _train_run(run, threads, None, stop_at=step)
    if result["error"] is not None:
        raise FloatingPointError(result["error"])
    return result["test"][str(step)]


#: The runs each chapter retrains live (seed 0; first evaluation step), by record. The
#: scaling chapter's check and ``tools/live_emulation.py`` both read this list.
LIVE_RUNS: dict[str, tuple[dict[str, Any], ...]] = {
    "scaling": (
        dict(dataset="digits", init_name="small", gamma=0.25, estimator="ste", seed=0),
        dict(dataset="digits", init_name="small", gamma=0.25, estimator="rotation", seed=0),
        dict(dataset="digits", init_name="kmeans", gamma=1.0, estimator="rotation", seed=0),
        dict(dataset="patches", latent_dim=8, init_name="small", gamma=0.25,
             estimator="rotation", seed=0),
    ),
}
#: The metrics a live check compares.
LIVE_METRICS = ("recon_loss", "codebook_loss", "usage", "perplexity", "z_norm", "q_norm")


@dataclasses.dataclass
class LiveCheck:
    """The outcome of :func:`check_live`: one entry per (run, metric).

    Attributes:
        entries: dicts with ``key``, ``label``, ``metric``, ``record`` (the recorded value),
            ``live``, ``tolerance`` and ``ok`` (``|live - record| <= tolerance``).
    """

    entries: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        return all(e["ok"] for e in self.entries)

    def failures(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if not e["ok"]]

    def worst(self) -> float:
        """The largest ``|live - record| / tolerance`` (0 where both are 0)."""
        return max((abs(e["live"] - e["record"]) / e["tolerance"] if e["tolerance"] else
                    (0.0 if e["live"] == e["record"] else math.inf)) for e in self.entries)


def seed_range(record: Record, row: Mapping[str, Any], metric: str, step: int) -> float:
    """The spread (max - min) of ``metric`` at ``step`` over the recorded seeds of ``row``'s
    configuration (every field equal but the seed)."""
    fixed = {k: v for k, v in row["config"].items() if k != "seed"}
    values = record.values(metric, step, dataset=row["dataset"], **fixed)
    if len(values) < 2:
        raise ValueError(f"run {row['key']}: its configuration has {len(values)} recorded seed(s); "
                         "a seed spread needs two or more")
    return float(np.nanmax(values) - np.nanmin(values))


def resolution(metric: str, config: Mapping[str, Any]) -> float:
    """The smallest change a metric can show: ``1 / K`` for ``usage`` (a count of codes over
    ``K``), 0 for the continuous metrics."""
    return 1.0 / config["codebook_size"] if metric == "usage" else 0.0


#: Expected range of n independent standard normal draws (the d2 constants of quality
#: control): the seed spread of n runs is about ``RANGE_OF_NORMALS[n]`` standard deviations.
RANGE_OF_NORMALS = {2: 1.128, 3: 1.693, 4: 2.059, 5: 2.326, 6: 2.534, 7: 2.704, 8: 2.847,
                    9: 2.970, 10: 3.078}
#: Two-sided normal quantile of the live check: a false alarm on one metric has probability
#: about 0.1 % when the rerun is as different as another seed.
LIVE_Z = 3.29


def tolerance(record: Record, row: Mapping[str, Any], metric: str, step: int) -> float:
    """How far a live rerun of ``row`` may land from its recorded value.

    The worst case the check allows for: another CPU changes the rounding from the first
    step, and training carries that change until the rerun is as different from the record
    as a run from another seed.  The difference of two independent seeds has standard
    deviation ``sqrt(2) * sigma``; ``sigma`` is estimated from the record's spread over the
    ``n`` seeds of the configuration (:func:`seed_range`) as ``range / d_n``
    (:data:`RANGE_OF_NORMALS`); the tolerance is :data:`LIVE_Z` such standard deviations,
    ``3.29 * sqrt(2) / d_n * range`` (2.0 ranges for five seeds, 2.7 for three), and never
    less than the metric's :func:`resolution` (where every seed used every code, the spread
    of ``usage`` is 0, yet one code more or less is the smallest difference a rerun shows).
    """
    fixed = {k: v for k, v in row["config"].items() if k != "seed"}
    n = len(record.values(metric, step, dataset=row["dataset"], **fixed))
    if n not in RANGE_OF_NORMALS:
        raise ValueError(f"a tolerance needs 2 to 10 recorded seeds, the configuration has {n}")
    spread = seed_range(record, row, metric, step)
    return max(LIVE_Z * math.sqrt(2.0) / RANGE_OF_NORMALS[n] * spread, resolution(metric, row["config"]))


def check_live(record: Record, keys: Sequence[str], step: int, metrics: Sequence[str], *,
               retrain_fn: Callable[[Mapping[str, Any], int], Mapping[str, float]] = retrain,
               labels: Mapping[str, str] | None = None) -> LiveCheck:
    """Retrain the recorded runs ``keys`` for ``step`` steps here and compare each metric
    with the record.

    The tolerance of a metric is set by the record's spread over the seeds of that run's
    configuration (:func:`tolerance`): a rerun on other hardware starts from the same
    seed, and its rounding differences may grow during training, at most, one assumes,
    until it differs from the record as a run from another seed would.  A changed estimator or training loop moves a run by
    more than that wherever the estimators differ by more than their seed spread.
    """
    by_key = record.by_key()
    entries = []
    for key in keys:
        row = by_key[key]
        live = retrain_fn(row, step)
        for metric in metrics:
            recorded = row["test"][str(step)][metric]
            allowed = tolerance(record, row, metric, step)
            entries.append({"key": key, "label": (labels or {}).get(key, key), "metric": metric,
                            "record": recorded, "live": float(live[metric]), "tolerance": allowed,
                            "ok": abs(float(live[metric]) - recorded) <= allowed})
    return LiveCheck(entries)


# ----------------------------------------------------------------------------------------
# Command line

def _parse_only(items: Sequence[str]) -> dict[str, list[Any]]:
    only: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"--only takes FIELD=V1,V2,..., got {item!r}")
        name, text = item.split("=", 1)
        values: list[Any] = []
        for part in text.split(","):
            if name in ("dataset", "init_name"):
                values.append(part)
                continue
            if name not in TrainConfig.__dataclass_fields__:
                raise argparse.ArgumentTypeError(f"--only: unknown field {name!r}")
            base, optional = field_type(name)
            if optional and part.lower() == "none":
                value = None
            elif base is bool:
                value = part.lower() in ("1", "true", "yes")
            else:
                try:
                    value = base(part)
                except ValueError:
                    raise argparse.ArgumentTypeError(f"--only {name}: expected {base.__name__}, "
                                                     f"got {part!r}") from None
            values.append(check_field(name, value))
        only.setdefault(name, []).extend(values)
    return only


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rotvq-study",
        description="Run the declared studies of rotvq.lab.study and keep their results of "
                    "record (one JSON line per run).",
        epilog="examples:\n"
               "  rotvq-study list\n"
               "  rotvq-study run scaling-digits --workers 2\n"
               "  rotvq-study run scaling-patches --only latent_dim=8 estimator=ste,rotation init_name=small\n"
               "  rotvq-study run scaling-digits --only seed=0 --force   # regenerate a subset\n"
               "  rotvq-study status scaling-patches",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="the declared studies and their sizes")
    for action, text in (("run", "train what the record does not hold yet"),
                         ("status", "how many runs are recorded, pending, and their cost so far")):
        p = sub.add_parser(action, help=text)
        p.add_argument("name", choices=sorted(STUDIES))
        p.add_argument("--records", type=pathlib.Path, default=pathlib.Path("book/records"),
                       help="folder of the records (default: %(default)s)")
        p.add_argument("--only", nargs="+", default=[], metavar="FIELD=V1,V2",
                       help="restrict to runs whose field (dataset, init_name (small, kmeans, layer) or a "
                            "TrainConfig field) "
                            "takes one of the values")
        if action == "run":
            p.add_argument("--force", action="store_true",
                           help="retrain the selected runs even if recorded")
            p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
            p.add_argument("--threads", type=int, default=1,
                           help="torch threads per worker (default 1)")
            p.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.action == "list":
        for name in STUDIES:
            runs = study(name)
            steps = sum(r.config.steps for r in runs)
            print(f"{name}: {len(runs)} runs, {steps:,} training steps")
        return 0
    try:
        only = _parse_only(args.only)
    except (argparse.ArgumentTypeError, ValueError) as error:
        parser.error(str(error))
    if args.action == "status":
        held = load_record(args.records / f"{args.name}.jsonl").by_key()
        runs = [r for r in study(args.name) if _matches(r, only)]
        done = [held[r.key] for r in runs if r.key in held]
        seconds = sum(r["wall_time_s"] * r["threads"] for r in done)
        print(f"{args.name}: {len(done)} of {len(runs)} runs recorded, "
              f"{sum(r['error'] is not None for r in done)} diverged; "
              f"{seconds / 3600:.2f} CPU hours so far")
        return 0
    command = "rotvq-study " + " ".join(argv)
    try:
        run_study(args.name, args.records, only=only, force=args.force, workers=args.workers,
                  threads=args.threads, command=command, progress=not args.no_progress)
    except ValueError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
