"""VectorQuantizer on several processes: 2 gloo ranks on CPU (and NCCL on 2 GPUs when present).

One spawn runs every scenario on both ranks, each rank with different data; the tests
then compare the ranks' states with each other (identical) and with one process fed
the concatenated batches (equal up to float summation order). The spawn runs in the
background with a deadline: a hang fails the tests instead of blocking them.
"""
from __future__ import annotations

import inspect
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rotvq import VectorQuantizer

K, D, ROWS, STEPS = 8, 3, 24, 4
STATS = ("usage", "perplexity", "z_norm", "q_norm", "quantization_error")
# name -> (layer keyword arguments, data options)
SCENARIOS = {
    "plain": (dict(init="normal", dead_code_threshold=0.0), {}),
    "kmeans": (dict(init="kmeans", dead_code_threshold=0.0), {}),
    "ema": (dict(ema=True, init="normal", dead_code_threshold=0.0), {}),
    "dead": (dict(init="normal", dead_code_threshold=None), {}),
    "dead_classic": (dict(ema=True, init="normal", dead_code_threshold=0.5, decay=0.5), {}),
    "all": (dict(ema=True, init="kmeans", dead_code_threshold=None, distance="cosine"), dict(mask=True)),
    "empty": (dict(ema=True, init="kmeans", dead_code_threshold=None), dict(empty=(0, 2))),
    "group": (dict(ema=True, init="normal", dead_code_threshold=None), dict(group=True)),
}
TIMEOUT_S = 150
# DDP's per-forward buffer broadcast: `broadcast_buffers`, renamed `forward_sync_buffers` in newer torch
_SYNC_BUFFERS = ("forward_sync_buffers"
                 if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                 else "broadcast_buffers")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(name: str, world: int = 2):
    """Per step: the ranks' inputs and masks (rank r: rows [r*ROWS, (r+1)*ROWS) of a global batch)."""
    g = torch.Generator().manual_seed(list(SCENARIOS).index(name))
    opts = SCENARIOS[name][1]
    steps = []
    for step in range(STEPS):
        x = 2.0 * torch.randn(world * ROWS, D, generator=g) + 1.0
        masks = [torch.rand(ROWS, generator=g) > 0.3 if opts.get("mask") else None for _ in range(world)]
        xs = [x[r * ROWS:(r + 1) * ROWS] for r in range(world)]
        if step in opts.get("empty", ()):  # rank 1: an empty batch, then a fully masked one
            if step == opts["empty"][0]:
                xs[1] = x[:0]
            else:
                masks[1] = torch.zeros(ROWS, dtype=torch.bool)
        steps.append((xs, masks))
    return steps


def _make(name: str, seed: int, device="cpu", **extra):
    vq = VectorQuantizer(D, K, channel_first=False, generator=torch.Generator().manual_seed(seed),
                         **SCENARIOS[name][0], **extra).to(device).train()
    with torch.no_grad():
        vq.codebook[5] = 100.0  # a code no vector chooses: the dead-code rules must act
    return vq


def _pending(rank: int, device="cpu"):
    """k-means pending on one rank only: rank 0 resumed from an initialised checkpoint, the others fresh."""
    vq = VectorQuantizer(D, K, ema=True, channel_first=False, generator=torch.Generator().manual_seed(rank))
    if rank == 0:
        vq.load_state_dict(VectorQuantizer(D, K, ema=True, init="normal", channel_first=False,
                                           generator=torch.Generator().manual_seed(5)).state_dict())
    return vq.to(device).train()


def _record(vq, out):
    return ({k: v.detach().cpu().clone() for k, v in vq.state_dict().items()},
            {s: getattr(out, s).detach().cpu().clone() for s in STATS})


class _AE(nn.Module):
    """Linear encoder -> VQ -> linear decoder, for the DDP scenario."""

    def __init__(self, **vq_kw):
        super().__init__()
        self.enc, self.dec = nn.Linear(4, D), nn.Linear(D, 4)
        self.vq = VectorQuantizer(D, K, channel_first=False, generator=torch.Generator().manual_seed(0), **vq_kw)

    def forward(self, x):
        out = self.vq(self.enc(x))
        return (self.dec(out.quantized) - x).pow(2).mean() + out.loss


def _ddp_data(world: int = 2):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(world * ROWS, 4, generator=g) for _ in range(STEPS)]


