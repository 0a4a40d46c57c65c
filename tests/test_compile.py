"""torch.compile(fullgraph=True) of training steps: on a fresh model (k-means init inside the compiled call),
after load_state_dict (no recompilation), and equal to eager mode. Compiling takes tens of seconds on a
small CPU: two tests, marked slow."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import rotvq


def gen(seed):
    return torch.Generator().manual_seed(seed)


class _Model(nn.Module):
    """Linear encoder -> quantizer(s) -> linear decoder; forward returns the training loss and the outputs."""

    def __init__(self, make_quantizers, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.enc, self.dec = nn.Linear(6, 4), nn.Linear(4, 6)
        self.quantizers = nn.ModuleList(make_quantizers(seed))

    def forward(self, x, mask):
        z = self.enc(x)
        outs = [q(z, mask=mask) for q in self.quantizers]
        z_q = sum(o.quantized for o in outs) / len(outs)
        loss = (self.dec(z_q) - x).pow(2).mean() + sum(o.loss for o in outs)
        return loss, outs


def _train_side_by_side(make_quantizers, steps, g, masked, load=None):
    eager, comp = _Model(make_quantizers, 0), _Model(make_quantizers, 0)
    compiled = torch.compile(comp, fullgraph=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (eager, comp)]
    for step in range(steps):
        if step == load:
            checkpoint = _Model(make_quantizers, 7).state_dict()  # a fresh model's: its k-means init is pending
            eager.load_state_dict(checkpoint)
            comp.load_state_dict(checkpoint)
            torch.compiler.set_stance("fail_on_recompile")  # the load must not change the graph
        elif step > 0:  # the same state before each step: compare one step at a time
            with torch.no_grad():
                for a, b in zip(comp.state_dict().values(), eager.state_dict().values()):
                    a.copy_(b)
        x = torch.randn(24, 6, generator=g)
        mask = torch.rand(24, generator=g) > 0.25 if masked else None
        results = []
        for model, fn, opt in ((eager, eager, opts[0]), (comp, compiled, opts[1])):
            loss, outs = fn(x, mask)
            opt.zero_grad()
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            opt.step()
            results.append((loss.detach(), outs, grads))
        (le, oe, ge), (lc, oc, gc) = results
        for a, b in zip(oe, oc):
            assert torch.equal(a.indices, b.indices) and torch.equal(a.quantized, b.quantized), f"step {step}"
            for name in rotvq.METRIC_NAMES:
                torch.testing.assert_close(getattr(a, name), getattr(b, name), msg=f"step {step} {name}")
        torch.testing.assert_close(le, lc)
        for a, b in zip(ge, gc):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        for (k, a), b in zip(comp.state_dict().items(), eager.state_dict().values()):
            torch.testing.assert_close(a, b, msg=f"step {step} {k}", rtol=1e-5, atol=1e-6)
    return eager, comp


@pytest.mark.slow
def test_fresh_and_loaded_vector_quantizer_compile_whole(one_thread):
    """k-means init (default) on the first compiled call, EMA codebook, automatic dead codes, masks."""
    g = gen(1)
    make = lambda seed: [rotvq.VectorQuantizer(4, 8, ema=True, channel_first=False, generator=gen(seed))]  # noqa: E731
    try:
        eager, comp = _train_side_by_side(make, steps=5, g=g, masked=True, load=3)
    finally:
        torch.compiler.set_stance("default")
    assert bool(comp.quantizers[0].initialized) and bool(eager.quantizers[0].initialized)
    assert not comp.quantizers[0]._needs_setup


@pytest.mark.slow
def test_fresh_residual_grouped_and_fsq_compile_whole(one_thread):
    """Grouped residual VQ with quantize dropout (a learned codebook, k-means per stage) and FSQ, fresh."""
    g = gen(2)
    make = lambda seed: [  # noqa: E731
        rotvq.GroupedVQ(4, 6, 2, num_quantizers=2, quantize_dropout=True, seed=3, channel_first=False,
                        generator=gen(seed)),
        rotvq.FSQ((5, 4, 3, 3), channel_first=False)]
    eager, comp = _train_side_by_side(make, steps=4, g=g, masked=False)
    for rvq in comp.quantizers[0].quantizers:
        assert rvq.dropout_step.item() == 4
        assert all(bool(stage.initialized) for stage in rvq.stages)


def test_the_setup_operator_computes_what_the_eager_setup_computes():
    """The operator a compiled graph calls, called directly: the same k-means init as eager mode, then copies."""
    from rotvq._setup import _ORDER
    z = torch.randn(40, 3, generator=gen(3))
    eager = rotvq.VectorQuantizer(3, 5, ema=True, channel_first=False, generator=gen(4))
    op_side = rotvq.VectorQuantizer(3, 5, ema=True, channel_first=False, generator=gen(4))
    eager._setup(z, None, torch.zeros(40, dtype=torch.bool), None, z.shape[:-1])
    state = op_side._synced_tensors()
    order, *new = torch.ops.rotvq.layer_setup(op_side._setup_key, _ORDER, state, z, None,
                                              torch.zeros(40, dtype=torch.bool))
    assert order.item() == _ORDER.item() + 1 and not op_side._needs_setup
    for a, b in zip(new, eager._synced_tensors()):
        assert torch.equal(a, b)
    again = torch.ops.rotvq.layer_setup(op_side._setup_key, _ORDER, new, z, None, None)[1:]
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(again, new))  # copies


def test_copies_are_set_up_on_their_own():
    import copy
    import pickle
    from rotvq._setup import _REGISTRY
    vq = rotvq.ResidualVQ(3, 4, 2, channel_first=False)
    for clone in (copy.deepcopy(vq), pickle.loads(pickle.dumps(vq))):
        keys = {m._setup_key for m in clone.modules() if hasattr(m, "_setup_key")}
        assert len(keys) == 3 and not keys & {m._setup_key for m in vq.modules() if hasattr(m, "_setup_key")}
        assert all(_REGISTRY[m._setup_key] is m for m in clone.modules() if hasattr(m, "_setup_key"))
