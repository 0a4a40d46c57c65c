"""Tests for rotvq._checks: the small validation and dtype/device helpers shared by the package."""
from __future__ import annotations

import pytest
import torch

from rotvq._checks import (at_least_float32, check_nonnegative_int, check_positive_int, compute_dtype,
                           generator_device)


@pytest.mark.parametrize("value", [1, 7, 2**40])
def test_positive_int_accepts(value):
    assert check_positive_int("k", value) == value


@pytest.mark.parametrize("value", [0, -3, 1.0, True, "2", None])
def test_positive_int_rejects_and_names_the_argument(value):
    with pytest.raises(ValueError, match=r"^k must be a positive int, got"):
        check_positive_int("k", value)


def test_nonnegative_int():
    assert check_nonnegative_int("downsamples", 0) == 0
    for bad in (-1, 0.0, False):
        with pytest.raises(ValueError, match="downsamples must be a non-negative int"):
            check_nonnegative_int("downsamples", bad)


@pytest.mark.parametrize("dtype, expected", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_at_least_float32(dtype, expected):
    assert at_least_float32(dtype) == expected
    assert compute_dtype(dtype) == expected  # the estimators' spelling agrees on floating dtypes


def test_generator_device():
    assert generator_device(None, torch.device("cpu")) == torch.device("cpu")
    assert generator_device(torch.Generator(), torch.device("meta")) == torch.device("cpu")
