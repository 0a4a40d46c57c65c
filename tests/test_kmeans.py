"""Tests of rotvq.kmeans: k-means++ seeding and Lloyd iterations."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rotvq.kmeans import kmeans, kmeans_plusplus


def blobs(k=5, per=40, d=3, sep=100.0, noise=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = sep * torch.randn(k, d, generator=g)
    labels = torch.arange(k).repeat_interleave(per)
    x = centers[labels] + noise * torch.randn(k * per, d, generator=g)
    return x, centers, labels


def inertia(x, c):
    return torch.cdist(x.double(), c.double()).pow(2).min(1).values.sum().item()


def test_plusplus_picks_one_seed_per_well_separated_cluster():
    x, centers, labels = blobs()
    seeds = kmeans_plusplus(x, 5, generator=torch.Generator().manual_seed(1))
    assert seeds.shape == (5, 3)
    # every seed is a data point, and the 5 seeds fall in 5 different clusters
    owner = torch.cdist(seeds, centers).argmin(1)
    assert sorted(owner.tolist()) == [0, 1, 2, 3, 4]
    assert all(bool((x == s).all(1).any()) for s in seeds)


def test_kmeans_recovers_clusters():
    x, centers, labels = blobs()
    c, a = kmeans(x, 5, iters=20, generator=torch.Generator().manual_seed(2))
    match = torch.cdist(c, centers).argmin(1)  # centroid -> true centre
    assert sorted(match.tolist()) == [0, 1, 2, 3, 4]
    assert torch.allclose(c, centers[match], atol=0.1)
    assert torch.equal(match[a], labels)  # assignments are the true partition


def test_assignments_are_nearest_and_lloyd_does_not_increase_inertia():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 4, generator=g, dtype=torch.float64)
    seeds = kmeans_plusplus(x, 8, generator=torch.Generator().manual_seed(7))
    c, a = kmeans(x, 8, iters=30, generator=torch.Generator().manual_seed(7))
    assert c.dtype == torch.float64 and a.dtype == torch.int64 and a.shape == (300,)
    assert torch.equal(a, torch.cdist(x, c).argmin(1))
    assert inertia(x, c) <= inertia(x, seeds) + 1e-9
    # a centroid with points is the mean of its points (Lloyd's fixed point, converged here)
    for j in range(8):
        if (a == j).any():
            assert torch.allclose(c[j], x[a == j].mean(0), atol=1e-9)


def test_iters_zero_returns_seeds():
    x, _, _ = blobs(seed=4)
    seeds = kmeans_plusplus(x, 5, generator=torch.Generator().manual_seed(9))
    c, _ = kmeans(x, 5, iters=0, generator=torch.Generator().manual_seed(9))
    assert torch.equal(c, seeds)


def test_deterministic_with_generator():
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(5))
    r1 = kmeans(x, 7, generator=torch.Generator().manual_seed(11))
    r2 = kmeans(x, 7, generator=torch.Generator().manual_seed(11))
    assert torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1])
    assert torch.equal(kmeans_plusplus(x, 7, generator=torch.Generator().manual_seed(3)),
                       kmeans_plusplus(x, 7, generator=torch.Generator().manual_seed(3)))


def test_matches_sklearn_inertia_on_separated_blobs():
    sklearn = pytest.importorskip("sklearn.cluster")
    x, _, _ = blobs(k=6, d=4, sep=20.0, noise=1.0, seed=6)
    c, _ = kmeans(x.double(), 6, iters=50, generator=torch.Generator().manual_seed(0))
    ref = sklearn.KMeans(6, n_init=5, random_state=0).fit(x.double().numpy())
    assert inertia(x, c) == pytest.approx(ref.inertia_, rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), k=st.integers(1, 20), d=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_any_n_and_k(n, k, d, seed):
    """N < k is allowed: all points become centroids, the rest are perturbed copies; no NaN."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    c, a = kmeans(x, k, iters=5, generator=torch.Generator().manual_seed(seed))
    assert c.shape == (k, d) and a.shape == (n,) and torch.isfinite(c).all()
    assert int(a.min()) >= 0 and int(a.max()) < k
    if k >= n:  # every point is its own centroid: zero inertia
        assert inertia(x, c) == pytest.approx(0.0, abs=1e-10)
    if k > n:
        assert torch.unique(c, dim=0).shape[0] == k  # perturbed copies are distinct


def test_fewer_points_with_constant_data():
    x = torch.ones(3, 2)
    c, a = kmeans(x, 5, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(c).all() and torch.unique(c, dim=0).shape[0] >= 2
    assert torch.allclose(c, torch.ones(5, 2), atol=0.1)
    assert torch.equal(c[a], x)  # all three points sit on the (identical) lowest-index centroid


def test_low_precision_input():
    x, centers, labels = blobs(sep=10.0, noise=0.01, seed=8)
    c, a = kmeans(x.to(torch.bfloat16), 5, generator=torch.Generator().manual_seed(0))
    assert c.dtype == torch.bfloat16
    match = torch.cdist(c.float(), centers).argmin(1)
    assert torch.equal(match[a], labels)


@pytest.mark.parametrize("x,k,exc", [
    (torch.zeros(0, 3), 2, ValueError),
    (torch.randn(5, 3), 0, ValueError),
    (torch.randn(5, 3), 2.5, ValueError),  # used to fail later with a TypeError from range()
    (torch.randn(5), 2, ValueError),
    (torch.ones(5, 3, dtype=torch.int64), 2, TypeError),
])
def test_bad_inputs(x, k, exc):
    with pytest.raises(exc):
        kmeans(x, k)
    with pytest.raises(exc):
        kmeans_plusplus(x, k)


def test_negative_iters():
    with pytest.raises(ValueError):
        kmeans(torch.randn(5, 2), 2, iters=-1)
    with pytest.raises(ValueError, match="iters"):
        kmeans(torch.randn(5, 2), 2, iters=1.5)


def test_spherical_kmeans_clusters_directions_at_any_radius():
    g = torch.Generator().manual_seed(12)
    dirs = torch.nn.functional.normalize(torch.randn(4, 5, generator=g), dim=1)
    labels = torch.arange(4).repeat_interleave(50)
    radius = torch.exp(3 * torch.randn(200, 1, generator=g))  # norms spread over orders of magnitude
    x = radius * torch.nn.functional.normalize(dirs[labels] + 0.05 * torch.randn(200, 5, generator=g), dim=1)
    c, a = kmeans(x, 4, iters=20, generator=torch.Generator().manual_seed(0), distance="cosine")
    assert torch.allclose(c.norm(dim=1), torch.ones(4))  # centroids on the sphere
    match = (c @ dirs.T).argmax(1)
    assert sorted(match.tolist()) == [0, 1, 2, 3]
    assert torch.equal(match[a], labels)
    assert ((c * dirs[match]).sum(1) > 0.99).all()
    # fewer points than clusters: still unit centroids
    c_few, _ = kmeans(x[:3], 6, generator=torch.Generator().manual_seed(0), distance="cosine")
    assert torch.allclose(c_few.norm(dim=1), torch.ones(6))
    with pytest.raises(ValueError, match="distance"):
        kmeans(x, 4, distance="l1")
