"""Tests of rotvq.quantizer.VectorQuantizer."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
    vq = VectorQuantizer(5, 7, distance=distance, generator=gen(seed))
    z = torch.randn(*lead, 5, generator=gen(seed + 1))
    out = vq(z)
    assert isinstance(out, VQOutput)
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    assert out.indices.shape == tuple(lead) and out.indices.dtype == torch.int64
    assert torch.equal(out.quantized, vq.codebook.detach()[out.indices])  # bitwise
    for name in ("loss", "codebook_loss", "commitment_loss", "usage", "perplexity", "z_norm",
                 "q_norm", "quantization_error"):
        value = getattr(out, name)
        assert value.shape == () and torch.isfinite(value), name


def test_statistics_and_losses_by_hand():
    vq = VectorQuantizer(2, 4, codebook_weight=0.7, commitment_weight=0.3)
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


def test_cosine_mode_quantized_is_the_chosen_code():
    vq = VectorQuantizer(2, 2, distance="cosine")
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[10.0, 0.0], [0.0, 0.1]]))
    z = torch.tensor([[0.1, 1.0], [1.0, 0.2]])
    out = vq(z)
    assert out.indices.tolist() == [1, 0]  # euclidean would pick code 1 for both
    assert torch.equal(out.quantized, vq.codebook.detach()[out.indices])


@pytest.mark.parametrize("estimator", list(SURROGATE_NAMES) + ["object"])
def test_every_estimator_same_forward_finite_gradients(estimator):
    est = get_surrogate("rotation_clipped") if estimator == "object" else estimator
    vq = VectorQuantizer(4, 6, estimator=est, generator=gen(3))
    ref = VectorQuantizer(4, 6, estimator="ste", generator=gen(3))
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
    vq = VectorQuantizer(4, 8, generator=gen(6))
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
    vq = VectorQuantizer(2, 2, ema=True, decay=decay, eps=eps)
    old = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    vq.codebook.copy_(old)
    vq.embed_sum.copy_(old)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 10.0]])
    out = vq.train()(z)
    assert torch.equal(out.quantized, old[[0, 0, 1]])  # codes before this call's update
    assert out.loss.item() == pytest.approx(0.25 * out.commitment_loss.item())  # no codebook term
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
    vq = VectorQuantizer(3, 5, generator=gen(0))
    before = vq.codebook.detach().clone()
    vq.train()(torch.randn(20, 3, generator=gen(1)))
    assert torch.equal(vq.codebook.detach(), before)
    assert isinstance(vq.codebook, torch.nn.Parameter)


@pytest.mark.parametrize("ema", [False, True])
def test_dead_code_reset(ema):
    z, _ = clustered(n_centers=1, per=40, d=3, seed=2)  # everything lands on one code
    z.requires_grad_()
    vq = VectorQuantizer(3, 8, ema=ema, decay=0.5, dead_code_threshold=0.6, generator=gen(8))
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
    # same generator seed -> same replacements
    vq2 = VectorQuantizer(3, 8, ema=ema, decay=0.5, dead_code_threshold=0.6, generator=gen(8))
    vq2.train()(z)
    assert torch.equal(vq2.codebook.detach(), after)
    # off by default: nothing replaced
    vq3 = VectorQuantizer(3, 8, ema=ema, decay=0.5, generator=gen(8))
    vq3.train()(z)
    assert not any((vq3.codebook.detach()[k] == z.detach()).all(1).any() for k in dead)


def test_kmeans_init_on_first_training_batch_only():
    z, centers = clustered(n_centers=4, per=30, d=3, seed=3)
    vq = VectorQuantizer(3, 4, init="kmeans", generator=gen(9))
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
    assert vq.codebook.std().item() == pytest.approx(1e-3, rel=0.05)
    vq = VectorQuantizer(64, 512, init="uniform", init_scale=0.5, generator=gen(0))
    assert vq.codebook.abs().max().item() <= 0.5 and vq.codebook.abs().max().item() > 0.49
    a = VectorQuantizer(8, 16, generator=gen(1)).codebook
    assert torch.equal(a, VectorQuantizer(8, 16, generator=gen(1)).codebook)


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
    # one more training step: identical state afterwards (no re-init, same EMA state);
    # dead-code draws use each module's own generator, so give both the same one
    vq.generator, fresh.generator = gen(5), gen(5)
    vq.train()(z * 1.1)
    fresh.train()(z * 1.1)
    for (k, a), (_, b) in zip(vq.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("ema", [False, True])
def test_empty_batch(ema):
    vq = VectorQuantizer(3, 5, ema=ema, init="kmeans").train()
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
    dict(dim=3, codebook_size=4, dead_code_threshold=-1.0),
])
def test_bad_construction(kwargs):
    with pytest.raises(ValueError):
        VectorQuantizer(**kwargs)


def test_bad_forward_inputs():
    vq = VectorQuantizer(3, 4)
    with pytest.raises(ValueError, match="dim=3"):
        vq(torch.randn(5, 4))
    with pytest.raises(ValueError):
        vq(torch.tensor(1.0))
    with pytest.raises(TypeError):
        vq(torch.ones(5, 3, dtype=torch.int64))
    with pytest.raises(TypeError):
        vq([[1.0, 2.0, 3.0]])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    vq = VectorQuantizer(4, 8, generator=gen(11))
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
