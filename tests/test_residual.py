"""Tests of rotvq.ResidualVQ: the estimator across stages (sympy and numbers), codes, dropout, masks, ranks."""
from __future__ import annotations

import pytest
import sympy
import torch
import torch.distributed as dist

import rotvq
from rotvq import ResidualVQ, VectorQuantizer
from rotvq import symbolic as rs

from test_distributed import _spawn


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ---------------------------------------------------------------- the estimator across stages, symbolically


def _generic_matrix(name, d):
    return sympy.Matrix(d, d, lambda i, j: sympy.Symbol(f"{name}_{i}{j}", real=True))


def _estimator(G, z, q):
    """The book's generalized estimator z_q = sg[G] z + sg[q - G z] (eq. gen-def)."""
    return rs.sg(G) * z + rs.sg(q - G * z)


@pytest.mark.parametrize("stages", [2, 3])
def test_what_each_scope_sends_to_the_encoder(stages):
    """r_0 = z, r_i = r_{i-1} - sg[q_i]; codes q_i and surrogates G_i are constants of z (the estimator's premise).

    "sum":   z_q = sg[G] z + sg[q - G z], q = sum q_i          -> forward q, backward G^T g.
    "stage": z_q = sum_i sg[G_i] r_{i-1} + sg[q_i - G_i r_{i-1}] -> forward q, backward sum_i G_i^T g.
    For comparison, the residual taken through each stage's output (EnCodec's code, r_i = r_{i-1} - z_q_i)
    sends G_1^T g + (I - G_1)^T G_2^T g + ..., which is g for the STE (G_i = I).
    """
    d = 2
    z, g = rs.vector("z", d), rs.vector("g", d)
    back = lambda expr: rs.forward(rs.vjp(expr, z, g))  # noqa: E731  (dL/dz at the forward values)
    qs = [rs.vector(f"q{i}", d) for i in range(stages)]
    Gs = [_generic_matrix(f"G{i}", d) for i in range(stages)]
    G = _generic_matrix("G", d)
    q = sum(qs, sympy.zeros(d, 1))

    z_sum = _estimator(G, z, q)
    assert rs.forward(z_sum) == q
    assert sympy.simplify(back(z_sum) - G.T * g) == sympy.zeros(d, 1)

    r, z_stage = z, sympy.zeros(d, 1)
    for Gi, qi in zip(Gs, qs):
        z_stage += _estimator(Gi, r, qi)
        r = r - rs.sg(qi)
    assert sympy.simplify(rs.forward(z_stage) - q) == sympy.zeros(d, 1)
    expect = sum((Gi.T * g for Gi in Gs), sympy.zeros(d, 1))
    assert sympy.simplify(back(z_stage) - expect) == sympy.zeros(d, 1)

    r, z_through = z, sympy.zeros(d, 1)
    for Gi, qi in zip(Gs, qs):
        out = _estimator(Gi, r, qi)
        z_through += out
        r = r - out
    carry, expect = sympy.eye(d), sympy.zeros(d, 1)
    for Gi in Gs:  # d z_q/d z = sum_i G_i prod_{j<i} (I - G_j)
        expect += (Gi * carry).T * g
        carry = (sympy.eye(d) - Gi) * carry
    assert sympy.simplify(back(z_through) - expect) == sympy.zeros(d, 1)

    # the straight-through estimator (G = G_i = I): "sum" sends g, "stage" sends Q g, "through" sends g
    ste = {G[i, j]: int(i == j) for i in range(d) for j in range(d)}
    ste.update({Gi[i, j]: int(i == j) for Gi in Gs for i in range(d) for j in range(d)})
    assert back(z_sum).subs(ste) == g
    assert back(z_stage).subs(ste) == stages * g
    assert sympy.simplify(back(z_through).subs(ste) - g) == sympy.zeros(d, 1)


