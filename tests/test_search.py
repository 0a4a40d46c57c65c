"""Tests of rotvq.search: exact nearest-code search with bounded memory."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rotvq.search import DEFAULT_MEMORY_BUDGET, chunk_size_for_budget, nearest_code
import rotvq.search as search_module


def brute_euclidean(z, e):
    # independent formula: explicit differences, no |z|^2 - 2 z.e + |e|^2 expansion
    return torch.cdist(z, e, compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)


def brute_cosine(z, e):
    return F.cosine_similarity(z[:, None, :], e[None, :, :], dim=-1).argmax(dim=1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(0, 70), k=st.integers(1, 25),
       d=st.integers(1, 6), chunk=st.integers(1, 80), distance=st.sampled_from(["euclidean", "cosine"]))
def test_matches_brute_force_float64(seed, n, k, d, chunk, distance):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    e = torch.randn(k, d, generator=g, dtype=torch.float64)
    got = nearest_code(z, e, distance=distance, chunk_size=chunk)
    brute = brute_euclidean if distance == "euclidean" else brute_cosine
    assert got.dtype == torch.int64 and got.shape == (n,)
    if n:
        assert torch.equal(got, brute(z, e))


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000, None])
def test_chunk_sizes_agree_float32_well_separated(chunk):
    g = torch.Generator().manual_seed(0)
    centers = 10.0 * torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (300,), generator=g)
    z = centers[labels] + 0.01 * torch.randn(300, 16, generator=g)
    assert torch.equal(nearest_code(z, centers, chunk_size=chunk), labels)


def test_leading_shape_and_empty():
    e = torch.randn(5, 3, dtype=torch.float64)
    z = torch.randn(2, 4, 3, dtype=torch.float64)
    idx = nearest_code(z, e)
    assert idx.shape == (2, 4)
    assert torch.equal(idx.reshape(-1), brute_euclidean(z.reshape(-1, 3), e))
    assert nearest_code(torch.randn(0, 7, 3), e.float()).shape == (0, 7)


@pytest.mark.parametrize("chunk", [1, 2, 3, 100])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_exact_ties_go_to_lowest_index(chunk, distance):
    e = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    e[7] = e[3]  # duplicate code: queries at it are tied between 3 and 7
    e[9] = e[3]
    z = e[[3, 3, 7, 9]] + 0.0
    assert nearest_code(z, e, chunk_size=chunk, distance=distance).tolist() == [3, 3, 3, 3]
    # equidistant from +u and -u (z = 0 in euclidean; z orthogonal to both in cosine)
    u = torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.0, 1.0]])
    assert nearest_code(torch.tensor([[0.0, 0.0], [1.0, 0.0]]), u, chunk_size=chunk,
                        distance=distance).tolist() == [0, 0]


def test_cosine_zero_vectors_no_nan_and_scale_invariance():
    e = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    z = torch.tensor([[0.0, 0.0], [3.0, 0.1], [0.1, 0.2], [-1.0, -1.0]])
    assert nearest_code(z, e, distance="cosine").tolist() == [0, 1, 2, 0]
    # cosine is invariant to the scale of codes; euclidean is not
    e2 = torch.tensor([[1.0, 0.0], [0.0, 100.0]])
    z2 = torch.tensor([[1.0, 1.1]])
    assert nearest_code(z2, e2, distance="cosine").item() == 1
    assert nearest_code(z2, e2, distance="euclidean").item() == 0


def test_low_precision_inputs():
    g = torch.Generator().manual_seed(2)
    centers = 4.0 * torch.randn(20, 8, generator=g)
    labels = torch.randint(0, 20, (100,), generator=g)
    z = centers[labels] + 0.01 * torch.randn(100, 8, generator=g)
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(nearest_code(z.to(dtype), centers), labels)
        assert torch.equal(nearest_code(z.to(dtype), centers.to(dtype)), labels)


def test_no_gradient():
    z = torch.randn(5, 3, requires_grad=True)
    e = torch.randn(4, 3, requires_grad=True)
    idx = nearest_code(z, e)
    assert not idx.requires_grad and idx.grad_fn is None


@pytest.mark.parametrize("args,kwargs,exc", [
    ((torch.randn(4, 3), torch.randn(5, 2)), {}, ValueError),
    ((torch.randn(4, 3), torch.randn(5, 3, 1)), {}, ValueError),
    ((torch.randn(4, 3), torch.randn(0, 3)), {}, ValueError),
    ((torch.randn(4, 3), torch.randn(5, 3)), {"distance": "manhattan"}, ValueError),
    ((torch.randn(4, 3), torch.randn(5, 3)), {"chunk_size": 0}, ValueError),
    ((torch.ones(4, 3, dtype=torch.int64), torch.randn(5, 3)), {}, TypeError),
    ((torch.randn(4, 3), torch.ones(5, 3, dtype=torch.int32)), {}, TypeError),
])
def test_bad_inputs(args, kwargs, exc):
    with pytest.raises(exc):
        nearest_code(*args, **kwargs)


def test_chunk_size_for_budget_arithmetic():
    assert chunk_size_for_budget(16384, 128 * 2**20, 4) == 2048
    assert chunk_size_for_budget(16384, 128 * 2**20, 8) == 1024
    assert chunk_size_for_budget(10**9, 1024, 4) == 1  # at least one row
    assert chunk_size_for_budget(3, 12, 4) == 1 and chunk_size_for_budget(3, 24, 4) == 2
    assert DEFAULT_MEMORY_BUDGET == 128 * 2**20
    for bad in [(0, 10, 4), (5, 0, 4), (5, 10, 0)]:
        with pytest.raises(ValueError):
            chunk_size_for_budget(*bad)


@pytest.mark.parametrize("dtype,budget", [(torch.float32, 4096), (torch.float64, 10_000),
                                          (torch.float16, 3000)])
def test_score_matrices_stay_within_budget(monkeypatch, dtype, budget):
    """Every score matrix the search allocates fits the budget (spy on torch.addmm)."""
    sizes = []
    real_addmm = torch.addmm

    def spy(*args, **kwargs):
        out = real_addmm(*args, **kwargs)
        sizes.append((out.shape, out.numel() * out.element_size()))
        return out

    monkeypatch.setattr(search_module.torch, "addmm", spy)
    z = torch.randn(1000, 6).to(dtype)
    e = torch.randn(37, 6).to(dtype)
    idx = nearest_code(z, e, memory_budget=budget)
    monkeypatch.undo()
    assert torch.equal(idx, nearest_code(z, e, chunk_size=1000))
    assert sizes and max(b for _, b in sizes) <= budget
    assert sum(s[0] for s, _ in sizes) == 1000 and all(s[1] == 37 for s, _ in sizes)
    assert len(sizes) == -(-1000 // chunk_size_for_budget(37, budget, 8 if dtype == torch.float64 else 4))


def test_peak_rss_bounded_subprocess():
    """A search whose full score matrix would be ~800 MB stays far below it in max RSS."""
    code = textwrap.dedent("""
        import resource, torch
        from rotvq.search import nearest_code
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(0)
        z = torch.randn(100_000, 8, generator=g)
        e = torch.randn(2048, 8, generator=g)
        nearest_code(z[:64], e, memory_budget=4 * 2**20)   # warm up (BLAS buffers)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        idx = nearest_code(z, e, memory_budget=4 * 2**20)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert idx.shape == (100_000,)
        print((after - before) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True)
    grown = int(out.stdout.strip().splitlines()[-1])
    full_matrix = 100_000 * 2048 * 4
    assert grown < 64 * 2**20 < full_matrix // 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_memory():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(20_000, 16, generator=g, dtype=torch.float64)
    e = torch.randn(500, 16, generator=g, dtype=torch.float64)
    expect = nearest_code(z, e)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    zc, ec = z.cuda(), e.cuda()
    got = nearest_code(zc, ec, memory_budget=2**20)
    peak = torch.cuda.max_memory_allocated() - base
    assert torch.equal(got.cpu(), expect)
    assert peak < zc.nbytes + ec.nbytes + 4 * 2**20


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_two_way_exact_ties_lowest_index_any_chunk(distance):
    """Queries exactly halfway between two close codes get the lower index, in every chunk size."""
    g = torch.Generator().manual_seed(4)
    codes = (20 * torch.randint(-5, 6, (40, 4), generator=g)).float()  # far apart lattice points
    codes = torch.unique(codes, dim=0)[torch.randperm(torch.unique(codes, dim=0).shape[0], generator=g)]
    pairs = []
    for a in range(0, 20, 2):  # make code a+1 a neighbour of code a at distance 2 (a half-integer midpoint)
        codes[a + 1] = codes[a] + torch.tensor([2.0, 0.0, 0.0, 0.0])
        pairs.append((a + 1, a) if a % 4 else (a, a + 1))
    if distance == "cosine":  # ties in angle: two unit codes symmetric about the query
        # rows i = (i + 1) e_(i mod 4): same directions at different lengths (deduplicated as unit codes)
        codes = torch.eye(4).repeat(8, 1)[:30] * torch.arange(1, 31)[:, None]
        q = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 3.0]])
        expect = [0, 2]
    else:
        q = torch.stack([(codes[i] + codes[j]) / 2 for i, j in pairs])
        expect = [min(p) for p in pairs]
    for chunk in (1, 2, 3, 7, 100):
        assert nearest_code(q, codes, chunk_size=chunk, distance=distance).tolist() == expect


