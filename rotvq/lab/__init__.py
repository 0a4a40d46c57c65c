"""The book's experiment lab: embedded datasets, small VQ-VAEs, training and the experiment CLI.

The library a practitioner imports is :mod:`rotvq` itself (estimators, operators,
:class:`rotvq.VectorQuantizer`, search, symbolic helpers). This subpackage holds the
apparatus the book's chapters use to run experiments:

* :mod:`rotvq.lab.datasets` -- embedded real data (digits, image patches) and readers for
  MNIST / CIFAR-10 files on local disk;
* :mod:`rotvq.lab.models` -- small MLP and convolutional VQ-VAEs;
* :mod:`rotvq.lab.training` -- the deterministic training loop, data-parallel when a
  process group is initialised, and its configuration :class:`TrainConfig`, the one schema
  the command line is generated from;
* :mod:`rotvq.lab.experiment` -- the command line ``python -m rotvq.lab.experiment``
  (console script ``rotvq-experiment``; grids of configurations, presets such as the
  paper's protocol, ``torchrun`` for data-parallel runs).

Every metric is named as in :data:`METRICS`, the names of :meth:`rotvq.VQOutput.metrics`
plus the model's ``loss``, ``recon_loss`` and ``vq_loss``.
"""
from .datasets import LabeledData, load_cifar10, load_digits, load_mnist, load_patches
from .models import ConvVQVAE, MLPVQVAE, VQVAEOutput
from .training import METRICS, History, TrainConfig, build_model, evaluate, train

__all__ = [
    "LabeledData", "load_digits", "load_patches", "load_mnist", "load_cifar10",
    "MLPVQVAE", "ConvVQVAE", "VQVAEOutput",
    "TrainConfig", "History", "METRICS", "build_model", "train", "evaluate",
]
# rotvq.lab.experiment (the command line: expand_grid, PRESETS, smooth) is not imported here,
# so that `python -m rotvq.lab.experiment` runs it fresh as __main__
