"""Input validation and small dtype/device helpers shared by the package.

Every public entry point of :mod:`rotvq` validates its tensors here, so that bad input
fails early with a message that names the offending argument, instead of producing a
silent NaN or a broadcast that the caller did not ask for.  The small utilities that
several modules need (a positive-integer check, the device a random generator draws on,
"at least float32") are spelled once here.
"""
from __future__ import annotations

import torch

__all__ = ["check_vector_pair", "check_positive_int", "check_nonnegative_int", "compute_dtype",
           "at_least_float32", "generator_device", "input_eps", "compiling"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a real floating-point tensor, got dtype {x.dtype}")
    return x


def check_vector_pair(z: object, q: object, *, names: tuple[str, str] = ("z", "q")) -> int:
    """Validate two channel-last batches of vectors and return their dimension ``d``.

    Args:
        z, q: tensors of the same shape ``(..., d)``, dtype and device.
        names: how the two arguments are called in error messages.

    Returns:
        The vector dimension ``d = z.shape[-1]``.

    Raises:
        TypeError: a non-tensor, a non-floating-point tensor, or different dtypes.
        ValueError: different shapes (both are named), a 0-d tensor, ``d = 0``, or
            different devices.
    """
    zn, qn = names
    _check_tensor(z, zn)
    _check_tensor(q, qn)
    if z.shape != q.shape:
        raise ValueError(
            f"{zn} and {qn} must have the same shape (..., d); got {zn} with shape "
            f"{tuple(z.shape)} and {qn} with shape {tuple(q.shape)}"
        )
    if z.dim() == 0:
        raise ValueError(f"{zn} and {qn} must have at least one dimension (..., d); got 0-d tensors")
    if z.shape[-1] == 0:
        raise ValueError(f"the vector dimension d = {zn}.shape[-1] must be at least 1; got shape {tuple(z.shape)}")
    if z.dtype != q.dtype:
        raise TypeError(f"{zn} and {qn} must have the same dtype; got {z.dtype} and {q.dtype}")
    if z.device != q.device:
        raise ValueError(f"{zn} and {qn} must be on the same device; got {z.device} and {q.device}")
    return z.shape[-1]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype backward passes are computed in: float32 for float16/bfloat16 inputs."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def input_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of the *input* dtype (the resolution the caller's data has)."""
    return torch.finfo(dtype).eps


def check_positive_int(name: str, value: object) -> int:
    """``value`` if it is an ``int`` >= 1 (``bool`` is not accepted), else ``ValueError``
    naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_nonnegative_int(name: str, value: object) -> int:
    """``value`` if it is an ``int`` >= 0 (``bool`` is not accepted), else ``ValueError``
    naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` promoted to at least float32 (float16/bfloat16 -> float32, float64 stays);
    the dtype statistics and accumulations are computed in."""
    return torch.promote_types(dtype, torch.float32)


def generator_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    """The device random numbers must be drawn on: the generator's own, or ``fallback``
    when drawing from torch's global generator (``generator=None``)."""
    return generator.device if generator is not None else fallback


def compiling() -> bool:
    """True while ``torch.compile`` traces (``torch.compiler.is_compiling``; False on old torch)."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False