def test_chunk_independent_float32_random():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(200, 12, generator=g)
    e = torch.randn(300, 12, generator=g)
    ref = nearest_code(z, e, chunk_size=200)
    for chunk in (1, 3, 64, 199):
        assert torch.equal(nearest_code(z, e, chunk_size=chunk), ref)
    assert torch.equal(ref, brute_euclidean(z.double(), e.double()))


def test_lowest_duplicate_map():
    g = torch.Generator().manual_seed(6)
    e = torch.randn(12, 5, generator=g)
    e[[4, 9]] = e[2].clone()
    e[11] = e[7]
    e[3] = -0.0 * e[3]  # -0.0 and 0.0 are equal codes
    e[5] = 0.0
    expect = torch.arange(12)
    expect[[4, 9]] = 2
    expect[11] = 7
    expect[5] = 3
    assert torch.equal(search_module._lowest_duplicate(e), expect)
    assert search_module._first_occurrences(e).tolist() == [0, 1, 2, 3, 6, 7, 8, 10]
    assert search_module._first_occurrences(torch.randn(50, 3, generator=g)) is None


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_fullgraph_compile_matches_eager(distance):
    """Inside torch.compile(fullgraph=True) the search takes its fixed-shape path (one chunk,
    duplicates mapped after the search): the same indices as eager, ties included."""
    g = torch.Generator().manual_seed(7)
    e = torch.randn(40, 6, generator=g, dtype=torch.float64)
    e[[5, 30]] = e[17].clone()  # duplicates: queries at them resolve to index 5
    z = torch.cat([torch.randn(60, 6, generator=g, dtype=torch.float64), e[[30, 17, 5]]])
    compiled = torch.compile(lambda a, b: nearest_code(a, b, distance=distance), fullgraph=True,
                             backend="aot_eager")
    got = compiled(z, e)
    assert torch.equal(got, nearest_code(z, e, distance=distance))
    assert got[-3:].tolist() == [5, 5, 5]


