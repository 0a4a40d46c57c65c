"""rotvq: gradient estimators for vector quantization, and the book that derives them.

The estimators (forward value exactly ``q``, backward ``G^T g``):

>>> import torch, rotvq
>>> z = torch.randn(4, 8, requires_grad=True)
>>> q = torch.randn(4, 8)
>>> zq = rotvq.rotation_trick(z, q)
>>> bool(torch.equal(zq, q))
True

See :mod:`rotvq.estimators` and :mod:`rotvq.operators`; the book (``book/``) derives
each formula and checks it. Two stochastic estimators from the literature, NSVQ
(:func:`noise_substitution`) and DiVeQ (:func:`diveq`), are in :mod:`rotvq.stochastic`:
their forward value in training is a random point near ``q``, not ``q``; in eval mode
(``training=False``) they return ``q`` exactly.
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
from .stochastic import diveq, noise_substitution
from .backend import BACKENDS, get_backend, set_backend
from .kmeans import kmeans, kmeans_plusplus
from .quantizer import INITS, METRIC_NAMES, VectorQuantizer, VQOutput
from .residual import ESTIMATOR_SCOPES, ResidualVQ, RVQOutput
from .grouped import GroupedOutput, GroupedVQ
from .projected import Projected
from .fsq import FSQ
from .search import DISTANCES, nearest_code

__version__ = "0.1.0"

# imported on first use: `symbolic` needs sympy; `bench` is the benchmark library the
# performance appendix reads; `lab` (datasets, models, training, the
# experiment command line) is the book's experiment apparatus, not the library's face
_LAZY_SUBMODULES = ("symbolic", "lab", "bench")


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
    "noise_substitution",
    "diveq",
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
    "ResidualVQ",
    "RVQOutput",
    "ESTIMATOR_SCOPES",
    "GroupedVQ",
    "GroupedOutput",
    "Projected",
    "FSQ",
    "METRIC_NAMES",
    "set_backend",
    "get_backend",
    "BACKENDS",
    "INITS",
    "DISTANCES",
    "nearest_code",
    "kmeans",
    "kmeans_plusplus",
]
