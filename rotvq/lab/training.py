"""A small, deterministic training loop for the VQ-VAEs of :mod:`rotvq.lab.models`.

* :class:`TrainConfig` -- everything that defines a run (optimisation, quantizer, model).
* :func:`build_model` -- the model a config describes, initialised from ``config.seed``.
* :func:`train` -- optimise a model, recording a per-step :class:`History`.
* :func:`evaluate` -- reconstruction loss and codebook statistics over a whole split.

Determinism.  On the CPU, the same config (seed), data and thread count give a
bit-identical history: batches are drawn from a private :class:`torch.Generator` seeded
with ``config.seed``, and any use of torch's global generator inside the model (k-means
initialisation, dead-code restarts) happens under :func:`torch.random.fork_rng` seeded
with ``config.seed``, so the caller's global random state is left untouched.  CUDA
kernels may be nondeterministic; runs there are reproducible only up to rounding.

Progress.  ``train(..., progress=None)`` (the default) prints a line every
``config.log_every`` steps to stderr only when stderr is a terminal and the run has at
least :data:`AUTO_PROGRESS_STEPS` steps.  In notebooks (and so under nbval) stderr is not a
terminal, so training is quiet; pass ``progress=True`` to force the lines or
``progress=False`` to silence them.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import pathlib
import sys
import time
from typing import Any

import numpy as np
import torch

from ..estimators import SURROGATE_NAMES
from .models import ConvVQVAE, MLPVQVAE
from ..quantizer import INITS

__all__ = ["TrainConfig", "History", "build_model", "train", "evaluate", "METRICS"]

AUTO_PROGRESS_STEPS = 1000
OPTIMIZERS = ("adam", "adamw", "sgd")
MODELS = ("mlp", "conv")
# Per-step quantities recorded by train(), in CSV column order (after "step").
METRICS = ("loss", "recon_loss", "codebook_loss", "commitment_loss", "usage", "perplexity",
           "mean_z_norm", "mean_q_norm", "quantization_error")


@dataclasses.dataclass
class TrainConfig:
    """One training run.  The quantizer and model fields are read by :func:`build_model`;
    :func:`train` reads only the optimisation fields (it trains the model it is given)."""

    # --- optimisation
    steps: int = 2000  # optimizer steps
    batch_size: int = 128  # examples per step; each epoch is a fresh permutation
    lr: float = 1e-3  # learning rate
    optimizer: str = "adam"  # "adam", "adamw" or "sgd" (plain, no momentum)
    weight_decay: float = 0.0  # passed to the optimizer
    grad_clip: float | None = None  # max global gradient norm; None: no clipping
    seed: int = 0  # model initialisation, batch order and the quantizer's randomness
    device: str = "cpu"  # torch device string, e.g. "cpu" or "cuda"
    log_every: int = 100  # steps between progress lines (when progress is on)
    # --- quantizer (rotvq.quantizer.VectorQuantizer)
    estimator: str = "rotation"  # gradient estimator, a name in rotvq.SURROGATE_NAMES
    init: str = "normal"  # codebook initialisation: "normal", "uniform" or "kmeans"
    init_scale: float = 1.0  # std (normal) / half-width (uniform) of the initial codes
    beta: float = 1.0  # codebook_weight: weight of the codebook loss |q - sg[z]|^2
    gamma: float = 0.25  # commitment_weight: weight of the commitment loss |z - sg[q]|^2
    ema: bool = False  # update the codebook by exponential moving averages instead
    decay: float = 0.99  # EMA decay (only with ema=True)
    dead_code_threshold: float = 0.0  # restart codes whose EMA count falls below this; 0: never
    # --- model (rotvq.lab.models)
    model: str = "mlp"  # "mlp" (flat inputs) or "conv" (channel-first images)
    hidden: int = 128  # hidden width (mlp) or channels (conv)
    latent_dim: int = 8  # size of a latent / code vector
    codebook_size: int = 64  # number of codes
    num_latents: int = 4  # latent vectors per input (mlp only)
    downsamples: int = 1  # stride-2 stages (conv only)
    encoder_scale: float = 1.0  # fixed gain on the encoder output
    encoder_norm: float | None = None  # if set, start with mean |z| = this (first batch)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "hidden", "latent_dim",
                     "codebook_size", "num_latents"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        for name in ("lr", "encoder_scale", "init_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(f"TrainConfig.{name} must be positive and finite, got {value!r}")
        for name in ("grad_clip", "encoder_norm"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(f"TrainConfig.{name} must be None or positive, got {value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer must be one of {OPTIMIZERS}, "
                             f"got {self.optimizer!r}")
        for name in ("beta", "gamma", "weight_decay", "dead_code_threshold"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
                raise ValueError(f"TrainConfig.{name} must be >= 0 and finite, got {value!r}")
        if not 0 < self.decay < 1:
            raise ValueError(f"TrainConfig.decay must be in (0, 1), got {self.decay!r}")
        if self.estimator not in SURROGATE_NAMES:
            raise ValueError(f"TrainConfig.estimator must be one of {SURROGATE_NAMES}, "
                             f"got {self.estimator!r}")
        if self.init not in INITS:
            raise ValueError(f"TrainConfig.init must be one of {INITS}, got {self.init!r}")
        if self.model not in MODELS:
            raise ValueError(f"TrainConfig.model must be one of {MODELS}, got {self.model!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return dataclasses.asdict(self)

    def vq_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`rotvq.quantizer.VectorQuantizer`."""
        return dict(estimator=self.estimator, init=self.init, init_scale=self.init_scale,
                    codebook_weight=self.beta, commitment_weight=self.gamma, ema=self.ema,
                    decay=self.decay, dead_code_threshold=self.dead_code_threshold)


