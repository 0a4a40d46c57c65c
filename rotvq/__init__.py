"""rotvq: gradient estimators for vector quantization, and the book that derives them.

The estimators (forward value exactly ``q``, backward ``G^T g``):

>>> import torch, rotvq
>>> z = torch.randn(4, 8, requires_grad=True)
>>> q = torch.randn(4, 8)
>>> zq = rotvq.rotation_trick(z, q)
>>> bool(torch.equal(zq, q))
True

See :mod:`rotvq.estimators` and :mod:`rotvq.operators`; the book (``book/``) derives
each formula and checks it.
"""
from .estimators import (
    SURROGATE_NAMES,
    apply_estimator,
    generalized_ste,
    get_surrogate,
    rotation_matrix,
    rotation_trick,
    ste,
)
from .operators import (
    ClippedRotation,
    Dense,
    Householder,
    Identity,
    InterpolatedRotation,
    JacobianSurrogate,
    Rotation,
    TangentRotation,
)
from .kmeans import kmeans, kmeans_plusplus
from .quantizer import INITS, VectorQuantizer, VQOutput
from .search import DISTANCES, nearest_code
from .datasets import LabeledData, load_cifar10, load_digits, load_mnist, load_patches
from .models import ConvVQVAE, MLPVQVAE, VQVAEOutput
from .training import History, TrainConfig, build_model, evaluate, train

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("symbolic",)  # need optional dependencies (sympy): imported on first use


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'rotvq' has no attribute {name!r}")

__all__ = [
    "ste",
    "generalized_ste",
    "rotation_trick",
    "rotation_matrix",
    "get_surrogate",
    "apply_estimator",
    "SURROGATE_NAMES",
    "JacobianSurrogate",
    "Identity",
    "Dense",
    "Rotation",
    "ClippedRotation",
    "InterpolatedRotation",
    "TangentRotation",
    "Householder",
    "VectorQuantizer",
    "VQOutput",
    "INITS",
    "DISTANCES",
    "nearest_code",
    "kmeans",
    "kmeans_plusplus",
    "LabeledData",
    "load_digits",
    "load_patches",
    "load_mnist",
    "load_cifar10",
    "MLPVQVAE",
    "ConvVQVAE",
    "VQVAEOutput",
    "TrainConfig",
    "History",
    "build_model",
    "train",
    "evaluate",
]
