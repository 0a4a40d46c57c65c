"""Tests of rotvq.quantizer.VectorQuantizer."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rotvq
from rotvq.estimators import SURROGATE_NAMES, get_surrogate
from rotvq.quantizer import VectorQuantizer, VQOutput


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def clustered(n_centers=4, per=30, d=3, sep=10.0, seed=0):
    g = gen(seed)
    centers = sep * torch.randn(n_centers, d, generator=g)
    return centers[torch.arange(n_centers).repeat(per)] + 0.05 * torch.randn(n_centers * per, d, generator=g), centers


@settings(max_examples=20, deadline=None)
@given(lead=st.lists(st.integers(0, 4), min_size=0, max_size=3), seed=st.integers(0, 1000),
       distance=st.sampled_from(["euclidean", "cosine"]))
def test_contract_shapes_and_exact_forward(lead, seed, distance):
    vq = VectorQuantizer(5, 7, distance=distance, channel_first=False, generator=gen(seed))
    z = torch.randn(*lead, 5, generator=gen(seed + 1))
    out = vq(z)
    assert isinstance(out, VQOutput)
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    assert out.indices.shape == tuple(lead) and out.indices.dtype == torch.int64
    assert torch.equal(out.quantized, vq.codes().detach()[out.indices])  # bitwise
    assert torch.equal(out.quantized, vq.get_codes_from_indices(out.indices))
    for name in ("loss", "codebook_loss", "commitment_loss", "usage", "perplexity", "z_norm",
                 "q_norm", "quantization_error"):
        value = getattr(out, name)
        assert value.shape == () and torch.isfinite(value), name


def test_statistics_and_losses_by_hand():
    vq = VectorQuantizer(2, 4, codebook_weight=0.7, commitment_weight=0.3, init="normal")
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [9.0, 9.0]]))
    z = torch.tensor([[0.5, 0.0], [3.0, 1.0], [2.5, 0.0], [0.0, 0.0]])
    out = vq(z)
    assert out.indices.tolist() == [0, 1, 1, 0]
    sq = torch.tensor([0.25, 1.0, 0.25, 0.0])  # |z - q|^2 per vector
    assert out.quantization_error.item() == pytest.approx(sq.mean().item())
    assert out.codebook_loss.item() == pytest.approx(sq.sum().item() / 8)  # mean over N*D entries
    assert out.commitment_loss.item() == pytest.approx(sq.sum().item() / 8)
    assert out.loss.item() == pytest.approx((0.7 + 0.3) * sq.sum().item() / 8)
    assert out.usage.item() == pytest.approx(0.5)
    assert out.perplexity.item() == pytest.approx(2.0)  # two codes used equally often
    assert out.z_norm.item() == pytest.approx(z.norm(dim=1).mean().item())
    assert out.q_norm.item() == pytest.approx(1.5)


def test_cosine_mode_quantized_is_the_chosen_unit_code():
    vq = VectorQuantizer(2, 2, distance="cosine", init="normal")
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[10.0, 0.0], [0.0, 0.1]]))
    z = torch.tensor([[0.1, 1.0], [1.0, 0.2]])
    out = vq(z)
    assert out.indices.tolist() == [1, 0]  # euclidean would pick code 1 for both
    assert torch.equal(out.quantized, torch.eye(2)[[1, 0]])  # unit codes
    assert torch.equal(out.quantized, vq.get_codes_from_indices(out.indices))


@pytest.mark.parametrize("estimator", list(SURROGATE_NAMES) + ["object"])
def test_every_estimator_same_forward_finite_gradients(estimator):
    est = get_surrogate("rotation_clipped") if estimator == "object" else estimator
    vq = VectorQuantizer(4, 6, estimator=est, channel_first=False, generator=gen(3))
    ref = VectorQuantizer(4, 6, estimator="ste", channel_first=False, generator=gen(3))
    z = torch.randn(3, 5, 4, generator=gen(4), requires_grad=True)
    out, out_ref = vq(z), ref(z)
    assert torch.equal(out.quantized, out_ref.quantized)
    assert torch.equal(out.quantized, vq.codebook.detach()[out.indices])
    (g,) = torch.autograd.grad((out.quantized * torch.randn(3, 5, 4, generator=gen(5))).sum(), z)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_unknown_estimator():
    with pytest.raises(ValueError, match="rotation_tangent"):
        VectorQuantizer(4, 6, estimator="rotatoin")
    with pytest.raises(TypeError):
        VectorQuantizer(4, 6, estimator=3)


def test_gradient_routing():
    """Encoder gets gradient through the estimator and the commitment term; the codebook only from
    the codebook term."""
    vq = VectorQuantizer(4, 8, init="normal", generator=gen(6))
    z = torch.randn(10, 4, generator=gen(7), requires_grad=True)
    out = vq(z)
    cb = vq.codebook
    g_cb = torch.autograd.grad(out.codebook_loss, cb, retain_graph=True)[0]
    assert g_cb.abs().sum() > 0
    for term in (out.quantized.sum(), out.commitment_loss):
        g = torch.autograd.grad(term, cb, retain_graph=True, allow_unused=True)[0]
        assert g is None or not g.any()
        g_z = torch.autograd.grad(term, z, retain_graph=True)[0]
        assert torch.isfinite(g_z).all() and g_z.abs().sum() > 0
    g = torch.autograd.grad(out.codebook_loss, z, retain_graph=True, allow_unused=True)[0]
    assert g is None or not g.any()
    # hand-computed codebook gradient: d/de_k mean((e_k - z)^2) = 2 sum_{i->k}(e_k - z_i) / (N D)
    expect = torch.zeros_like(cb).index_add_(0, out.indices, 2 * (cb[out.indices] - z).detach() / 40)
    assert torch.allclose(g_cb, expect, atol=1e-6)


def test_ema_step_matches_hand_computation():
    decay, eps = 0.9, 1e-5
    vq = VectorQuantizer(2, 2, ema=True, decay=decay, eps=eps, init="normal", dead_code_threshold=0.0)
    old = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    vq.codebook.copy_(old)
    vq.embed_sum.copy_(old)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 10.0]])
    out = vq.train()(z)
    assert torch.equal(out.quantized, old[[0, 0, 1]])  # codes before this call's update
    assert out.loss.item() == pytest.approx(vq.commitment_weight * out.commitment_loss.item())  # no codebook term
    n = [decay * 1 + (1 - decay) * 2, decay * 1 + (1 - decay) * 1]  # [1.1, 1.0]
    m = [[decay * 0 + (1 - decay) * 1, decay * 0 + (1 - decay) * 1],
         [decay * 10 + (1 - decay) * 9, decay * 10 + (1 - decay) * 10]]
    total = sum(n)
    smooth = [(ni + eps) / (total + 2 * eps) * total for ni in n]
    expect = torch.tensor([[m[k][j] / smooth[k] for j in range(2)] for k in range(2)])
    assert torch.allclose(vq.cluster_size, torch.tensor(n))
    assert torch.allclose(vq.embed_sum, torch.tensor(m))
    assert torch.allclose(vq.codebook, expect, rtol=1e-6)
    assert not isinstance(vq.codebook, torch.nn.Parameter) and not list(vq.parameters())
    vq.eval()(z)  # eval mode: no update
    assert torch.allclose(vq.codebook, expect, rtol=1e-6)


def test_non_ema_training_forward_leaves_codebook_alone_without_reset():
    vq = VectorQuantizer(3, 5, init="normal", dead_code_threshold=0.0, generator=gen(0))
    before = vq.codebook.detach().clone()
    vq.train()(torch.randn(20, 3, generator=gen(1)))
    assert torch.equal(vq.codebook.detach(), before)
    assert isinstance(vq.codebook, torch.nn.Parameter)


@pytest.mark.parametrize("ema", [False, True])
def test_dead_code_reset(ema):
    z, _ = clustered(n_centers=1, per=40, d=3, seed=2)  # everything lands on one code
    z.requires_grad_()
    vq = VectorQuantizer(3, 8, ema=ema, decay=0.5, dead_code_threshold=0.6, init="normal", generator=gen(8))
    before = vq.codebook.detach().clone()
    out = vq.train()(z)
    used = out.indices.unique().tolist()
    dead = [k for k in range(8) if k not in used]
    after = vq.codebook.detach()
    for k in dead:  # every unused code is now one of the batch vectors
        assert (after[k] == z.detach()).all(1).any()
        assert vq.cluster_size[k].item() == pytest.approx(0.6)
    if not ema:
        assert torch.equal(after[used], before[used])
    # the backward pass still works after the in-place reset
    out.loss.backward()
    # deterministic replacements (the worst-served batch vectors)
    vq2 = VectorQuantizer(3, 8, ema=ema, decay=0.5, dead_code_threshold=0.6, init="normal", generator=gen(8))
    vq2.train()(z)
    assert torch.equal(vq2.codebook.detach(), after)
    # 0 turns resets off: nothing replaced
    vq3 = VectorQuantizer(3, 8, ema=ema, decay=0.5, dead_code_threshold=0.0, init="normal", generator=gen(8))
    vq3.train()(z)
    assert not any((vq3.codebook.detach()[k] == z.detach()).all(1).any() for k in dead)


def test_kmeans_init_on_first_training_batch_only():
    z, centers = clustered(n_centers=4, per=30, d=3, seed=3)
    vq = VectorQuantizer(3, 4, init="kmeans", dead_code_threshold=0.0, generator=gen(9))
    assert not bool(vq.initialized)
    vq.eval()(z)  # eval mode does not initialise
    assert not bool(vq.initialized)
    vq.train()(z)
    assert bool(vq.initialized)
    match = torch.cdist(vq.codebook.detach(), centers).argmin(1)
    assert sorted(match.tolist()) == [0, 1, 2, 3]
    assert torch.allclose(vq.codebook.detach(), centers[match], atol=0.05)
    snapshot = vq.codebook.detach().clone()
    vq.train()(z + 100.0)  # a second batch does not re-run k-means
    assert torch.equal(vq.codebook.detach(), snapshot)


def test_init_scale():
    vq = VectorQuantizer(64, 512, init="normal", init_scale=1e-3, generator=gen(0))
    assert VectorQuantizer(2, 3).init == "kmeans"  # the default: codes start where the data is
    assert vq.codebook.std().item() == pytest.approx(1e-3, rel=0.05)
    vq = VectorQuantizer(64, 512, init="uniform", init_scale=0.5, generator=gen(0))
    assert vq.codebook.abs().max().item() <= 0.5 and vq.codebook.abs().max().item() > 0.49
    a = VectorQuantizer(8, 16, init="normal", generator=gen(1)).codebook
    assert torch.equal(a, VectorQuantizer(8, 16, init="normal", generator=gen(1)).codebook)


@pytest.mark.parametrize("ema", [False, True])
def test_state_dict_round_trip(ema):
    z, _ = clustered(n_centers=5, per=20, d=4, seed=4)
    kw = dict(ema=ema, init="kmeans", dead_code_threshold=0.3, decay=0.8)
    vq = VectorQuantizer(4, 8, generator=gen(10), **kw).train()
    for step in range(3):
        vq(z + 0.1 * step)
    fresh = VectorQuantizer(4, 8, generator=gen(99), **kw)
    fresh.load_state_dict(vq.state_dict())
    assert bool(fresh.initialized)
    for a, b in zip(vq.eval()(z), fresh.eval()(z)):
        assert torch.equal(a, b)
    # one more training step: identical state afterwards (no re-init, same EMA state, same dead codes)
    vq.train()(z * 1.1)
    fresh.train()(z * 1.1)
    for (k, a), (_, b) in zip(vq.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("ema", [False, True])
def test_empty_batch(ema):
    vq = VectorQuantizer(3, 5, ema=ema, init="kmeans", channel_first=False).train()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    z = torch.randn(0, 2, 3, requires_grad=True)
    out = vq(z)
    assert out.quantized.shape == (0, 2, 3) and out.indices.shape == (0, 2)
    assert out.loss.item() == 0.0 and out.usage.item() == 0.0 and out.perplexity.item() == 1.0
    assert all(torch.isfinite(v) for v in out[2:])
    out.loss.backward()
    for k, v in vq.state_dict().items():  # nothing updated, no k-means on nothing
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("kwargs", [
    dict(dim=0, codebook_size=4), dict(dim=3, codebook_size=0), dict(dim=3.0, codebook_size=4),
    dict(dim=3, codebook_size=4, distance="l1"), dict(dim=3, codebook_size=4, init="zeros"),
    dict(dim=3, codebook_size=4, decay=1.0), dict(dim=3, codebook_size=4, decay=0.0),
    dict(dim=3, codebook_size=4, codebook_weight=-1.0), dict(dim=3, codebook_size=4, commitment_weight=-0.1),
    dict(dim=3, codebook_size=4, eps=0.0), dict(dim=3, codebook_size=4, init_scale=0.0),
    dict(dim=3, codebook_size=4, dead_code_threshold=-1.0), dict(dim=3, codebook_size=4, kmeans_iters=2.5),
])
def test_bad_construction(kwargs):
    with pytest.raises(ValueError):
        VectorQuantizer(**kwargs)


@pytest.mark.parametrize("name", ["commitment_weight", "codebook_weight", "decay", "eps", "init_scale",
                                  "dead_code_threshold"])
@pytest.mark.parametrize("value", ["0.5", True, torch.tensor(0.5)])
def test_non_numeric_weights_raise_a_type_error_naming_them(name, value):
    with pytest.raises(TypeError, match=name):
        VectorQuantizer(3, 4, **{name: value})
    VectorQuantizer(3, 4, **{name: np.float32(0.5)})  # numpy scalars are real numbers
    with pytest.raises(TypeError, match=name):  # wrappers pass it through before any state exists
        rotvq.ResidualVQ(3, 4, 2, **{name: value})


def test_bad_forward_inputs():
    vq = VectorQuantizer(3, 4)
    with pytest.raises(ValueError, match="dim=3"):
        vq(torch.randn(5, 4))
    with pytest.raises(TypeError, match="channel_first"):
        VectorQuantizer(3, 4, channel_first="yes")
    with pytest.raises(ValueError):
        vq(torch.tensor(1.0))
    with pytest.raises(TypeError):
        vq(torch.ones(5, 3, dtype=torch.int64))
    with pytest.raises(TypeError):
        vq([[1.0, 2.0, 3.0]])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    vq = VectorQuantizer(4, 8, init="normal", generator=gen(11))
    z = torch.randn(6, 4, generator=gen(12)).to(dtype).requires_grad_()
    out = vq(z)
    assert out.quantized.dtype == dtype
    assert torch.equal(out.quantized, vq.codebook.detach()[out.indices].to(dtype))
    (g,) = torch.autograd.grad(out.quantized.float().sum() + out.loss, z)
    assert g.dtype == dtype and torch.isfinite(g).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ema", [False, True])
def test_cuda(ema):
    vq = VectorQuantizer(4, 8, ema=ema, init="kmeans", dead_code_threshold=0.5).cuda().train()
    z = torch.randn(50, 4, device="cuda", requires_grad=True)
    out = vq(z)
    assert out.quantized.device.type == "cuda"
    out.loss.backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_input_on_another_device_raises_before_the_kmeans_init():
    vq = VectorQuantizer(4, 8).cuda().train()
    before = _state(vq)
    with pytest.raises(ValueError, match="cuda"):
        vq(torch.randn(50, 4))  # CPU input: k-means on CPU must not be copied into the GPU codebook
    assert all(torch.equal(v, before[k]) for k, v in _state(vq).items())
    assert not bool(vq.initialized)


# ---------------------------------------------------------------- feature maps and layout


@pytest.mark.parametrize("spatial", [(7,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_channel_first_equals_channel_last(spatial, distance):
    kw = dict(distance=distance, init="normal")
    cf = VectorQuantizer(6, 9, channel_first=True, generator=gen(20), **kw)
    cl = VectorQuantizer(6, 9, channel_first=False, generator=gen(20), **kw)
    z = torch.randn(2, 6, *spatial, generator=gen(21), requires_grad=True)
    out_cf, out_cl = cf(z), cl(z.movedim(1, -1))
    assert out_cf.quantized.shape == z.shape and out_cf.indices.shape == (2, *spatial)
    assert torch.equal(out_cf.indices, out_cl.indices)
    assert torch.equal(out_cf.quantized, out_cl.quantized.movedim(-1, 1))
    for a, b in zip(out_cf[2:], out_cl[2:]):
        assert torch.equal(a, b)
    g = torch.randn(z.shape, generator=gen(22))
    (g_cf,) = torch.autograd.grad((out_cf.quantized * g).sum() + out_cf.loss, z)
    (g_cl,) = torch.autograd.grad((out_cl.quantized * g.movedim(1, -1)).sum() + out_cl.loss, z)
    torch.testing.assert_close(g_cf, g_cl)


def test_wrong_axis_cannot_pass_silently():
    # the example: a channel-first map whose width equals dim used to be quantised along the width
    with pytest.raises(ValueError, match="channel_first"):
        VectorQuantizer(16, 64)(torch.randn(2, 16, 16, 16))
    with pytest.raises(ValueError, match="ambiguous"):  # (B, C, T) or (B, T, C)? both have size dim
        VectorQuantizer(16, 64)(torch.randn(2, 16, 16))
    assert VectorQuantizer(16, 64)(torch.randn(2, 5, 16)).indices.shape == (2, 5)  # (B, T, D): unambiguous
    assert VectorQuantizer(16, 64, channel_first=True)(torch.randn(2, 16, 3, 5)).indices.shape == (2, 3, 5)
    assert VectorQuantizer(16, 64, channel_first=False)(torch.randn(2, 3, 5, 16)).indices.shape == (2, 3, 5)
    with pytest.raises(ValueError, match="axis 1"):
        VectorQuantizer(16, 64, channel_first=True)(torch.randn(2, 3, 5, 16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("channel_first", [False, True])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_get_codes_from_indices_equals_quantized_in_eval(dtype, channel_first, distance):
    vq = VectorQuantizer(4, 8, channel_first=channel_first, distance=distance, generator=gen(23))
    vq.train()(torch.randn(64, 3, 4, generator=gen(24)).movedim(2, 1) if channel_first
               else torch.randn(64, 3, 4, generator=gen(24)))  # k-means init, one update
    vq.eval()
    z = torch.randn(2, 4, 5, 3, generator=gen(25))
    z = (z if channel_first else z.movedim(1, -1)).to(dtype).requires_grad_()
    out = vq(z)
    codes = vq.get_codes_from_indices(out.indices, dtype)
    assert codes.dtype == dtype and codes.shape == z.shape
    assert torch.equal(codes, out.quantized)  # bitwise
    with pytest.raises(TypeError):
        vq.get_codes_from_indices(out.indices.float())


def test_get_codes_from_indices_rejects_out_of_range():
    vq = VectorQuantizer(4, 8, channel_first=False)
    for bad in (-1, 8):  # -1 used to wrap around to the last code without a word
        with pytest.raises(ValueError, match=r"\[0, 8\)"):
            vq.get_codes_from_indices(torch.tensor([[0, bad]]))
    assert vq.get_codes_from_indices(torch.zeros(0, dtype=torch.long)).shape == (0, 4)


def test_channel_first_hint_for_a_channel_first_input():
    with pytest.raises(ValueError, match="channel_first=True"):  # (B, C, T) audio with T != C
        VectorQuantizer(16, 64)(torch.randn(2, 16, 50))


# ---------------------------------------------------------------- masks


def _state(vq):
    return {k: v.detach().clone() for k, v in vq.state_dict().items()}


@pytest.mark.parametrize("kw", [dict(ema=True, init="normal"), dict(ema=False, init="kmeans"),
                                dict(ema=True, init="kmeans", dead_code_threshold=None),
                                dict(ema=False, init="normal", distance="cosine", dead_code_threshold=0.9)])
@pytest.mark.parametrize("channel_first", [False, True])
def test_mask_equals_selecting_the_real_rows(kw, channel_first):
    make = lambda: VectorQuantizer(3, 6, channel_first=channel_first, decay=0.5, generator=gen(30), **kw)  # noqa: E731
    full, ref = make(), make()
    x = torch.randn(4, 7, 3, generator=gen(31))
    x[0, 5] = float("nan")  # padding may hold anything
    mask = torch.rand(4, 7, generator=gen(32)) > 0.4
    mask[0, 5] = False
    z = (x.movedim(-1, 1) if channel_first else x).clone().requires_grad_()
    zr = x[mask].clone().requires_grad_()  # (n, 3): the real rows, channel-last
    ref.channel_first = False
    for step in range(3):
        out = full(z, mask=mask)
        out_ref = ref(zr)
        q = out.quantized.movedim(1, -1) if channel_first else out.quantized
        assert torch.equal(out.indices[mask], out_ref.indices)
        assert torch.equal(q[mask], out_ref.quantized)
        for name in ("loss", "codebook_loss", "commitment_loss", "usage", "perplexity", "z_norm", "q_norm",
                     "quantization_error"):
            torch.testing.assert_close(getattr(out, name), getattr(out_ref, name), msg=name)
        g = torch.randn(4, 7, 3, generator=gen(33 + step))
        (gz,) = torch.autograd.grad((q * g * mask[..., None]).sum() + out.loss, z)
        (gr,) = torch.autograd.grad((out_ref.quantized * g[mask]).sum() + out_ref.loss, zr)
        gz = gz.movedim(1, -1) if channel_first else gz
        torch.testing.assert_close(gz[mask], gr)
        assert not gz[~mask].any()  # masked positions get no gradient from the losses
        state, state_ref = _state(full), _state(ref)
        for k in state:
            torch.testing.assert_close(state[k], state_ref[k], msg=k)
        assert torch.isfinite(state["embedding"]).all()


def test_bad_masks():
    vq = VectorQuantizer(3, 4, channel_first=False)
    z = torch.randn(2, 5, 3)
    with pytest.raises(TypeError, match="bool"):
        vq(z, mask=torch.ones(2, 5))
    with pytest.raises(TypeError, match="bool"):
        vq(z, mask=[[True] * 5] * 2)
    with pytest.raises(ValueError, match="leading shape"):
        vq(z, mask=torch.ones(2, 5, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="leading shape"):
        vq(z, mask=torch.ones(5, 2, dtype=torch.bool))


def test_fully_masked_batch_updates_nothing():
    vq = VectorQuantizer(3, 4, ema=True, channel_first=False).train()
    before = _state(vq)
    out = vq(torch.randn(2, 5, 3), mask=torch.zeros(2, 5, dtype=torch.bool))
    assert out.loss.item() == 0.0 and out.usage.item() == 0.0 and out.perplexity.item() == 1.0
    assert all(torch.equal(v, before[k]) for k, v in _state(vq).items())


# ---------------------------------------------------------------- bad batches


@pytest.mark.parametrize("kw", [dict(ema=True, init="normal"), dict(init="kmeans"),
                                dict(ema=True, init="kmeans", dead_code_threshold=0.5),
                                dict(ema=False, init="normal", dead_code_threshold=None)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_batch_raises_before_any_state_change(kw, bad):
    vq = VectorQuantizer(3, 4, decay=0.5, channel_first=False, generator=gen(40), **kw).train()
    if kw["init"] == "normal":
        vq(torch.randn(20, 3, generator=gen(41)))  # a good step first
    before = _state(vq)
    z = torch.randn(4, 6, 3, generator=gen(42))
    z[1, 2, 0] = bad
    z[3, 0, 1] = bad
    with pytest.raises(ValueError, match=r"2 row\(s\) with NaN or inf \(first at leading index \(1, 2\)\)"):
        vq(z)
    after = _state(vq)
    assert all(torch.equal(after[k], before[k]) for k in before), "state changed"
    vq.eval()
    with pytest.raises(ValueError, match="NaN or inf"):
        vq(z)
    vq.train()(z, mask=torch.ones(4, 6, dtype=torch.bool).index_put_((torch.tensor([1, 3]),), torch.tensor(False)))
    assert all(torch.isfinite(v).all() for v in _state(vq).values())  # masked bad rows are fine


# ---------------------------------------------------------------- defaults that train


@pytest.mark.parametrize("k", [16, 1024])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_defaults_train_at_any_scale_and_codebook_size(one_thread, k, scale):
    """Measured (D = 16, N = max(1024, 4K) vectors N(3, 1) * scale per step, Adam lr 1e-3, 5 steps):
    usage 1.0 for K = 16; 1.0 then 0.79-0.85 for K = 1024, at every scale. The old defaults
    (normal(0, 1) codes, no resets) gave 0.06 (K = 16, scale 1e-3) and 0.02-0.03 (K = 1024)."""
    g = torch.Generator().manual_seed(0)
    n, d = max(1024, 4 * k), 16
    usage = {}
    for name, kw in (("new", {}), ("old", dict(init="normal", dead_code_threshold=0.0))):
        vq = VectorQuantizer(d, k, generator=gen(1), **kw)
        opt = torch.optim.Adam(vq.parameters(), lr=1e-3)
        usage[name] = []
        for _ in range(5):
            out = vq(scale * (torch.randn(n, d, generator=g) + 3.0))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            usage[name].append(out.usage.item())
    assert min(usage["new"]) >= (0.99 if k == 16 else 0.7), usage
    if scale != 1.0:
        assert max(usage["old"]) <= 0.3, usage


def test_automatic_dead_code_rule_acts_early():
    """A code that is never chosen is replaced after 16 K / N steps (here 16 * 8 / 32 = 4)."""
    vq = VectorQuantizer(2, 8, init="normal", generator=gen(50), channel_first=False)
    with torch.no_grad():
        vq.codebook[5] = torch.tensor([1e6, 1e6])  # far away: never chosen
    g = torch.Generator().manual_seed(51)
    replaced_at = None
    for step in range(1, 8):
        vq(torch.randn(32, 2, generator=g))
        if replaced_at is None and vq.codebook[5, 0].item() < 1e5:
            replaced_at = step
    assert replaced_at == 4
    assert vq.unused_for[5].item() < 16 * 8


# ---------------------------------------------------------------- cosine VQ


@pytest.mark.parametrize("ema", [False, True])
def test_cosine_is_normalised_everywhere(ema):
    vq = VectorQuantizer(4, 6, distance="cosine", ema=ema, channel_first=False, generator=gen(60))
    z = 5.0 * torch.randn(200, 4, generator=gen(61))
    out = vq.train()(z.clone().requires_grad_())  # spherical k-means init, then an update
    assert torch.allclose(vq.codes().norm(dim=1), torch.ones(6))
    if ema:  # the EMA update keeps the stored codes on the sphere
        assert torch.allclose(vq.codebook.norm(dim=1), torch.ones(6))
    assert torch.allclose(out.quantized.norm(dim=1), torch.ones(200))
    # the losses compare unit vectors: invariant to the scale of z
    out_a = vq.eval()(z)
    out_b = vq(1e3 * z)
    assert torch.equal(out_a.indices, out_b.indices)
    torch.testing.assert_close(out_a.commitment_loss, out_b.commitment_loss)
    zn = torch.nn.functional.normalize(z, dim=1)
    expect = (zn - out_a.quantized).pow(2).sum() / zn.numel()
    torch.testing.assert_close(out_a.commitment_loss, expect)
    # the gradient reaching raw z passes through the normalisation: orthogonal to z
    leaf = z.clone().requires_grad_()
    o = vq(leaf)
    (gz,) = torch.autograd.grad((o.quantized * torch.randn(200, 4, generator=gen(62))).sum() + o.loss, leaf)
    assert ((gz * z).sum(1).abs() <= 1e-4 * gz.norm(dim=1) * z.norm(dim=1)).all()


def test_cosine_kmeans_init_is_spherical_kmeans():
    from rotvq.kmeans import kmeans
    z = torch.randn(300, 4, generator=gen(63)) * torch.rand(300, 1, generator=gen(64)) * 10
    vq = VectorQuantizer(4, 5, distance="cosine", channel_first=False, generator=gen(65))
    vq.generator = gen(65)  # the constructor drew the placeholder from the first one
    vq._setup(z, None, torch.zeros(300, dtype=torch.bool), None, z.shape[:-1])
    expect, _ = kmeans(torch.nn.functional.normalize(z, dim=1), 5, iters=10, generator=gen(65), distance="cosine")
    assert torch.equal(vq.codebook.detach(), expect)


def test_metrics():
    out = VectorQuantizer(3, 4, channel_first=False)(torch.randn(10, 3))
    m = out.metrics()
    assert list(m) == ["loss", "codebook_loss", "commitment_loss", "usage", "perplexity", "z_norm", "q_norm",
                       "quantization_error"]
    assert all(type(v) is float for v in m.values())
    assert m["usage"] == out.usage.item() and m["loss"] == pytest.approx(out.loss.item())


# ---------------------------------------------------------------- torch.compile


@pytest.mark.slow
@pytest.mark.parametrize("kw, masked", [(dict(ema=True), False), (dict(ema=False, distance="cosine"), True)])
def test_compiled_training_step_matches_eager(one_thread, kw, masked):
    """fullgraph compile of a training step after init (EMA or learned codebook, automatic dead
    codes, statistics, a mask): forward bitwise equal to eager from the same state, gradients and
    new state to tolerance."""
    make = lambda: VectorQuantizer(4, 8, channel_first=False, generator=gen(70), **kw)  # noqa: E731
    eager, comp = make(), make()
    g = torch.Generator().manual_seed(71)
    z0 = torch.randn(32, 4, generator=g).abs()
    eager(z0)
    comp(z0)  # initialise eagerly (k-means)
    with torch.no_grad():
        eager.codebook[3] = comp.codebook[3] = torch.full((4,), -100.0)  # a dead code, reset within 8 steps

    def step(vq, z, mask):
        out = vq(z, mask=mask)
        return out, out.loss + (out.quantized * 1.5).sum()

    compiled = torch.compile(step, fullgraph=True)
    for _ in range(8):
        with torch.no_grad():  # same state before each step: compare one step at a time
            for a, b in zip(comp.state_dict().values(), eager.state_dict().values()):
                a.copy_(b)
        z = torch.randn(32, 4, generator=g).abs().requires_grad_()  # positive: code 3 is never chosen
        mask = torch.rand(32, generator=g) > 0.3 if masked else None
        out_c, loss_c = compiled(comp, z, mask)
        out_e, loss_e = step(eager, z, mask)
        assert torch.equal(out_c.indices, out_e.indices) and torch.equal(out_c.quantized, out_e.quantized)
        torch.testing.assert_close(torch.autograd.grad(loss_c, z)[0], torch.autograd.grad(loss_e, z)[0])
        for name in ("usage", "perplexity", "quantization_error"):
            torch.testing.assert_close(getattr(out_c, name), getattr(out_e, name))
        for (k, a), b in zip(comp.state_dict().items(), eager.state_dict().values()):
            torch.testing.assert_close(a, b, msg=k)
    assert eager.codebook[3, 0].item() > -50 and comp.codebook[3, 0].item() > -50  # dead code replaced


@pytest.mark.parametrize("ema", [False, True])
def test_loads_checkpoints_without_unused_for(ema):
    """The format before this layer's rewrite: embedding, (embed_sum,) cluster_size, initialized."""
    vq = VectorQuantizer(3, 4, ema=ema, channel_first=False)
    vq(torch.randn(20, 3))
    state = vq.state_dict()
    del state["unused_for"]  # written before the automatic dead-code rule existed
    assert set(state) == {"embedding", "cluster_size", "initialized"} | ({"embed_sum"} if ema else set())
    fresh = VectorQuantizer(3, 4, ema=ema, channel_first=False)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.codebook, vq.codebook) and not fresh.unused_for.any()
    before = fresh.codebook.detach().clone()
    fresh(torch.randn(20, 3))  # initialized=True came with it: no second k-means init
    assert ema or torch.equal(fresh.codebook, before)