@dataclasses.dataclass
class History:
    """Per-step record of a run: ``step`` and one list per name in :data:`METRICS`.

    Every value is the training batch's value *before* that step's update.
    """

    step: list[int] = dataclasses.field(default_factory=list)
    loss: list[float] = dataclasses.field(default_factory=list)
    recon_loss: list[float] = dataclasses.field(default_factory=list)
    codebook_loss: list[float] = dataclasses.field(default_factory=list)
    commitment_loss: list[float] = dataclasses.field(default_factory=list)
    usage: list[float] = dataclasses.field(default_factory=list)
    perplexity: list[float] = dataclasses.field(default_factory=list)
    mean_z_norm: list[float] = dataclasses.field(default_factory=list)
    mean_q_norm: list[float] = dataclasses.field(default_factory=list)
    quantization_error: list[float] = dataclasses.field(default_factory=list)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # TrainConfig.to_dict()
    wall_time: float = 0.0  # seconds spent in train()

    def __len__(self) -> int:
        return len(self.step)

    def to_dict(self) -> dict[str, list]:
        """``{"step": [...], "loss": [...], ...}`` (lists, one entry per recorded step)."""
        return {name: list(getattr(self, name)) for name in ("step",) + METRICS}

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Like :meth:`to_dict`, with NumPy arrays."""
        return {name: np.asarray(values) for name, values in self.to_dict().items()}

    def final(self, window: int = 1) -> dict[str, float]:
        """Mean of each metric over the last ``window`` recorded steps."""
        if not len(self):
            raise ValueError("empty history")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        return {name: float(np.mean(getattr(self, name)[-window:])) for name in METRICS}

    def to_csv(self, path: str | pathlib.Path, extra: dict[str, Any] | None = None) -> None:
        """Write one row per step (columns: ``extra``'s keys, ``step``, the metrics)."""
        extra = extra or {}
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(list(extra) + ["step", *METRICS])
            for row in zip(self.step, *(getattr(self, m) for m in METRICS)):
                writer.writerow(list(extra.values()) + list(row))


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


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless index batches: shuffled epochs, the incomplete last batch dropped."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def _scalars(out) -> list[float]:
    """The METRICS of one forward pass, with a single device-to-host transfer."""
    vq = out.vq
    values = [out.loss, out.recon_loss, out.codebook_loss, out.commitment_loss, vq.usage,
              vq.perplexity, vq.z_norm, vq.q_norm, vq.quantization_error]
    return torch.stack([torch.as_tensor(v, dtype=torch.float32, device=out.loss.device)
                        .detach().reshape(()) for v in values]).tolist()


def train(model: torch.nn.Module, data, config: TrainConfig | None = None, *,
          progress: bool | None = None) -> History:
    """Train ``model`` in place with the optimisation settings of ``config``.

    Args:
        model: a :class:`~rotvq.lab.models.MLPVQVAE` or :class:`~rotvq.lab.models.ConvVQVAE`
            (e.g. from :func:`build_model`); moved to ``config.device``.
        data: training inputs ``(N, ...)`` or an ``(x, labels)`` pair; batches are taken
            on the CPU and moved to the device.
        config: the run's settings (default ``TrainConfig()``).
        progress: ``True``/``False`` forces progress lines on stderr on/off; ``None``
            prints them only if stderr is a terminal and ``config.steps >=``
            :data:`AUTO_PROGRESS_STEPS`.

    Returns:
        A :class:`History` with one entry per step.

    Raises:
        FloatingPointError: the loss became NaN or infinite (the step is named).
    """
    config = config or TrainConfig()
    x = _inputs(data)
    if config.batch_size > x.shape[0]:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {x.shape[0]} examples")
    if progress is None:
        progress = sys.stderr.isatty() and config.steps >= AUTO_PROGRESS_STEPS
    device = torch.device(config.device)
    model.to(device).train()
    optimizer = _optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    batches = _batches(x.shape[0], config.batch_size, generator)
    history = History(config=config.to_dict())
    start = time.perf_counter()
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(config.seed)
        for step in range(config.steps):
            batch = x[next(batches)].to(device, non_blocking=True)
            out = model(batch)
            values = _scalars(out)
            if not math.isfinite(values[0]):
                raise FloatingPointError(f"loss is {values[0]} at step {step}; "
                                         "lower lr or set grad_clip")
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            history.step.append(step)
            for name, value in zip(METRICS, values):
                getattr(history, name).append(value)
            if progress and ((step + 1) % config.log_every == 0 or step + 1 == config.steps):
                print(f"step {step + 1:>6}/{config.steps}  loss {values[0]:.4f}  "
                      f"recon {values[1]:.4f}  perplexity {values[5]:.1f}  |z| {values[6]:.3f}  "
                      f"|q| {values[7]:.3f}  ({time.perf_counter() - start:.1f}s)",
                      file=sys.stderr, flush=True)
    history.wall_time = time.perf_counter() - start
    return history


@torch.no_grad()
def evaluate(model: torch.nn.Module, data, *, batch_size: int = 1024) -> dict[str, float]:
    """Reconstruction loss and codebook statistics of ``model`` over all of ``data``.

    The model runs in eval mode (no EMA updates or code restarts) on its own device and
    is put back in its previous mode afterwards.

    Args:
        model: a VQ-VAE from :mod:`rotvq.lab.models`.
        data: inputs ``(N, ...)`` or an ``(x, labels)`` pair (e.g. the test split).
        batch_size: examples per forward pass (memory only; results do not depend on it
            beyond rounding).

    Returns:
        ``recon_loss`` (mean squared error per element), ``usage`` (fraction of the codes
        chosen at least once), ``perplexity`` (``exp`` of the entropy of the code
        histogram over the whole split), ``mean_z_norm``, ``mean_q_norm`` (mean Euclidean
        norm of latent / code vectors) and ``quantization_error`` (mean ``|z - q|^2`` per
        latent vector).
    """
    x = _inputs(data)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counts = torch.zeros(model.codebook_size, dtype=torch.float64, device=device)
    sq_error = z_norm = q_norm = q_error = 0.0
    n_vectors = 0
    try:
        for start in range(0, x.shape[0], batch_size):
            batch = x[start : start + batch_size].to(device)
            out = model(batch)
            z = out.z.reshape(-1, out.z.shape[-1]).double()
            q = out.vq.quantized.reshape(z.shape).double()
            sq_error += (out.reconstruction.double() - batch.double()).pow(2).sum().item()
            z_norm += z.norm(dim=-1).sum().item()
            q_norm += q.norm(dim=-1).sum().item()
            q_error += (z - q).pow(2).sum().item()
            n_vectors += z.shape[0]
            counts += torch.bincount(out.vq.indices.reshape(-1), minlength=model.codebook_size)
    finally:
        model.train(was_training)
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {
        "recon_loss": sq_error / x.numel(),
        "usage": (counts > 0).double().mean().item(),
        "perplexity": math.exp(entropy),
        "mean_z_norm": z_norm / n_vectors,
        "mean_q_norm": q_norm / n_vectors,
        "quantization_error": q_error / n_vectors,
    }