@pytest.mark.parametrize("estimator", ["ste", "rotation"])
def test_the_layer_sends_what_the_derivation_says(estimator):
    """The estimator's part of dL/dz (losses left out), against the explicit G^T g of each scope."""
    torch.manual_seed(0)
    z = torch.randn(300, 3, generator=gen(1), dtype=torch.float64)  # many rows per code: no residual is 0
    g = torch.randn(300, 3, generator=gen(2), dtype=torch.float64)
    grads, outs = {}, {}
    for scope in ("sum", "stage"):
        rvq = ResidualVQ(3, 4, 3, estimator=estimator, estimator_scope=scope, channel_first=False,
                         generator=gen(3)).double()
        rvq(z)  # k-means init of every stage (training mode)
        rvq.eval()
        leaf = z.clone().requires_grad_()
        outs[scope] = rvq(leaf)
        (grads[scope],) = torch.autograd.grad(outs[scope].quantized, leaf, g)
    assert torch.equal(outs["sum"].quantized, outs["stage"].quantized)  # same forward, bitwise

    def explicit(zz, qq):  # G^T g row by row
        if estimator == "ste":
            return g
        R = rotvq.rotation_matrix(zz, qq)
        scale = (qq.norm(dim=1) / zz.norm(dim=1))[:, None]
        return scale * (R.transpose(1, 2) @ g[..., None])[..., 0]

    torch.testing.assert_close(grads["sum"], explicit(z, outs["sum"].quantized.detach()))
    residual, expect = z, torch.zeros_like(z)
    for stage in outs["stage"].stages:
        expect = expect + explicit(residual, stage.quantized)
        residual = residual - stage.quantized
    torch.testing.assert_close(grads["stage"], expect)
    if estimator == "ste":
        assert torch.equal(grads["stage"], 3 * g) and torch.equal(grads["sum"], g)


# ---------------------------------------------------------------- forward, codes, stages


def test_one_stage_is_the_plain_layer():
    kw = dict(ema=True, decay=0.7, dead_code_threshold=None)
    rvq = ResidualVQ(4, 8, 1, channel_first=False, generator=gen(5), **kw)
    vq = VectorQuantizer(4, 8, channel_first=False, generator=gen(5), **kw)
    for step in range(4):
        z = torch.randn(3, 20, 4, generator=gen(10 + step))
        a, b = rvq(z), vq(z)
        assert torch.equal(a.quantized, b.quantized) and torch.equal(a.indices[..., 0], b.indices)
        for name in rotvq.METRIC_NAMES:  # the sum's norms are summed in another order
            exact = name not in ("q_norm", "quantization_error")
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0 if exact else 1e-6,
                                       atol=0 if exact else 1e-7, msg=name)
        for (k, x), y in zip(rvq.layers[0].state_dict().items(), vq.state_dict().values()):
            assert torch.equal(x, y), k