def _train_ae(model, batches, rank=0, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # linear in the gradient (Adam amplifies rounding
    # noise: the k-means codes start at their clusters' means, where the codebook gradient is ~0)
    states = []
    for x in batches:
        n = x.shape[0] // world  # this rank's contiguous slice of the global batch
        loss = model(x[rank * n:(rank + 1) * n])
        opt.zero_grad()
        loss.backward()
        opt.step()
        inner = model.module if hasattr(model, "module") else model
        states.append({k: v.detach().cpu().clone() for k, v in inner.state_dict().items()})
    return states


def _worker(rank: int, world: int, port: int, backend: str, out_path: str) -> None:
    """One rank: every scenario, then DDP, then a non-finite batch; results saved to out_path."""
    torch.set_num_threads(1)
    # "gloo-cuda": gloo with every tensor on one GPU, the device handling NCCL needs, testable on one GPU
    dist.init_process_group(backend.split("-")[0], init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    device = {"nccl": torch.device(f"cuda:{rank}"), "gloo-cuda": torch.device("cuda:0")}.get(backend, "cpu")
    results = {}
    try:
        for name in SCENARIOS:
            extra = {"process_group": dist.new_group(list(range(world)))} if SCENARIOS[name][1].get("group") else {}
            vq = _make(name, seed=rank, device=device, **extra)  # different seeds: the first step syncs them
            results[name] = []
            for xs, masks in _batches(name, world):
                m = None if masks[rank] is None else masks[rank].to(device)
                results[name].append(_record(vq, vq(xs[rank].to(device), mask=m)))
        # sync=False: each rank keeps its own state
        vq = _make("ema", seed=0, device=device, sync=False)
        for xs, _ in _batches("ema", world):
            vq(xs[rank].to(device))
        results["unsynced"] = _record(vq, vq.eval()(xs[rank].to(device)))[0]
        for bb in (False, True):
            torch.manual_seed(0)
            model = _AE(init="kmeans").to(device)
            ddp = nn.parallel.DistributedDataParallel(model, **{_SYNC_BUFFERS: bb})
            results[f"ddp_{bb}"] = _train_ae(ddp, [x.to(device) for x in _ddp_data(world)], rank, world)
        # a NaN on rank 1 only: both ranks raise, nothing changes, and the next step still runs
        vq = _make("all", seed=0, device=device)
        x = _batches("all", world)[0][0][rank].clone().to(device)
        vq(x)
        before = {k: v.clone() for k, v in vq.state_dict().items()}
        bad = x.clone()
        if rank == 1:
            bad[3, 1] = float("nan")
        try:
            vq(bad)
            results["nan"] = "no error"
        except ValueError as err:
            results["nan"] = str(err)
        results["nan_unchanged"] = all(torch.equal(v, before[k]) for k, v in vq.state_dict().items())
        vq(x)  # collectives still line up
        vq = _pending(rank, device)
        results["pending"] = [_record(vq, vq(xs[rank].to(device)))[0] for xs, _ in _batches("ema", world)]
    finally:
        torch.save(results, f"{out_path}/rank{rank}.pt")
        dist.destroy_process_group()


def _stuck_worker(rank: int, world: int, port: int, backend: str, out_path: str) -> None:
    """Stands for a rank stuck in a collective that another rank skipped."""
    time.sleep(600)


def _spawn(tmp_path, backend: str, world: int = 2, worker=_worker, timeout_s: float = TIMEOUT_S):
    port = _free_port()
    ctx = mp.start_processes(worker, args=(world, port, backend, str(tmp_path)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish within {timeout_s} s (a hang)")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def gloo(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    return _spawn(tmp_path_factory.mktemp("gloo"), "gloo")


def _reference(name: str):
    """One process, seed of rank 0, fed the concatenation of the ranks' (real) rows."""
    vq = _make(name, seed=0)
    records = []
    for xs, masks in _batches(name):
        rows = [x if m is None else x[m] for x, m in zip(xs, masks)]
        records.append(_record(vq, vq(torch.cat(rows))))
    return records


def _assert_states(a, b, exact, what):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), f"{what}: {k} differs between ranks"
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=f"{what}: {k}")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ranks_identical_and_equal_to_one_process(gloo, name):
    r0, r1 = gloo[0][name], gloo[1][name]
    ref = _reference(name)
    for step, ((s0, st0), (s1, st1), (sr, str_)) in enumerate(zip(r0, r1, ref)):
        _assert_states(s0, s1, True, f"{name} step {step}")
        _assert_states(st0, st1, True, f"{name} step {step} statistics")
        _assert_states(s0, sr, False, f"{name} step {step} vs one process")
        _assert_states(st0, str_, False, f"{name} step {step} statistics vs one process")
    final = r0[-1][0]
    if name.startswith("dead") or name in ("all", "empty", "group"):
        assert final["embedding"][5].abs().max() < 50, "the planted dead code was not replaced"
    if "kmeans" in SCENARIOS[name][0].values():
        assert bool(final["initialized"])


def test_a_hang_fails_instead_of_blocking(tmp_path):
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="a hang"):
        _spawn(tmp_path, "gloo", worker=_stuck_worker, timeout_s=2)
    assert time.monotonic() - start < 30


def test_sync_false_lets_ranks_differ(gloo):
    a, b = gloo[0]["unsynced"], gloo[1]["unsynced"]
    assert not torch.equal(a["embedding"], b["embedding"])


@pytest.mark.parametrize("broadcast_buffers", [False, True])
def test_ddp_identical_and_equal_to_one_process(gloo, broadcast_buffers):
    torch.manual_seed(0)
    ref = _train_ae(_AE(init="kmeans"), _ddp_data())
    for step, (s0, s1, sr) in enumerate(zip(gloo[0][f"ddp_{broadcast_buffers}"],
                                             gloo[1][f"ddp_{broadcast_buffers}"], ref)):
        _assert_states(s0, s1, True, f"DDP step {step}")
        _assert_states(s0, sr, False, f"DDP step {step} vs one process")


def test_kmeans_pending_on_one_rank_only(gloo):
    """Rank 0 loaded an initialised checkpoint, rank 1 is fresh (k-means pending there only): this used to
    hang (rank 1 in the k-means all_reduce, rank 0 in the state broadcast). Now rank 0's state wins, no
    k-means runs, and the ranks equal one process that loaded the checkpoint and saw both batches."""
    vq = _pending(0)
    ref = [_record(vq, vq(torch.cat(xs)))[0] for xs, _ in _batches("ema")]
    for step, (s0, s1, sr) in enumerate(zip(gloo[0]["pending"], gloo[1]["pending"], ref)):
        _assert_states(s0, s1, True, f"pending step {step}")
        _assert_states(s0, sr, False, f"pending step {step} vs one process")


def test_non_finite_on_one_rank_raises_on_every_rank(gloo):
    assert "row(s) with NaN or inf" in gloo[1]["nan"]
    assert "another rank" in gloo[0]["nan"]
    assert gloo[0]["nan_unchanged"] and gloo[1]["nan_unchanged"]


@pytest.mark.parametrize("name", ["plain", "ema", "dead", "dead_classic", "all"])
def test_collective_sequence_does_not_depend_on_the_data(monkeypatch, name):
    """One process with a recording stand-in for a 2-rank group: after the first step, every training call
    issues the same collectives (kind, shape, dtype, device) whatever the batch (full, empty, fully masked,
    no dead code, all codes dead but one); a non-finite batch issues a prefix of them and raises after the
    all_reduce that tells every rank; eval mode issues none."""
    import rotvq.distributed as D_
    calls = []

    def record(kind):
        def f(t, group):
            if group is None:  # the real helpers are the identity without a group
                return t
            calls.append((kind, tuple(t.shape), t.dtype, t.device.type))
            return torch.cat([t, t]) if kind == "all_gather" else t
        return f

    monkeypatch.setattr(D_, "resolve_group", lambda sync, group=None: "G" if sync else None)
    monkeypatch.setattr(D_, "world_size", lambda group: 1 if group is None else 2)
    monkeypatch.setattr(D_, "all_reduce_sum", record("all_reduce"))
    monkeypatch.setattr(D_, "all_gather_rows", record("all_gather"))
    monkeypatch.setattr(D_, "broadcast_from_first", record("broadcast"))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    g = torch.Generator().manual_seed(3)
    x = 2.0 * torch.randn(ROWS, D, generator=g) + 1.0
    mask = torch.rand(ROWS, generator=g) > 0.3 if SCENARIOS[name][1].get("mask") else None
    variants = {"full": (x, mask), "empty": (x[:0], None if mask is None else mask[:0]),
                "masked": (x, torch.zeros(ROWS, dtype=torch.bool)),
                "one_code": (x[:1].expand(8 * ROWS, D), None)}  # 192 >= 16 K rows, one code used: the rest die
    seqs = {}
    for variant, (z, m) in variants.items():
        vq = _make(name, seed=0)
        vq(x, mask=mask)  # first call: state broadcast (and k-means)
        calls.clear()
        for _ in range(4):
            vq(z, mask=m)
        seqs[variant] = list(calls)
    assert seqs["full"] and all(seq == seqs["full"] for seq in seqs.values()), seqs
    calls.clear()
    vq.eval()(x, mask=mask)
    assert calls == []
    bad = x.clone()
    bad[0 if mask is None else int(mask.nonzero()[0]), 1] = float("nan")  # an unmasked row
    with pytest.raises(ValueError, match="NaN"):
        vq.train()(bad, mask=mask)
    assert calls == seqs["full"][:1] and calls[0][0] == "all_reduce"


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2
                    or not dist.is_nccl_available(), reason="needs 2 CUDA devices and NCCL")
def test_nccl_two_gpus(tmp_path):
    ranks = _spawn(tmp_path, "nccl")
    for name in SCENARIOS:
        for (s0, st0), (s1, st1) in zip(ranks[0][name], ranks[1][name]):
            _assert_states(s0, s1, True, f"nccl {name}")
            _assert_states(st0, st1, True, f"nccl {name} statistics")


@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_available(), reason="needs CUDA")
def test_gloo_with_cuda_tensors(tmp_path):
    """Every scenario with the layer and data on a GPU (both ranks on cuda:0, gloo): every tensor the layer
    pads, gathers or broadcasts lives on the layer's device, as NCCL requires; the ranks stay identical."""
    ranks = _spawn(tmp_path, "gloo-cuda")
    for name in list(SCENARIOS) + ["pending"]:
        for r0, r1 in zip(ranks[0][name], ranks[1][name]):
            for a, b in zip(r0 if name != "pending" else (r0,), r1 if name != "pending" else (r1,)):
                _assert_states(a, b, True, f"gloo-cuda {name}")
    assert "another rank" in ranks[0]["nan"] and ranks[0]["nan_unchanged"] and ranks[1]["nan_unchanged"]
