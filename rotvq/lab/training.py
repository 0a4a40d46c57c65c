"""A small, deterministic training loop for the VQ-VAEs of :mod:`rotvq.lab.models`.

* :class:`TrainConfig` -- everything that defines a run (optimisation, quantizer, model).
  It is the lab's one schema: each field carries its help text, its group and its allowed
  values in the field's metadata, and the command line of :mod:`rotvq.lab.experiment` is
  generated from it, so adding a knob is one edit here.
* :func:`build_model` -- the model a config describes, initialised from ``config.seed``.
* :func:`train` -- optimise a model, recording a per-step :class:`History`.
* :func:`evaluate` -- the same named metrics over a whole split, with the quantizer's own
  statistics.

One vocabulary of metrics.  Every per-step record, every CSV column and every
:func:`evaluate` result uses the names of :meth:`rotvq.lab.models.VQVAEOutput.metrics`
(:data:`METRICS`): ``loss``, ``recon_loss``, ``vq_loss`` and the keys of
:meth:`rotvq.VQOutput.metrics` (``codebook_loss``, ``commitment_loss``, ``usage``,
``perplexity``, ``z_norm``, ``q_norm``, ``quantization_error``).  Values are looked up by
name, never by position.

Determinism.  On the CPU, the same config (seed), data and thread count give a
bit-identical history: batches are drawn from a private :class:`torch.Generator` seeded
with ``config.seed``, and any use of torch's global generator inside the model (k-means
initialisation, dead-code restarts) happens under :func:`torch.random.fork_rng` seeded
with ``config.seed``, so the caller's global random state is left untouched.  CUDA
kernels may be nondeterministic; runs there are reproducible only up to rounding.

Data-parallel runs.  When a :mod:`torch.distributed` process group is initialised (for
example by ``torchrun``, see :mod:`rotvq.lab.experiment`), :func:`train` wraps the model
in :class:`~torch.nn.parallel.DistributedDataParallel` (no per-step buffer broadcast: the
quantizer synchronises its own statistics across ranks) and ``config.batch_size`` is the
*global* batch: every rank draws the same permutation as a one-process run would, and
rank ``r`` of ``W`` takes rows ``r*B/W .. (r+1)*B/W`` of each global batch
(:class:`GlobalBatchSampler`).  The losses are means over equal shards, DDP averages the
gradients, so the update is the one-process update with the global batch up to floating
point summation order; the recorded metrics are averaged over ranks (exact for the
means; ``usage`` and ``perplexity`` are global when the quantizer all-reduces its code
counts, otherwise they are the mean of the ranks' values).

Progress.  ``train(..., progress=None)`` (the default) shows a tqdm progress bar on
stderr only when stderr is a terminal and the run has at least
:data:`AUTO_PROGRESS_STEPS` steps.  In notebooks (and so under nbval) stderr is not a
terminal, so training is quiet; pass ``progress=True`` to force the bar or
``progress=False`` to silence it.  In a data-parallel run only rank 0 shows it.
"""
from __future__ import annotations

import csv
import dataclasses
import inspect
import math
import os
import pathlib
import sys
import time
import typing
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from tqdm import tqdm  # plain text bar: tqdm.auto warns in notebooks without ipywidgets

from .._checks import check_positive_int
from ..estimators import SURROGATE_NAMES
from ..quantizer import INITS
from ..search import DISTANCES
from .models import ConvVQVAE, MLPVQVAE, VQVAEOutput

__all__ = ["TrainConfig", "History", "GlobalBatchSampler", "build_model", "train", "evaluate",
           "METRICS", "check_field", "field_type"]

AUTO_PROGRESS_STEPS = 1000
OPTIMIZERS = ("adam", "adamw", "sgd")
MODELS = ("mlp", "conv")
# The names every per-step record, CSV column and evaluate() result uses, in this order
# (rotvq.lab.models.VQVAEOutput.metrics: the model's loss terms, then the quantizer's metrics()).
METRICS = ("loss", "recon_loss", "vq_loss", "codebook_loss", "commitment_loss", "usage",
           "perplexity", "z_norm", "q_norm", "quantization_error")

