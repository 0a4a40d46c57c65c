"""Tests of rotvq.GroupedVQ (groups of channels, separate or shared codebooks, residual groups) and
rotvq.Projected (a learned projection around any quantizer)."""
from __future__ import annotations

import pytest
import torch

import rotvq
from rotvq import GroupedVQ, Projected, ResidualVQ, VectorQuantizer


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_separate_groups_are_independent_quantizers_on_their_channels():
    kw = dict(ema=True, decay=0.6)
    gvq = GroupedVQ(6, 5, 3, channel_first=False, generator=gen(1), **kw)
    g = gen(1)
    singles = [VectorQuantizer(2, 5, channel_first=False, generator=g, **kw) for _ in range(3)]
    for step in range(3):
        z = torch.randn(4, 9, 6, generator=gen(10 + step), requires_grad=True)
        out = gvq(z)
        assert out.indices.shape == (4, 9, 3) and out.quantized.shape == z.shape
        ref = [vq(z[..., 2 * i:2 * i + 2]) for i, vq in enumerate(singles)]
        assert torch.equal(out.quantized, torch.cat([r.quantized for r in ref], -1))
        for i, r in enumerate(ref):
            assert torch.equal(out.indices[..., i], r.indices)
            assert torch.equal(out.parts[i].usage, r.usage)
        for name in ("loss", "commitment_loss", "usage", "perplexity"):
            torch.testing.assert_close(getattr(out, name), torch.stack([getattr(r, name) for r in ref]).mean())
        # the whole vector's error is the sum of the groups' errors
        torch.testing.assert_close(out.quantization_error, sum(r.quantization_error for r in ref))
        torch.testing.assert_close(out.z_norm, z.detach().norm(dim=-1).mean())
        gz = torch.autograd.grad((out.quantized * 1.5).sum() + out.loss, z)[0]
        gr = torch.autograd.grad(sum((r.quantized * 1.5).sum() + r.loss / 3 for r in ref), z)[0]
        torch.testing.assert_close(gz, gr)  # block-diagonal G: each group's estimator on its channels
    for i, vq in enumerate(singles):
        for (k, a), b in zip(_state(gvq.quantizers[i]).items(), _state(vq).values()):
            assert torch.equal(a, b), k


def test_shared_codebook_is_one_quantizer_on_every_group():
    gvq = GroupedVQ(6, 5, 3, separate_codebooks=False, channel_first=False, generator=gen(2))
    vq = VectorQuantizer(2, 5, channel_first=False, generator=gen(2))
    assert len(gvq.quantizers) == 1
    for step in range(3):
        z = torch.randn(7, 6, generator=gen(20 + step))
        out, ref = gvq(z), vq(z.reshape(7, 3, 2))
        assert torch.equal(out.indices, ref.indices)
        assert torch.equal(out.quantized, ref.quantized.reshape(7, 6))
        assert torch.equal(out.loss, ref.loss) and torch.equal(out.usage, ref.usage)
        assert out.parts[0].quantized.shape == (7, 3, 2)
    assert all(torch.equal(a, b) for a, b in zip(_state(gvq.quantizers[0]).values(), _state(vq).values()))


@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("channel_first", [False, True])
@pytest.mark.parametrize("num_quantizers", [1, 3])
def test_codes_from_indices_and_layouts(separate, channel_first, num_quantizers):
    gvq = GroupedVQ(8, 6, 2, separate_codebooks=separate, num_quantizers=num_quantizers,
                    channel_first=channel_first, generator=gen(3))
    x = torch.randn(3, 8, 5, 2, generator=gen(4))
    z = x if channel_first else x.movedim(1, -1)
    gvq(z)  # k-means init of every quantizer
    gvq.eval()
    out = gvq(z)
    index_shape = (3, 5, 2, 2) + ((num_quantizers,) if num_quantizers > 1 else ())
    assert out.indices.shape == index_shape and out.quantized.shape == z.shape
    assert torch.equal(gvq.get_codes_from_indices(out.indices, z.dtype), out.quantized)  # bitwise
    if num_quantizers > 1:
        assert isinstance(out.parts[0], rotvq.RVQOutput) and len(out.parts[0].stages) == num_quantizers
    with pytest.raises(ValueError, match="end with the axes"):
        gvq.get_codes_from_indices(out.indices[..., :1])


def test_grouped_residual_masks_equal_selecting_rows():
    make = lambda: GroupedVQ(4, 5, 2, num_quantizers=2, channel_first=False, generator=gen(5))  # noqa: E731
    full, ref = make(), make()
    x = torch.randn(3, 6, 4, generator=gen(6))
    x[1, 2] = float("nan")
    mask = torch.rand(3, 6, generator=gen(7)) > 0.3
    mask[1, 2] = False
    for _ in range(2):
        out, out_ref = full(x, mask=mask), ref(x[mask])
        assert torch.equal(out.indices[mask], out_ref.indices)
        for name in rotvq.METRIC_NAMES:
            torch.testing.assert_close(getattr(out, name), getattr(out_ref, name), msg=name)
    for (k, a), b in zip(_state(full).items(), _state(ref).values()):
        torch.testing.assert_close(a, b, msg=k)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dim=6, groups=4), ValueError, "multiple of groups"),
    (dict(dim=6, groups=0), ValueError, "groups"),
    (dict(dim=6, groups=2, separate_codebooks=1), TypeError, "separate_codebooks"),
    (dict(dim=6, groups=2, num_quantizers=0), ValueError, "num_quantizers"),
    (dict(dim=6, groups=2, heads=2), TypeError, "heads"),
])
def test_bad_grouped_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        GroupedVQ(codebook_size=4, **kwargs)


# ---------------------------------------------------------------- Projected


@pytest.mark.parametrize("inner", ["vq", "rvq", "grouped"])
def test_projected_quantizes_in_the_code_space(inner):
    torch.manual_seed(0)
    quantizer = {"vq": lambda: VectorQuantizer(4, 8, generator=gen(8)),
                 "rvq": lambda: ResidualVQ(4, 8, 2, generator=gen(8)),
                 "grouped": lambda: GroupedVQ(4, 8, 2, generator=gen(8))}[inner]()
    model = Projected(quantizer, 16, channel_first=True)
    z = torch.randn(2, 16, 5, generator=gen(9), requires_grad=True)
    out = model(z)
    assert out.quantized.shape == z.shape and out.indices.shape[:2] == (2, 5)
    u = model.project_in(z.movedim(1, -1))
    assert out.z_norm.item() == pytest.approx(u.norm(dim=-1).mean().item(), rel=1e-5)  # statistics in code space
    out.loss.backward(retain_graph=True)
    (out.quantized.sum()).backward()
    assert z.grad.abs().sum() > 0 and model.project_in.weight.grad.abs().sum() > 0
    assert model.project_out.weight.grad.abs().sum() > 0
    model.eval()
    out = model(z.detach())
    assert torch.equal(model.get_codes_from_indices(out.indices), out.quantized)
    assert model.codebook_size == 8


def test_projected_refuses_an_inner_layout_and_non_quantizers():
    with pytest.raises(ValueError, match="channel_first=None"):
        Projected(VectorQuantizer(4, 8, channel_first=False), 16)
    with pytest.raises(TypeError, match="rotvq quantizer"):
        Projected(torch.nn.Linear(4, 4), 16)
    with pytest.raises(ValueError, match="dim"):
        Projected(VectorQuantizer(4, 8), 0)