def _near_tie_data(distance, scale=1.0, seed=5):
    """Queries at midpoints of two codes (noise 1e-3 ... 1e-7: gaps around the rounding
    bound) and near codes, with codes far from the origin (large |z| |e| terms)."""
    gen = torch.Generator().manual_seed(seed)
    k, d = 257, 48
    codes = torch.randn(k, d, generator=gen) + 20.0
    if distance == "cosine":
        codes = F.normalize(torch.randn(k, d, generator=gen), dim=1)
    i, j = torch.randint(0, k, (2, 5000), generator=gen)
    noise = 10.0 ** -torch.randint(3, 8, (5000, 1), generator=gen).double()
    mid = 0.5 * (codes[i] + codes[j]) + (noise * torch.randn(5000, d, generator=gen, dtype=torch.float64)).float()
    z = torch.cat([mid, codes[i] + 0.3 * torch.randn(5000, d, generator=gen)])
    return z * scale, codes * scale


def _float64_best(z, codes, distance):
    z64, c64 = z.double(), codes.double()
    if distance == "euclidean":
        dist = torch.cdist(z64, c64, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    else:  # no F.normalize: its eps would leave tiny vectors unnormalised
        c64 = c64 / c64.abs().amax(1, keepdim=True)
        dist = -(z64 @ (c64 / c64.norm(dim=1, keepdim=True)).T)
    return dist.topk(2, dim=1, largest=False)


def _search_recording_refined(monkeypatch, z, codes, distance):
    """``nearest_code`` and a mask of the rows it re-compared (the others were certified)."""
    refined = []
    real_refine = search_module._refine
    monkeypatch.setattr(search_module, "_refine",
                        lambda b, c, cand, dist: refined.append(b.clone()) or real_refine(b, c, cand, dist))
    got = nearest_code(z, codes, distance=distance)
    rows = torch.cat(refined).double() if refined else z[:0].double()
    probe = torch.randn(z.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    key = lambda t: (t.double() * probe).sum(1)  # noqa: E731 - a row's key, the same arithmetic for both
    return got, torch.isin(key(z), key(rows))


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("scale", [1.0, 2.0**-70, 2.0**60])
def test_certified_rows_agree_with_float64_near_ties(monkeypatch, distance, scale):
    """float32 search with many near-ties, at ordinary, tiny and huge scales: rows whose two
    best expanded scores are farther apart than the rounding bound skip the re-comparison;
    certified rows equal float64 brute force, and so do the re-compared ones (in float64)
    wherever float64 separates the two best codes."""
    z, codes = _near_tie_data(distance, scale)
    got, was_refined = _search_recording_refined(monkeypatch, z, codes, distance)
    best2 = _float64_best(z, codes, distance)
    certified = ~was_refined
    assert int(certified.sum()) > 0 and int(was_refined.sum()) > 0
    assert torch.equal(got[certified], best2.indices[certified, 0])
    gap = (best2.values[:, 1] - best2.values[:, 0]) / best2.values[:, 0].abs().clamp_min(1e-300)
    clear = was_refined & (gap > 1e-12)
    assert torch.equal(got[clear], best2.indices[clear, 0])


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_certification_bound_has_teeth(monkeypatch, distance):
    """The near-tie data are hard enough that a bound 1000x too small certifies wrong rows:
    the agreement above is not vacuous."""
    z, codes = _near_tie_data(distance)
    real_unit = search_module._matmul_unit_roundoff
    monkeypatch.setattr(search_module, "_matmul_unit_roundoff", lambda dt, dev: real_unit(dt, dev) / 1000)
    got, was_refined = _search_recording_refined(monkeypatch, z, codes, distance)
    best2 = _float64_best(z, codes, distance)
    assert int((got != best2.indices[:, 0])[~was_refined].sum()) > 0


def test_reduced_precision_products_widen_the_bound(monkeypatch):
    """With bfloat16 products allowed ("medium") every near-tie row is re-compared, and a mix
    of the legacy and the new precision settings does not break the search."""
    z, codes = _near_tie_data("euclidean")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        got, was_refined = _search_recording_refined(monkeypatch, z, codes, "euclidean")
    finally:
        torch.set_float32_matmul_precision(before)
    assert bool(was_refined[:5000].all())  # every midpoint row
    best2 = _float64_best(z, codes, "euclidean")
    # bfloat16 scores choose the two candidates: exact where the two best are apart by more
    # than bfloat16 resolution
    clear = (best2.values[:, 1] - best2.values[:, 0]) > 1e-2 * best2.values[:, 0]
    assert torch.equal(got[clear], best2.indices[clear, 0])
    mkl = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if mkl is not None and hasattr(mkl, "fp32_precision"):
        old = mkl.fp32_precision
        try:
            mkl.fp32_precision = "bf16"
            assert search_module._matmul_unit_roundoff(torch.float32, torch.device("cpu")) == 2.0**-8
            assert torch.equal(nearest_code(z[:64], codes), got[:64])
        finally:
            mkl.fp32_precision = old


@pytest.mark.parametrize("width", [64, 16 * 3 + 16, 1024])
def test_best_two_matches_topk(width):
    """The striped search for the best two scores gives topk's smallest value, its index and
    the second smallest value on rows with a unique minimum, wherever the runner-up sits
    (same stripe, same column offset, elsewhere), and second == smallest on tied rows."""
    gen = torch.Generator().manual_seed(width)
    scores = torch.randn(400, width, generator=gen)
    offsets = width // search_module._STRIPES
    best = torch.randint(0, width, (400,), generator=gen)
    rows = torch.arange(400)
    scores[rows, best] = -10.0
    # rows 0-99: runner-up at the same column offset (another stripe); 100-199: the next
    # column in the same stripe; 200-299: anywhere; 300-399: a tie with the best
    same_offset = (best[:100] + offsets) % width
    same_stripe = best[100:200] - best[100:200] % offsets + (best[100:200] % offsets + 1) % offsets
    elsewhere = (best[200:300] + 7 * offsets + 3) % width
    tied = (best[300:] + 5) % width
    scores[rows[:100], same_offset] = -9.0
    scores[rows[100:200], same_stripe] = -9.5
    scores[rows[200:300], elsewhere] = -9.25
    scores[rows[300:], tied] = -10.0
    first, index, second = search_module._best_two(scores)
    top = scores.topk(2, dim=1, largest=False)
    assert torch.equal(first, top.values[:, 0]) and torch.equal(second, top.values[:, 1])
    assert torch.equal(index[:300], top.indices[:300, 0]) and torch.equal(index[:300], best[:300])
    assert torch.equal(second[300:], first[300:])


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_striped_search_ties_duplicates_and_nan(distance):
    """A codebook large enough for the striped search (100 codes: padded to 112 columns):
    duplicates and exact two-way ties go to the lowest index, rows with NaN give an index
    in range, and every other row equals float64 brute force."""
    g = torch.Generator().manual_seed(3)
    e = torch.randn(100, 8, generator=g)
    e[[40, 99]] = e[12].clone()  # duplicates of code 12
    z = torch.cat([e[[12, 40, 99]], torch.randn(500, 8, generator=g)])
    if distance == "euclidean":
        e[71] = e[70] + torch.tensor([2.0] + [0.0] * 7)  # a query halfway between 70 and 71
        z = torch.cat([z, ((e[70] + e[71]) / 2)[None]])
    z[5, 2] = float("nan")
    z[7] = 0.0  # cosine: a zero query has similarity 0 with every code, index 0
    got = nearest_code(z, e, distance=distance)
    if distance == "cosine":
        assert int(got[7]) == 0
    assert got[:3].tolist() == [12, 12, 12]
    assert 0 <= int(got[5]) < 100
    brute = (brute_euclidean if distance == "euclidean" else brute_cosine)(z.double(), e.double())
    finite = torch.ones(z.shape[0], dtype=torch.bool)
    finite[5] = False
    if distance == "cosine":
        finite[7] = False
    assert torch.equal(got[finite][3:], brute[finite][3:])
    if distance == "euclidean":
        assert int(got[-1]) == 70