@pytest.mark.parametrize("channel_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("scope", ["sum", "stage"])
def test_quantized_is_the_sum_of_the_stage_codes_and_comes_back_from_indices(channel_first, dtype, scope):
    rvq = ResidualVQ(4, 8, 3, estimator_scope=scope, channel_first=channel_first, generator=gen(6))
    x = torch.randn(2, 4, 5, 3, generator=gen(7))
    z = x if channel_first else x.movedim(1, -1)
    rvq(z)
    rvq.eval()
    z = z.to(dtype)
    out = rvq(z)
    lead = (2, 5, 3)
    assert out.indices.shape == (*lead, 3) and out.quantized.shape == z.shape and out.quantized.dtype == dtype
    total = out.stages[0].quantized + out.stages[1].quantized + out.stages[2].quantized
    assert torch.equal(out.quantized, total)
    for i, stage in enumerate(out.stages):
        assert torch.equal(stage.indices, out.indices[..., i])
    assert torch.equal(rvq.get_codes_from_indices(out.indices, dtype), out.quantized)  # bitwise
    assert rvq.codebooks.shape == (3, 8, 4)


def test_stages_reduce_the_error_and_losses_add_up():
    z = torch.randn(512, 6, generator=gen(8))
    rvq = ResidualVQ(6, 16, 4, channel_first=False, generator=gen(9))
    out = rvq(z)
    errors = [s.quantization_error.item() for s in out.stages]
    assert errors == sorted(errors, reverse=True), errors  # each stage quantises a smaller residual
    torch.testing.assert_close(out.quantization_error, out.stages[-1].quantization_error)
    for name in ("loss", "codebook_loss", "commitment_loss"):
        torch.testing.assert_close(getattr(out, name), sum(getattr(s, name) for s in out.stages))
    torch.testing.assert_close(out.usage, torch.stack([s.usage for s in out.stages]).mean())
    assert set(out.metrics()) == set(rotvq.METRIC_NAMES)
    q, i, l = out[:3]  # noqa: E741  (vector-quantize-pytorch's unpacking)
    assert q is out.quantized and l is out.loss


def test_shared_codebook():
    rvq = ResidualVQ(4, 8, 3, shared_codebook=True, channel_first=False, generator=gen(11))
    assert len(rvq.layers) == 1 and len(list(rvq.parameters())) == 1
    assert all(s is rvq.layers[0] for s in rvq.stages)
    out = rvq.eval()(torch.randn(30, 4, generator=gen(12)))
    codes = rvq.layers[0].codes().detach()
    for stage in out.stages:
        assert torch.equal(stage.quantized, codes[stage.indices])


# ---------------------------------------------------------------- quantize dropout


def test_quantize_dropout_is_seeded_uniform_and_drops_whole_stages():
    rvq = ResidualVQ(3, 4, 4, quantize_dropout=True, min_quantizers=2, seed=7, init="normal",
                     channel_first=False, generator=gen(13))
    twin = ResidualVQ(3, 4, 4, quantize_dropout=True, min_quantizers=2, seed=7, init="normal",
                      channel_first=False, generator=gen(99))
    other = ResidualVQ(3, 4, 4, quantize_dropout=True, min_quantizers=2, seed=8, init="normal",
                       channel_first=False, generator=gen(13))
    used, used_twin, used_other = [], [], []
    z = torch.randn(10, 3, generator=gen(14))
    for _ in range(60):
        before = [_state(layer) for layer in rvq.layers]
        out = rvq(z)
        n = int((out.indices[0] >= 0).sum())
        used.append(n)
        assert (out.indices[:, :n] >= 0).all() and (out.indices[:, n:] == -1).all()
        for i in range(n, 4):  # dropped stages: no code, no statistic, no update
            assert not out.stages[i].quantized.any() and out.stages[i].usage == 0
            assert all(torch.equal(v, before[i][k]) for k, v in _state(rvq.layers[i]).items())
        assert torch.equal(out.quantized, sum(s.quantized for s in out.stages[:n]))
        used_twin.append(int((twin(z).indices[0] >= 0).sum()))
        used_other.append(int((other(z).indices[0] >= 0).sum()))
    assert used == used_twin  # the same seed, the same choices, whatever the codebooks
    assert used != used_other
    assert set(used) == {2, 3, 4}
    assert rvq.dropout_step.item() == 60
    assert (rvq.eval()(z).indices >= 0).all()  # no dropout in eval mode
    # a checkpoint resumes the sequence
    fresh = ResidualVQ(3, 4, 4, quantize_dropout=True, min_quantizers=2, seed=7, init="normal", channel_first=False)
    fresh.load_state_dict(rvq.state_dict())
    seq = [[int((m.train()(z).indices[0] >= 0).sum()) for _ in range(10)] for m in (rvq, fresh)]
    assert seq[0] == seq[1]


def test_codes_from_indices_skip_dropped_stages():
    rvq = ResidualVQ(3, 4, 3, channel_first=False, generator=gen(15)).eval()
    idx = torch.tensor([[1, 2, -1], [0, -1, -1]])
    codes = rvq.codebooks
    expect = torch.stack([codes[0, 1] + codes[1, 2], codes[0, 0] + 0 * codes[1, 0]])
    assert torch.equal(rvq.get_codes_from_indices(idx), expect)
    with pytest.raises(ValueError, match=r"\[0, 4\) or -1"):
        rvq.get_codes_from_indices(torch.tensor([[1, 2, -2]]))
    with pytest.raises(ValueError, match=r"end with the axes \(3,\)"):
        rvq.get_codes_from_indices(torch.tensor([[1, 2]]))


# ---------------------------------------------------------------- masks, bad input


@pytest.mark.parametrize("scope", ["sum", "stage"])
def test_mask_equals_selecting_the_real_rows(scope):
    make = lambda: ResidualVQ(3, 6, 3, estimator_scope=scope, channel_first=False, ema=True,  # noqa: E731
                              generator=gen(16))
    full, ref = make(), make()
    x = torch.randn(4, 7, 3, generator=gen(17))
    x[0, 5] = float("nan")
    mask = torch.rand(4, 7, generator=gen(18)) > 0.4
    mask[0, 5] = False
    for step in range(3):
        z = x.clone().requires_grad_()
        zr = x[mask].clone().requires_grad_()
        out, out_ref = full(z, mask=mask), ref(zr)
        assert torch.equal(out.indices[mask], out_ref.indices)
        assert torch.equal(out.quantized[mask], out_ref.quantized)
        for name in rotvq.METRIC_NAMES:
            torch.testing.assert_close(getattr(out, name), getattr(out_ref, name), msg=name)
        g = torch.randn(4, 7, 3, generator=gen(19 + step))
        (gz,) = torch.autograd.grad((out.quantized * g * mask[..., None]).sum() + out.loss, z)
        (gr,) = torch.autograd.grad((out_ref.quantized * g[mask]).sum() + out_ref.loss, zr)
        torch.testing.assert_close(gz[mask], gr)
        assert not gz[~mask].any()
        for (k, a), b in zip(_state(full).items(), _state(ref).values()):
            torch.testing.assert_close(a, b, msg=k)


def test_non_finite_input_raises_before_any_state_change():
    rvq = ResidualVQ(3, 4, 3, channel_first=False, generator=gen(20))
    rvq(torch.randn(20, 3, generator=gen(21)))
    before = _state(rvq)
    z = torch.randn(5, 3, generator=gen(22))
    z[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"1 row\(s\) with NaN or inf \(first at leading index \(2,\)\)"):
        rvq(z)
    assert all(torch.equal(v, before[k]) for k, v in _state(rvq).items())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_quantizers=0), ValueError, "num_quantizers"),
    (dict(num_quantizers=2, estimator_scope="each"), ValueError, "estimator_scope"),
    (dict(num_quantizers=2, min_quantizers=3), ValueError, "min_quantizers"),
    (dict(num_quantizers=2, min_quantizers=0), ValueError, "min_quantizers"),
    (dict(num_quantizers=2, quantize_dropout=1), TypeError, "quantize_dropout"),
    (dict(num_quantizers=2, shared_codebook="yes"), TypeError, "shared_codebook"),
    (dict(num_quantizers=2, seed=-1), ValueError, "seed"),
    (dict(num_quantizers=2, distance="cosine"), ValueError, "cosine"),
    (dict(num_quantizers=2, channel_first="no"), TypeError, "channel_first"),
    (dict(num_quantizers=2, decay=2.0), ValueError, "decay"),
    (dict(num_quantizers=2, rotation_trick=True), TypeError, "rotation_trick"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ResidualVQ(3, 4, **kwargs)


# ---------------------------------------------------------------- several processes

ROWS, D, K, Q = 16, 3, 6, 3
RANK_SCENARIOS = {
    "separate": dict(init="kmeans", dead_code_threshold=None),
    "shared_ema": dict(shared_codebook=True, ema=True, init="kmeans", dead_code_threshold=None),
    "dropout_stage": dict(quantize_dropout=True, seed=3, estimator_scope="stage", ema=True, init="normal",
                          dead_code_threshold=0.5, decay=0.5),
    # GroupedVQ of residual groups (D = 3 channels as 3 groups of 1), quantize dropout in every group
    "grouped": dict(groups=3, quantize_dropout=True, seed=1, init="kmeans", dead_code_threshold=None),
    "fsq": dict(levels=(5, 4, 3)),  # no state: the code counts (usage) are global
    # accumulated updates (two micro-batches per update) with dead codes: update() gathers candidates
    "manual": dict(manual_update=True, ema=True, init="normal", dead_code_threshold=None),
}


def _after_step(name, module, step):
    if RANK_SCENARIOS[name].get("manual_update") and step % 2 == 1:
        module.update()


def _rank_batches(world=2, steps=4):
    g = gen(40)
    out = []
    for _ in range(steps):
        x = 2.0 * torch.randn(world * ROWS, D, generator=g) + 1.0
        masks = [torch.rand(ROWS, generator=g) > 0.3 for _ in range(world)]
        out.append(([x[r * ROWS:(r + 1) * ROWS] for r in range(world)], masks))
    return out


def _make_rvq(name, seed):
    kw = dict(RANK_SCENARIOS[name])
    if "levels" in kw:
        return rotvq.FSQ(kw["levels"], channel_first=False).train()
    if "groups" in kw:
        return rotvq.GroupedVQ(D, K, kw.pop("groups"), num_quantizers=Q, channel_first=False, generator=gen(seed),
                               **kw).train()
    return ResidualVQ(D, K, Q, channel_first=False, generator=gen(seed), **kw).train()


def _resume_counter(module):
    """Rank 0 resumes a dropout counter (5 training calls); the first training call broadcasts it."""
    for m in module.modules():
        if isinstance(m, ResidualVQ):
            m.dropout_step.fill_(5)


def _rvq_worker(rank: int, world: int, port: int, backend: str, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    try:
        for name in RANK_SCENARIOS:
            rvq = _make_rvq(name, seed=rank)  # different seeds: the first training call syncs them
            if rank == 0:
                _resume_counter(rvq)
            results[name] = []
            for step, (xs, masks) in enumerate(_rank_batches(world)):
                out = rvq(xs[rank], mask=masks[rank])
                _after_step(name, rvq, step)
                results[name].append((_state(rvq), [out.indices[masks[rank]].clone()] +
                                      [getattr(out, s).detach().clone() for s in ("usage", "q_norm",
                                                                                  "quantization_error")]))
    finally:
        torch.save(results, f"{out_path}/rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rvq_ranks(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    return _spawn(tmp_path_factory.mktemp("rvq"), "gloo", worker=_rvq_worker)


@pytest.mark.parametrize("name", list(RANK_SCENARIOS))
def test_ranks_identical_and_equal_to_one_process(rvq_ranks, name):
    ref = _make_rvq(name, seed=0)
    _resume_counter(ref)
    for step, ((xs, masks), (s0, r0), (s1, r1)) in enumerate(zip(_rank_batches(), rvq_ranks[0][name],
                                                                 rvq_ranks[1][name])):
        out = ref(torch.cat([x[m] for x, m in zip(xs, masks)]))
        _after_step(name, ref, step)
        for k in s0:
            assert torch.equal(s0[k], s1[k]), f"{name} step {step}: {k} differs between ranks"
            torch.testing.assert_close(s0[k], _state(ref)[k], rtol=1e-5, atol=1e-5, msg=f"{name} {step} {k}")
        n0 = r0[0].shape[0]
        assert torch.equal(torch.cat([r0[0], r1[0]]), out.indices), f"{name} step {step}: indices"
        for a, b, c in zip(r0[1:], r1[1:], (out.usage, out.q_norm, out.quantization_error)):
            assert torch.equal(a, b)
            torch.testing.assert_close(a, c.detach(), rtol=1e-5, atol=1e-6)
        assert n0 > 0
