"""Golden test: ``rotvq.VectorQuantizer`` computes bitwise what it computed before the refactor.

The book's results of record were trained with the layer of commit ef80abf, kept frozen in
``tests/golden_quantizer.py``. Each configuration below trains that frozen class and the
current ``rotvq.VectorQuantizer`` side by side, from the same construction seeds and on the
same batches, for a few steps, and requires *bitwise* equality (``torch.equal``, NaN-aware) of:
every field of the output, the gradients that reach the input and the codebook, every
tensor of the state after each step, an eval-mode call and ``get_codes_from_indices``.
Between steps the codebook parameter takes an SGD step, and a code is planted far away
after the first step, so that dead-code resets, EMA updates and k-means inits all act.

Tensors are computed by both classes on the machine that runs the test, never stored, so
the test holds on any CPU.
"""
from __future__ import annotations

import pytest
import torch

from rotvq import ClippedRotation, VectorQuantizer
from rotvq.estimators import SURROGATE_NAMES

from golden_quantizer import FrozenVectorQuantizer

D, K, STEPS = 4, 12, 6
# name -> (layer keyword arguments, data options)
CONFIGS = {
    "defaults": ({}, {}),
    "ema_normal_auto": (dict(ema=True, init="normal"), {}),
    "ema_kmeans_off": (dict(ema=True, init="kmeans", dead_code_threshold=0.0), {}),
    "uniform_classic": (dict(init="uniform", init_scale=0.5, dead_code_threshold=0.5, decay=0.5), {}),
    "ema_classic": (dict(ema=True, init="normal", dead_code_threshold=0.6, decay=0.5, eps=1e-3), {}),
    "grad_normal_off": (dict(init="normal", dead_code_threshold=0.0), {}),
    "weights": (dict(codebook_weight=0.7, commitment_weight=0.3, init="normal"), {}),
    "kmeans_sampled": (dict(kmeans_max_points=20, kmeans_iters=3), {}),
    "cosine_grad": (dict(distance="cosine"), {}),
    "cosine_ema": (dict(distance="cosine", ema=True, init="normal"), {}),
    "mask_ema": (dict(ema=True), dict(mask=True)),
    "mask_grad_classic": (dict(init="normal", dead_code_threshold=0.4, decay=0.6), dict(mask=True)),
    "channel_first_3d": (dict(channel_first=True), dict(layout="cf3")),
    "channel_first_4d_mask": (dict(channel_first=True, ema=True), dict(layout="cf4", mask=True)),
    "auto_layout_2d": (dict(channel_first=None), dict(layout="flat")),
    "float64": (dict(ema=True), dict(dtype=torch.float64)),
    "bfloat16": ({}, dict(dtype=torch.bfloat16)),
    "empty_step": (dict(ema=True, init="normal"), dict(empty=1)),
    "fully_masked_step": (dict(init="normal"), dict(mask=True, all_masked=2)),
    "tiny_budget": (dict(memory_budget=64), {}),
}
CONFIGS.update({f"estimator_{name}": (dict(estimator=name), {}) for name in SURROGATE_NAMES})
CONFIGS["estimator_object"] = (dict(estimator=ClippedRotation(lo=0.5, hi=1.5)), {})


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _batch(opts, step, g):
    """(input, mask) of one step; padding rows hold NaN."""
    n = 0 if opts.get("empty") == step else 16
    x = 1.5 * torch.randn(3, n, D, generator=g) + 0.5
    mask = None
    if opts.get("mask"):
        mask = torch.rand(3, n, generator=g) > 0.35
        if n:
            mask[0, 1] = False
            x[0, 1] = float("nan")
        if opts.get("all_masked") == step:
            mask = torch.zeros_like(mask)
    layout = opts.get("layout")
    if layout == "cf3":
        x = x.movedim(-1, 1)  # (3, D, n)
    elif layout == "cf4":
        x = x.reshape(3, 2, n // 2, D).movedim(-1, 1)  # (3, D, 2, n/2)
        mask = None if mask is None else mask.reshape(3, 2, n // 2)
    elif layout == "flat":
        x = x.reshape(-1, D)
        mask = None if mask is None else mask.reshape(-1)
    return x.to(opts.get("dtype", torch.float32)), mask


def _run(cls, kw, opts):
    torch.manual_seed(2024)  # anything drawn from the global generator is drawn alike
    vq = cls(D, K, generator=_gen(0), **kw).train()
    g = _gen(1)
    records = []
    for step in range(STEPS):
        x, mask = _batch(opts, step, g)
        x.requires_grad_()
        out = vq(x, mask=mask)
        w = torch.randn(out.quantized.shape, generator=g)
        loss = (out.quantized.float() * w).sum() + out.loss
        params = list(vq.parameters())
        grads = torch.autograd.grad(loss, [x] + params, allow_unused=True)
        with torch.no_grad():
            for p, gp in zip(params, grads[1:]):
                if gp is not None:
                    p.sub_(0.5 * gp)  # SGD step on the codebook
            if step == 0:
                vq.embedding[3] = 50.0  # a code no vector chooses: the dead-code rules must act
        state = {k: v.detach().clone() for k, v in vq.state_dict().items()}
        records.append((tuple(t.detach().clone() for t in out), grads, state))
    vq.eval()
    x, mask = _batch(opts, STEPS, g)
    out = vq(x, mask=mask)
    codes = vq.get_codes_from_indices(out.indices, dtype=x.dtype)
    records.append((tuple(out), codes))
    return records


def _assert_same(a, b, where):
    if isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif a is None:
        assert b is None, where
    else:
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(torch.nan_to_num(a.float(), nan=7.25), torch.nan_to_num(b.float(), nan=7.25)) and \
            torch.equal(torch.isnan(a), torch.isnan(b)), f"{where} differs"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bitwise_equal_to_the_frozen_layer(one_thread, name):
    kw, opts = CONFIGS[name]
    frozen = _run(FrozenVectorQuantizer, kw, opts)
    current = _run(VectorQuantizer, kw, opts)
    _assert_same(frozen, current, name)


def test_the_comparison_can_fail(one_thread):
    """The harness notices a change: a different commitment weight changes the loss and gradients."""
    kw, opts = CONFIGS["defaults"]
    frozen = _run(FrozenVectorQuantizer, kw, opts)
    changed = _run(VectorQuantizer, dict(kw, commitment_weight=0.25 + 2 ** -20), opts)
    with pytest.raises(AssertionError, match="differs"):
        _assert_same(frozen, changed, "defaults")


@pytest.mark.parametrize("kw", [dict(ema=True, init="normal"), dict(init="kmeans"), dict(dead_code_threshold=0.5)])
def test_non_finite_batches_raise_the_same_error_and_leave_the_same_state(kw):
    results = []
    for cls in (FrozenVectorQuantizer, VectorQuantizer):
        torch.manual_seed(0)
        vq = cls(D, K, generator=_gen(0), channel_first=False, **kw).train()
        g = _gen(1)
        vq(torch.randn(30, D, generator=g))
        x = torch.randn(2, 5, D, generator=g)
        x[1, 3, 2] = float("inf")
        with pytest.raises(ValueError) as err:
            vq(x)
        results.append((str(err.value), {k: v.clone() for k, v in vq.state_dict().items()}))
    assert results[0][0] == results[1][0]
    _assert_same(results[0][1], results[1][1], "state")
