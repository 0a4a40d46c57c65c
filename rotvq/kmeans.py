"""k-means with k-means++ seeding, in torch, on any device (Euclidean or spherical).

Used to initialise a VQ codebook from the first batch of encoder outputs, so that
code norms start on the scale of the encoder outputs: the remedy Su (2024) proposes
for the rotation trick's scale problem. (The official code of the rotation-trick
paper, Fifty et al. 2024, does *not* use it: its VQ-VAE starts from Kaiming-uniform
codes; see the book's chapter "The scaling critique".)

References:
    Lloyd, "Least squares quantization in PCM", IEEE Trans. Inf. Theory 28 (1982).
    Arthur and Vassilvitskii, "k-means++: the advantages of careful seeding",
    SODA 2007 (the D^2 seeding of :func:`kmeans_plusplus`).
    Dhillon and Modha, "Concept decompositions for large sparse text data using
    clustering", Machine Learning 42 (2001) (spherical k-means).

Fewer points than clusters (``N < k``). Both functions accept it, because a
first training batch may hold fewer vectors than a large codebook has codes:
every point becomes a centroid once, and the remaining ``k - N`` centroids are
copies of points drawn uniformly (with replacement) plus Gaussian noise of
standard deviation ``1e-2`` times the data's overall standard deviation (or
``1e-2`` for constant data), so no two centroids coincide. ``N = 0`` or ``k < 1``
raises ``ValueError``.

Spherical k-means (``distance="cosine"``, Dhillon and Modha 2001): the points are
l2-normalised, assigned to the centroid of largest cosine similarity, and each
centroid is the normalised mean of its points, so centroids stay on the unit sphere.
This is the initialisation of a cosine-distance VQ codebook.

Randomness comes only from ``generator`` (``None``: torch's global generator);
with a CPU generator the results are deterministic on CPU. Samples are drawn on
the generator's device and moved to the data's device.
"""

from __future__ import annotations

import torch

from ._checks import at_least_float32, check_nonnegative_int, check_positive_int, generator_device
from .search import nearest_code

__all__ = ["kmeans", "kmeans_plusplus"]


def _check(x: torch.Tensor, k: int) -> None:
    if not torch.is_floating_point(x):
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must have shape (N, D), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x has no points (N = 0)")
    check_positive_int("k", k)


def _fewer_points(x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Centroids for ``N < k``: all points, then perturbed copies (see module docstring)."""
    n = x.shape[0]
    dev = generator_device(generator, x.device)
    perm = torch.randperm(n, generator=generator, device=dev).to(x.device)
    extra = torch.randint(0, n, (k - n,), generator=generator, device=dev).to(x.device)
    std = x.std() if x.numel() > 1 else x.new_zeros(())
    scale = 1e-2 * (std if bool(std > 0) else x.new_ones(()))
    noise = torch.randn(k - n, x.shape[1], generator=generator, device=dev, dtype=x.dtype).to(x.device)
    return torch.cat([x[perm], x[extra] + scale * noise])


@torch.no_grad()
def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding (Arthur and Vassilvitskii 2007).

    The first centroid is a uniformly drawn point; each next one is a point drawn
    with probability proportional to its squared distance to the nearest centroid
    chosen so far. If all remaining squared distances are zero (fewer distinct
    points than ``k``), the next centroid is drawn uniformly.

    Args:
        x: points, shape ``(N, D)``, floating point.
        k: number of centroids (>= 1). ``k > N`` is handled as described in the
            module docstring.
        generator: optional ``torch.Generator`` for reproducible draws.

    Returns:
        Centroids, shape ``(k, D)``, dtype and device of ``x``.
    """
    _check(x, k)
    n = x.shape[0]
    if k >= n:
        return _fewer_points(x, k, generator) if k > n else x[
            torch.randperm(n, generator=generator, device=generator_device(generator, x.device)).to(x.device)]
    dev = generator_device(generator, x.device)
    xc = x.to(at_least_float32(x.dtype))  # (N, D)
    first = int(torch.randint(0, n, (1,), generator=generator, device=dev))
    chosen = [first]
    d2 = (xc - xc[first]).pow(2).sum(1)  # (N,) squared distance to nearest centroid so far
    for _ in range(1, k):
        total = d2.sum()
        if bool(total > 0) and bool(torch.isfinite(total)):
            idx = int(torch.multinomial(d2.to(dev), 1, generator=generator))
        else:
            idx = int(torch.randint(0, n, (1,), generator=generator, device=dev))
        chosen.append(idx)
        d2 = torch.minimum(d2, (xc - xc[idx]).pow(2).sum(1))
    return x[torch.tensor(chosen, device=x.device)]


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, *, iters: int = 20, generator: torch.Generator | None = None,
           memory_budget: int | None = None, distance: str = "euclidean") -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means seeded with :func:`kmeans_plusplus`; spherical with ``distance="cosine"``.

    Each iteration assigns every point to its nearest centroid with
    :func:`rotvq.search.nearest_code` (exact, memory-bounded, ties to the lowest
    index) and moves every centroid to the mean of its points. A centroid that
    receives no points keeps its position. Iteration stops early once the
    assignments no longer change. Means are accumulated in at least float32.

    Args:
        x: points, shape ``(N, D)``, floating point.
        k: number of clusters (>= 1); ``k > N`` is allowed (module docstring).
        iters: maximum number of Lloyd iterations (>= 0; 0 returns the seeds).
        generator: optional ``torch.Generator`` for the seeding.
        memory_budget: bytes per search chunk (``None``: the search default).
        distance: ``"euclidean"`` (Lloyd) or ``"cosine"`` (spherical k-means: the
            points are normalised first, centroids are normalised means, and the
            returned centroids have norm 1; see the module docstring).

    Returns:
        ``(centroids, assignments)``: centroids of shape ``(k, D)`` in the dtype
        of ``x``; int64 assignments of shape ``(N,)``, the index of the nearest
        returned centroid for each point.
    """
    _check(x, k)
    check_nonnegative_int("iters", iters)
    if distance not in ("euclidean", "cosine"):
        raise ValueError(f"unknown distance {distance!r}; valid: euclidean, cosine")
    search = {"distance": distance}
    if memory_budget is not None:
        search["memory_budget"] = memory_budget
    acc = at_least_float32(x.dtype)
    xa = x.to(acc)  # (N, D)
    if distance == "cosine":  # spherical k-means: cluster the directions
        xa = torch.nn.functional.normalize(xa, dim=1)
        x = xa.to(x.dtype)
    centroids = kmeans_plusplus(x, k, generator=generator).to(acc)  # (k, D)
    if distance == "cosine":  # perturbed copies (N < k) leave the sphere: put them back
        centroids = torch.nn.functional.normalize(centroids, dim=1)
    assign = nearest_code(xa, centroids, **search)  # (N,)
    for _ in range(iters):
        counts = torch.bincount(assign, minlength=k).to(acc)  # (k,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, xa)  # (k, D)
        filled = counts > 0
        means = sums / counts.clamp_min(1)[:, None]
        if distance == "cosine":
            means = torch.nn.functional.normalize(means, dim=1)
        centroids = torch.where(filled[:, None], means, centroids)
        new_assign = nearest_code(xa, centroids, **search)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    if centroids.dtype == x.dtype:
        return centroids, assign  # assign already refers to these centroids
    centroids = centroids.to(x.dtype)
    # down-cast centroids (half precision) may round differently: re-assign against them
    return centroids, nearest_code(x, centroids, **search)