def test_partial_load_leaves_unused_for_alone():
    """A parent's strict=False load of a state dict without the layer's keys keeps its counters."""
    parent = torch.nn.ModuleDict({"vq": VectorQuantizer(3, 4, init="normal", channel_first=False),
                                  "head": torch.nn.Linear(3, 3)})
    with torch.no_grad():
        parent["vq"].codebook[2] = 1e6  # never chosen: unused_for grows
    parent["vq"](torch.randn(20, 3, generator=gen(90)))
    before = parent["vq"].unused_for.clone()
    assert before[2] == 20
    parent.load_state_dict({"head.weight": torch.eye(3), "head.bias": torch.zeros(3)}, strict=False)
    assert torch.equal(parent["vq"].unused_for, before)


def test_kmeans_init_on_a_first_batch_smaller_than_the_codebook():
    """N = 5 < K = 64 on the first batch: no crash, 64 distinct finite codes (5 of them the batch rows,
    the rest perturbed copies), and the automatic dead-code rule spreads the idle ones within 16 K / N steps."""
    vq = VectorQuantizer(4, 64, channel_first=False, generator=gen(91))
    g = torch.Generator().manual_seed(92)
    first = torch.randn(5, 4, generator=g)
    vq(first)
    cb = vq.codebook.detach()
    assert torch.isfinite(cb).all() and torch.unique(cb, dim=0).shape[0] == 64
    assert all((cb == row).all(1).any() for row in first)
    usage = [vq(torch.randn(256, 4, generator=g)).usage.item() for _ in range(8)]
    assert usage[-1] >= 0.8 and max(usage[:3]) < 0.7, usage  # measured: 0.59, 0.61, 0.56, 0.61, 0.83, ...


def test_more_dead_codes_than_candidates(monkeypatch):
    """99 codes die at once, 64 candidates (the per-rank floor): every code is still replaced by a batch row."""
    monkeypatch.setattr("rotvq._codebook_state.CANDIDATE_POOL", 10)
    vq = VectorQuantizer(2, 100, init="normal", channel_first=False, generator=gen(80))
    with torch.no_grad():
        vq.codebook[1:] = 1e6
    z = torch.randn(2000, 2, generator=gen(81))  # 2000 >= 16 K: one step is enough
    vq(z)
    cb = vq.codebook.detach()
    assert (cb[1:].abs() < 1e5).all()
    assert all((z == row).all(1).any() for row in cb[1:])
    assert torch.unique(cb[1:], dim=0).shape[0] == 64  # candidates reused beyond the first 64