# Range checks a field can name in its metadata ("check"): (test, what the message says).
_CHECKS = {
    "positive": (lambda v: 0 < v < math.inf, "positive and finite"),
    "nonnegative": (lambda v: 0 <= v < math.inf, ">= 0 and finite"),
    "open_unit": (lambda v: 0 < v < 1, "in (0, 1)"),
}


def _field(default: Any, help: str, group: str, *, check: str | None = None,
           choices: tuple[str, ...] | None = None) -> Any:
    """A :class:`TrainConfig` field; ``help``, ``group``, ``check`` and ``choices`` go into its
    metadata, which both the validation and the command line read."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group,
                                                          "check": check, "choices": choices})


@dataclasses.dataclass
class TrainConfig:
    """One training run.  The quantizer and model fields are read by :func:`build_model`;
    :func:`train` reads only the optimisation fields (it trains the model it is given).

    Every field is type-checked (``int`` fields reject floats and bools, ``float`` fields
    accept ints and store floats, ``X | None`` fields accept ``None``) and range-checked by
    its metadata, with a ``ValueError`` naming the field.
    """

    # --- optimisation
    steps: int = _field(2000, "optimizer steps per run", "training", check="positive")
    batch_size: int = _field(128, "examples per step (the global batch in a data-parallel run); "
                                  "each epoch is a fresh permutation", "training", check="positive")
    lr: float = _field(1e-3, "learning rate", "training", check="positive")
    optimizer: str = _field("adam", "optimizer (sgd: plain, no momentum)", "training",
                            choices=OPTIMIZERS)
    weight_decay: float = _field(0.0, "weight decay passed to the optimizer", "training",
                                 check="nonnegative")
    grad_clip: float | None = _field(None, "max global gradient norm; none: no clipping",
                                     "training", check="positive")
    seed: int = _field(0, "model initialisation, batch order and the quantizer's randomness",
                       "training", check="nonnegative")
    device: str = _field("cpu", "torch device, e.g. cpu or cuda (in a data-parallel run: "
                                "cuda means each rank's cuda:LOCAL_RANK)", "training")
    log_every: int = _field(100, "steps between updates of the progress bar's loss readout",
                            "training", check="positive")
    # --- quantizer (rotvq.VectorQuantizer)
    estimator: str = _field("rotation", "gradient estimator", "quantizer", choices=SURROGATE_NAMES)
    distance: str = _field("euclidean", "nearest-code criterion", "quantizer", choices=DISTANCES)
    init: str = _field("kmeans", "codebook initialisation (kmeans: on the first batch, the layer's "
                                 "default; normal codes left the default run using 5 to 8 in 100 codes)",
                       "quantizer", choices=INITS)
    init_scale: float = _field(1.0, "std (normal) or half-width (uniform) of the initial codes; "
                                    "small values give |q| << |z|", "quantizer", check="positive")
    beta: float = _field(1.0, "codebook-loss weight |q - sg[z]|^2 (VectorQuantizer's "
                              "codebook_weight)", "quantizer", check="nonnegative")
    gamma: float = _field(0.25, "commitment-loss weight |z - sg[q]|^2 (VectorQuantizer's "
                                "commitment_weight)", "quantizer", check="nonnegative")
    ema: bool = _field(False, "learn the codebook by exponential moving averages", "quantizer")
    decay: float = _field(0.99, "EMA decay (codebook with ema, and the code-count statistics)",
                          "quantizer", check="open_unit")
    dead_code_threshold: float | None = _field(0.0, "restart codes whose EMA count falls below "
                                                    "this; 0: never; none: the layer's automatic "
                                                    "rule (the layer's default; 0 here because the "
                                                    "scaling chapter's live runs build on it)",
                                               "quantizer", check="nonnegative")
    # --- model (rotvq.lab.models)
    model: str = _field("mlp", "mlp (flat inputs) or conv (channel-first images)", "model",
                        choices=MODELS)
    hidden: int = _field(128, "hidden width (mlp) or channels (conv)", "model", check="positive")
    latent_dim: int = _field(8, "size of a latent / code vector", "model", check="positive")
    codebook_size: int = _field(64, "number of codes", "model", check="positive")
    num_latents: int = _field(4, "latent vectors per input (mlp only)", "model", check="positive")
    downsamples: int = _field(1, "stride-2 stages (conv only)", "model", check="nonnegative")
    encoder_scale: float = _field(1.0, "fixed gain on the encoder output", "model",
                                  check="positive")
    encoder_norm: float | None = _field(None, "if set, start training with mean |z| equal to "
                                              "this (first batch)", "model", check="positive")

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, check_field(field.name, getattr(self, field.name)))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """The config with these fields (e.g. read back from ``config.json``); unknown keys
        are an error."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {', '.join(unknown)}")
        return cls(**values)

    def vq_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`rotvq.VectorQuantizer`."""
        return dict(estimator=self.estimator, distance=self.distance, init=self.init,
                    init_scale=self.init_scale, codebook_weight=self.beta,
                    commitment_weight=self.gamma, ema=self.ema, decay=self.decay,
                    dead_code_threshold=self.dead_code_threshold)


def field_type(name: str) -> tuple[type, bool]:
    """``(base type, optional)`` of a :class:`TrainConfig` field, e.g. ``(float, True)`` for
    ``float | None``."""
    hint = typing.get_type_hints(TrainConfig)[name]
    args = typing.get_args(hint)
    if args:  # X | None
        (base,) = [a for a in args if a is not type(None)]
        return base, True
    return hint, False


def check_field(name: str, value: Any) -> Any:
    """``value`` checked (and, for ``float`` fields, converted to float) against the type
    and metadata of the :class:`TrainConfig` field ``name``.

    Raises:
        ValueError: unknown field, wrong type, a value outside the field's range or choices;
            the message names ``TrainConfig.<name>``.
    """
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if name not in fields:
        raise ValueError(f"TrainConfig has no field {name!r}")
    meta, (base, optional) = fields[name].metadata, field_type(name)
    where = f"TrainConfig.{name}"
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where} must not be None")
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be a bool, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an int, got {value!r}")
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        value = float(value)
    elif not isinstance(value, base):
        raise ValueError(f"{where} must be a {base.__name__}, got {value!r}")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ValueError(f"{where} must be one of {meta['choices']}, got {value!r}")
    if meta["check"] is not None:
        test, text = _CHECKS[meta["check"]]
        if not test(value):
            raise ValueError(f"{where} must be {text}{' or None' if optional else ''}, "
                             f"got {value!r}")
    return value


@dataclasses.dataclass
class History:
    """Per-step record of a run: ``step`` and one named column per metric.

    Every value is the training batch's value *before* that step's update (in a
    data-parallel run, the global batch's; see the module docstring).  Columns are read by
    name: ``history["recon_loss"]`` (a list), :meth:`to_dict`, :meth:`to_numpy`.
    """

    step: list[int] = dataclasses.field(default_factory=list)
    columns: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # TrainConfig.to_dict()
    world_size: int = 1  # processes that trained the model together
    wall_time: float = 0.0  # seconds spent in train()

    def __len__(self) -> int:
        return len(self.step)

    def __getitem__(self, name: str) -> list[float]:
        try:
            return self.columns[name]
        except KeyError:
            raise KeyError(f"no column {name!r}; the history has {list(self.columns)}") from None

    @property
    def names(self) -> tuple[str, ...]:
        """The metric names, in column order."""
        return tuple(self.columns)

    def append(self, step: int, values: Mapping[str, float]) -> None:
        """Record one step's named values; every step must have the same names."""
        if self.step and set(values) != set(self.columns):
            raise ValueError(f"step {step} has metrics {sorted(values)}, the history has "
                             f"{sorted(self.columns)}")
        self.step.append(int(step))
        for name, value in values.items():
            self.columns.setdefault(name, []).append(float(value))

    def to_dict(self) -> dict[str, list]:
        """``{"step": [...], "loss": [...], ...}`` (lists, one entry per recorded step)."""
        return {"step": list(self.step), **{name: list(v) for name, v in self.columns.items()}}

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Like :meth:`to_dict`, with NumPy arrays."""
        return {name: np.asarray(values) for name, values in self.to_dict().items()}

    def final(self, window: int = 1) -> dict[str, float]:
        """Mean of each metric over the last ``window`` recorded steps."""
        if not len(self):
            raise ValueError("empty history")
        check_positive_int("window", window)
        return {name: float(np.mean(values[-window:])) for name, values in self.columns.items()}

    def rows(self) -> Iterator[dict[str, float]]:
        """One dict per step: ``{"step": ..., <metric>: ...}``."""
        for i, step in enumerate(self.step):
            yield {"step": step, **{name: values[i] for name, values in self.columns.items()}}

    def to_csv(self, path: str | pathlib.Path, extra: dict[str, Any] | None = None) -> None:
        """Write one row per step (columns: ``extra``'s keys, ``step``, the metrics)."""
        extra = extra or {}
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[*extra, "step", *self.columns])
            writer.writeheader()
            for row in self.rows():
                writer.writerow({**extra, **row})


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Endless index batches for one rank of a data-parallel run (or for one process).

    Every rank draws the same shuffled epochs from a generator seeded with ``seed`` (the
    incomplete last batch of an epoch is dropped), cuts them into *global* batches of
    ``batch_size`` and yields its own contiguous shard of ``batch_size / world_size`` rows.
    With ``world_size = 1`` these are exactly the batches of a one-process run, so the
    shards of the ``W`` ranks at step ``t`` together are the one-process batch at step
    ``t``.  (torch's ``DistributedSampler`` reseeds every epoch and pads or drops per
    rank, which gives a different order from one process; this sampler keeps it.)
    """

    def __init__(self, n: int, batch_size: int, seed: int, *, rank: int = 0,
                 world_size: int = 1) -> None:
        for name, value in (("n", n), ("batch_size", batch_size), ("world_size", world_size)):
            check_positive_int(name, value)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by the world size "
                             f"{world_size}")
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} exceeds the {n} examples")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        local = self.batch_size // self.world_size
        lo, hi = self.rank * local, (self.rank + 1) * local
        while True:
            order = torch.randperm(self.n, generator=generator)
            for start in range(0, self.n - self.batch_size + 1, self.batch_size):
                yield order[start : start + self.batch_size][lo:hi]


def _inputs(data) -> torch.Tensor:
    """``x`` from a tensor or a ``(x, labels)`` pair such as :class:`rotvq.lab.datasets.LabeledData`."""
    x = data
    if isinstance(data, (tuple, list)) and data:
        x = data[0]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"data must be a tensor or an (x, labels) pair, got {type(data).__name__}")
    if not x.is_floating_point() or x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty floating-point tensor (N, ...), got "
                         f"{x.dtype} {tuple(x.shape)}")
    return x


def build_model(config: TrainConfig, data) -> MLPVQVAE | ConvVQVAE:
    """The model described by ``config``, initialised with ``torch.manual_seed(config.seed)``
    (under :func:`torch.random.fork_rng`, so the global state is left as it was).

    Args:
        config: the run's configuration.
        data: training inputs ``(N, D)`` (mlp) or ``(N, C, H, W)`` (conv), or an
            ``(x, labels)`` pair; gives the input size, and the first ``batch_size`` rows
            calibrate the encoder when ``config.encoder_norm`` is set.
    """
    x = _inputs(data)
    if config.model == "mlp" and x.dim() != 2:
        raise ValueError(f"model 'mlp' needs flat inputs (N, D), got {tuple(x.shape)}; "
                         "load the data with flatten=True")
    if config.model == "conv" and x.dim() != 4:
        raise ValueError(f"model 'conv' needs images (N, C, H, W), got {tuple(x.shape)}; "
                         "load the data with flatten=False")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        common = dict(encoder_scale=config.encoder_scale, **config.vq_kwargs())
        if config.model == "mlp":
            model = MLPVQVAE(x.shape[1], config.hidden, config.latent_dim, config.codebook_size,
                             num_latents=config.num_latents, **common)
        else:
            model = ConvVQVAE(x.shape[1], config.hidden, config.latent_dim, config.codebook_size,
                              downsamples=config.downsamples, **common)
        if config.encoder_norm is not None:
            model.calibrate_encoder_norm(x[: config.batch_size], config.encoder_norm)
    return model


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)


def _process_group() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, or ``(0, 1)``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _run_device(config: TrainConfig, world_size: int) -> torch.device:
    device = torch.device(config.device)
    if world_size > 1 and device.type == "cuda" and device.index is None:
        local = int(os.environ.get("LOCAL_RANK", _process_group()[0] % torch.cuda.device_count()))
        device = torch.device("cuda", local)
    return device


# Skip DDP's per-forward buffer broadcast: the quantizer keeps its buffers equal on all ranks
# itself (rotvq.VectorQuantizer, sync=True).  Newer torch renamed broadcast_buffers.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                   inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


def _global_mean(values: dict[str, float], world_size: int, device: torch.device) -> dict[str, float]:
    """In a data-parallel run, each named value averaged over the ranks (one all-reduce)."""
    if world_size == 1:
        return values
    packed = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(packed)  # SUM (gloo has no AVG)
    return dict(zip(values, (packed / world_size).tolist()))


def train(model: torch.nn.Module, data, config: TrainConfig | None = None, *,
          progress: bool | None = None,
          callback: typing.Callable[[int, torch.nn.Module], None] | None = None) -> History:
    """Train ``model`` in place with the optimisation settings of ``config``.

    In a data-parallel run (a :mod:`torch.distributed` process group is initialised) every
    rank calls this with the same model, data and config; see the module docstring for how
    the result relates to a one-process run with the global batch.

    Args:
        model: a :class:`~rotvq.lab.models.MLPVQVAE` or :class:`~rotvq.lab.models.ConvVQVAE`
            (e.g. from :func:`build_model`); moved to ``config.device``.
        data: training inputs ``(N, ...)`` or an ``(x, labels)`` pair; batches are taken
            on the CPU and moved to the device.
        config: the run's settings (default ``TrainConfig()``).
        progress: ``True``/``False`` forces the progress bar (stderr) on/off; ``None``
            shows it only if stderr is a terminal and ``config.steps >=``
            :data:`AUTO_PROGRESS_STEPS`.
        callback: called as ``callback(done, model)`` after each optimizer step, with
            ``done`` the number of steps taken so far (1 .. ``config.steps``), for example
            to evaluate at intermediate points (:mod:`rotvq.lab.study`).  It runs outside
            the global random state the loop uses, so a callback that draws random
            numbers cannot change the run; one that changes the model or its mode must
            restore them (:func:`evaluate` does).  Because the learning rate is constant,
            the model after ``s`` steps of a long run is the model of an ``s``-step run.

    Returns:
        A :class:`History` with one entry per step, named by :data:`METRICS`.

    Raises:
        ValueError: ``batch_size`` exceeds the examples or is not divisible by the world size.
        FloatingPointError: the loss became NaN or infinite (the step is named).
    """
    config = config or TrainConfig()
    x = _inputs(data)
    rank, world = _process_group()
    sampler = GlobalBatchSampler(x.shape[0], config.batch_size, config.seed, rank=rank,
                                 world_size=world)
    if progress is None:
        progress = sys.stderr.isatty() and config.steps >= AUTO_PROGRESS_STEPS
    device = _run_device(config, world)
    model.to(device).train()
    net = model
    if world > 1:  # gradients averaged over ranks; the quantizer syncs its own buffers
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, **_NO_BUFFER_SYNC)
    optimizer = _optimizer(model, config)
    batches = iter(sampler)
    history = History(config=config.to_dict(), world_size=world)
    start = time.perf_counter()
    cuda = [device.index or 0] if device.type == "cuda" else []
    bar = tqdm(total=config.steps, disable=not (progress and rank == 0), file=sys.stderr,
               unit="step", dynamic_ncols=True, leave=False,
               desc=f"{config.estimator} seed {config.seed}")
    with bar, torch.random.fork_rng(devices=cuda):
        torch.manual_seed(config.seed)
        for step in range(config.steps):
            batch = x[next(batches)].to(device, non_blocking=True)
            out = net(batch)
            values = _global_mean(out.metrics(), world, device)
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(f"loss is {values['loss']} at step {step}; "
                                         "lower lr or set grad_clip")
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            history.append(step, values)
            if callback is not None:
                with torch.random.fork_rng(devices=cuda):
                    callback(step + 1, model)
            bar.update(1)
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                bar.set_postfix({k: f"{values[k]:.4g}" for k in
                                 ("loss", "recon_loss", "perplexity", "z_norm", "q_norm")},
                                refresh=False)
    history.wall_time = time.perf_counter() - start
    return history


@torch.no_grad()
def evaluate(model: torch.nn.Module, data, *, batch_size: int = 1024) -> dict[str, float]:
    """The metrics of :data:`METRICS` for ``model`` over all of ``data`` at once.

    The encoder runs in batches; the quantizer then runs *once* on all the split's latent
    vectors, so ``usage``, ``perplexity``, ``codebook_loss``, ``z_norm``, ... are the
    quantizer's own statistics (:meth:`rotvq.VQOutput.metrics`, one formula) over the whole
    split; the decoder runs in batches again.  The model runs in eval mode (no EMA updates
    or code restarts) on its own device and is put back in its previous mode afterwards.
    A :class:`~torch.nn.parallel.DistributedDataParallel` wrapper is looked through.

    Args:
        model: a VQ-VAE from :mod:`rotvq.lab.models`.
        data: inputs ``(N, ...)`` or an ``(x, labels)`` pair (e.g. the test split).
        batch_size: examples per encoder/decoder pass (memory only; results do not depend
            on it beyond rounding).

    Returns:
        ``{name: float}`` for every name in :data:`METRICS`: ``recon_loss`` is the mean
        squared error per element (accumulated in float64), ``loss = recon_loss + vq_loss``.
    """
    check_positive_int("batch_size", batch_size)
    x = _inputs(data)
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        chunks = range(0, x.shape[0], batch_size)
        z = torch.cat([model.encode(x[s : s + batch_size].to(device)) for s in chunks])
        vq = model.quantizer(z)  # the layer's statistics over the whole split
        sq_error = torch.zeros((), dtype=torch.float64, device=device)
        for s in chunks:
            batch = x[s : s + batch_size].to(device)
            reconstruction = model.decode(vq.quantized[s : s + batch_size])
            sq_error += (reconstruction.double() - batch.double()).pow(2).sum()
    finally:
        model.train(was_training)
    recon_loss = sq_error / x.numel()
    out = VQVAEOutput(reconstruction=None, z=z, vq=vq, recon_loss=recon_loss,
                      codebook_loss=vq.codebook_loss, commitment_loss=vq.commitment_loss,
                      loss=recon_loss + vq.loss)
    return out.metrics()
