"""Exact nearest-code search with bounded memory.

Vector quantisation (van den Oord et al. 2017, "Neural Discrete Representation
Learning", arXiv 1711.00937, eq. 1-2) maps every encoder output ``z`` to the
code ``e_k`` of a codebook that is nearest to it. A brute-force search builds an
``N x K`` distance matrix, which for ``N = 10**6`` queries and ``K = 16384``
codes is 64 GiB in float32. :func:`nearest_code` instead processes the queries
in chunks of rows so that no ``N x K`` matrix beyond one chunk ever exists; the
chunk size comes from a memory budget (:func:`chunk_size_for_budget`).

Distances. For the Euclidean distance the squared distance is expanded as
``|z - e|^2 = |z|^2 - 2 z.e + |e|^2``. The term ``|z|^2`` is the same for every
code of one query, so it does not change the argmin and is left out: each chunk
computes the score ``|e|^2 - 2 z.e`` with one ``torch.addmm``, after moving
queries and codes by the codebook mean ``m`` and dividing the codes by the power of
two ``2^p`` that brings ``max_k |e_k - m|`` into ``[1/2, 1)`` (the score becomes
``2^-p (|e - m|^2 - 2 (z - m).(e - m))``, the same order; the scaling is exact). These steps reduce rounding: no cancellation of a large ``|z|^2``
against ``2 z.e``, errors scale with ``|z - m| |e - m|`` instead of ``|z| |e|`` (this
matters for codes clustered far from the origin), and squares of tiny or huge codes
neither underflow nor overflow. For the
cosine "distance" the search returns the argmax of the cosine similarity
``z.e / (|z| |e|)``; ``|z|`` is constant per query, so the score is ``-z.e/|e|``
(codes of norm zero get similarity 0; a query of norm zero has similarity 0
with every code and gets index 0, as ``F.cosine_similarity(...).argmax()`` does).

Exactness and ties. A matrix product rounds differently from the direct
formula ``sum_i (z_i - e_i)^2`` (and BLAS may round two identical columns
differently), so the search does three things to stay exact and consistent:

1. exact duplicate codes are removed first, so a query at a duplicated code
   always gets the duplicate's lowest index;
2. the two best codes by the expanded score are compared again with the direct
   formula (``sum_i (z_i - e_i)^2``, or ``-sum_i z_i e_i`` with unit codes for
   cosine), computed row by row. On CPU outside ``torch.compile`` only the rows that
   need it are, and in float64. The expanded score of code ``k`` (after shifting
   and scaling) is within ``b = γ_n (|a| |x| R + R^2)`` (plus a term of the order of
   the smallest normal number) of its exact value ``|x - y_k|^2 - |x|^2`` (Euclidean;
   ``x`` the shifted query, ``y_k`` the shifted code) or ``a x.e_k/|e_k|`` (cosine,
   no ``R^2``), where ``γ_n = n u/(1 - n u)``, ``n = 3D + 16`` roundings, ``u`` the
   unit roundoff of the product (TF32 or bfloat16 when
   ``torch.set_float32_matmul_precision`` or the new ``fp32_precision`` settings
   allow them), ``R = max_k |y_k|`` and ``a = -2`` (Euclidean) or ``-1`` (cosine).
   So a row whose two best scores differ by more than ``2b`` has a unique nearest
   code, the best one, and is not re-compared (about 0.1-1 % of the rows of random
   data are; rows with NaN or inf, or norms that overflow, always are). On other
   devices and inside compiled graphs every row is re-compared, in the compute
   dtype (fixed shapes, no host synchronisation);
3. an exact tie in the direct formula goes to the lower index.

The result therefore agrees with a float64 brute-force search unless three or more
distinct codes lie within rounding error of the best distance (about
``D * u * (|e - m|^2 + |z - m| |e - m|)``): then the code picked is one of those
near-tied codes, not necessarily the lowest-indexed (and likewise for inputs in the
subnormal range, where the product itself loses digits). Whether a row with such a
near-tie is certified or re-compared depends only on that row and the codebook, not
on the chunk size. Half-precision inputs are searched in float32.
Cost: one ``addmm`` and one search for the best two scores per chunk, plus the
re-comparison of the rows that need it (``benchmarks/`` compares it with one unchunked ``addmm`` + ``argmin``).
"""

from __future__ import annotations

import math

import torch

__all__ = ["DISTANCES", "DEFAULT_MEMORY_BUDGET", "chunk_size_for_budget", "nearest_code"]

DISTANCES = ("euclidean", "cosine")
#: Default bytes allowed for one chunk's ``chunk x K`` score matrix (128 MiB).
DEFAULT_MEMORY_BUDGET = 128 * 2**20
# Without an explicit chunk_size, chunks hold about this many bytes of scores (at least
# _MIN_CHUNK_ROWS rows, and never more than the budget): the score block is then still in
# cache when topk reads it. Measured on a 2-core EPYC at (N, d, K) = (16384, 256, 1024),
# (65536, 64, 512), (8192, 64, 16384): 1-8 MiB blocks beat one N x K matrix by 10-40 %.
_CACHE_BLOCK_BYTES = 4 * 2**20
_MIN_CHUNK_ROWS = 64
# The best two scores of a block come from _best_two (stripes of the row) for codebooks of at
# least _STRIPED_MIN_CODES codes, else from topk. Measured on a 2-core EPYC, (1024, 1024)
# float32 block: topk(2) 1.7-2.4 ms, _best_two 0.5 ms (one thread).
_STRIPES = 16
_STRIPED_MIN_CODES = 64


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Promoted floating dtype of ``tensors``, at least float32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def chunk_size_for_budget(num_codes: int, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                          element_size: int = 4) -> int:
    """Number of query rows per chunk so that one score matrix fits the budget.

    One chunk allocates a ``(chunk, num_codes)`` score matrix of ``element_size``
    bytes per entry; the result is ``max(1, memory_budget // (num_codes *
    element_size))``. At least one row is always processed, so a codebook whose
    single row of scores exceeds the budget still works (with one row per chunk).

    Args:
        num_codes: K, the number of codes (>= 1).
        memory_budget: bytes allowed for one score matrix (>= 1).
        element_size: bytes per score (4 for float32, 8 for float64).

    Returns:
        The chunk size (rows), an int >= 1.
    """
    if num_codes < 1:
        raise ValueError(f"num_codes must be >= 1, got {num_codes}")
    if memory_budget < 1:
        raise ValueError(f"memory_budget must be >= 1 byte, got {memory_budget}")
    if element_size < 1:
        raise ValueError(f"element_size must be >= 1, got {element_size}")
    return max(1, int(memory_budget) // (int(num_codes) * int(element_size)))


@torch.no_grad()
def nearest_code(z: torch.Tensor, codebook: torch.Tensor, *, distance: str = "euclidean",
                 chunk_size: int | None = None,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET) -> torch.Tensor:
    """Index of the nearest code for every query vector.

    Runs under ``torch.no_grad``: the indices carry no gradient.

    Args:
        z: queries, shape ``(..., D)``, floating point.
        codebook: codes, shape ``(K, D)``, floating point, same device as ``z``.
        distance: ``"euclidean"`` (argmin of ``|z - e|``) or ``"cosine"``
            (argmax of the cosine similarity).
        chunk_size: query rows per chunk; ``None`` derives it from
            ``memory_budget`` with :func:`chunk_size_for_budget`.
        memory_budget: bytes allowed for one chunk's ``(chunk, K)`` score matrix
            when ``chunk_size`` is ``None`` (default 128 MiB).

    Returns:
        int64 tensor of shape ``z.shape[:-1]`` with values in ``[0, K)``.

    Raises:
        TypeError: non-floating ``z`` or ``codebook``.
        ValueError: bad shapes, unknown ``distance``, ``chunk_size < 1``, or a
            codebook with no codes.
    """
    if not (torch.is_floating_point(z) and torch.is_floating_point(codebook)):
        raise TypeError(f"z and codebook must be floating point, got {z.dtype} and {codebook.dtype}")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must have shape (K, D), got {tuple(codebook.shape)}")
    if z.dim() < 1 or z.shape[-1] != codebook.shape[1]:
        raise ValueError(f"last dimension of z {tuple(z.shape)} must equal the code dimension "
                         f"{codebook.shape[1]}")
    if codebook.shape[0] < 1:
        raise ValueError("codebook must contain at least one code")
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    lead, dim, num_codes = z.shape[:-1], z.shape[-1], codebook.shape[0]
    flat = z.reshape(-1, dim)
    n = flat.shape[0]
    out = torch.empty(n, dtype=torch.long, device=z.device)
    if n == 0:
        return out.reshape(lead)
    dtype = _compute_dtype(z, codebook)
    if chunk_size is None:
        item = torch.finfo(dtype).bits // 8
        # cache-sized score blocks (the top-2 pass then reads them from cache), within the budget
        chunk_size = min(chunk_size_for_budget(num_codes, memory_budget, item),
                         max(_MIN_CHUNK_ROWS, _CACHE_BLOCK_BYTES // (num_codes * item)))

    codes = codebook.to(dtype)  # (K, D)
    if distance == "cosine":
        # scale each code by its largest entry first, so that the squares of tiny codes do not
        # underflow (a wrong norm would rescale that code against the others)
        peak = codes.abs().amax(dim=1, keepdim=True)  # (K, 1)
        codes = codes / torch.where(peak > 0, peak, torch.ones_like(peak))
        norms = codes.norm(dim=1, keepdim=True)
        # codes of norm zero stay zero: similarity 0, no division by zero
        codes = codes / torch.where(norms > 0, norms, torch.ones_like(norms))
    tracing = torch.compiler.is_compiling()
    if tracing:
        # inside torch.compile: fixed shapes only. One chunk (no data-dependent loop), and
        # duplicates are mapped to their lowest index after the search instead of removed.
        keep, canonical, chunk_size = None, _lowest_duplicate(codes), n
    else:
        keep, canonical = _first_occurrences(codes), None  # keep: (U,) sorted indices of distinct codes
    if keep is not None:
        codes = codes[keep]
    if distance == "euclidean":
        # translate queries and codes by the codebook mean: distances are unchanged, and the
        # rounding error of the expanded score shrinks from ~eps |z| |e| to ~eps |z - m| |e - m|
        center = codes.mean(0)  # (D,)
        shifted = codes - center  # (U, D)
        # and divide the codes by the power of two 2^p that brings max |e - m| into [1/2, 1)
        # (exact): every score is then 2^-p (|e - m|^2 - 2 (z - m).(e - m)), and squares of
        # tiny or huge codes neither underflow nor overflow
        exponent = torch.frexp(shifted.abs().amax()).exponent
        shifted = torch.ldexp(shifted, -exponent)
        bias = torch.ldexp(shifted.pow(2).sum(1), exponent)  # (U,)  2^-p |e - m|^2
        alpha = -2.0
    else:
        center, shifted = None, codes
        bias = torch.zeros(codes.shape[0], dtype=dtype, device=z.device)
        alpha = -1.0  # minimise -cos, i.e. maximise cos
    weight_t = shifted.t()  # (D, U)
    num_distinct = codes.shape[0]
    # rows whose two best scores differ by more than twice the rounding bound need no
    # refinement (eager CPU only: selecting those rows has data-dependent shapes)
    certify = not tracing and z.device.type == "cpu" and codes.shape[0] > 1
    if certify:
        terms = 3 * dim + 16  # roundings per score, with room for second-order terms
        unit = _matmul_unit_roundoff(dtype, z.device)
        certify = terms * unit < 0.5
    if certify:
        slack = terms * unit / (1 - terms * unit)  # gamma_n = n u / (1 - n u)
        tiny = torch.finfo(dtype).tiny
        # norms computed in `dtype` may lose squares below `tiny`: |v| <= norm + sqrt(D tiny)
        lost = math.sqrt(dim * tiny)
        code_norm = float(shifted.norm(dim=1).amax()) + lost  # R >= max |e - m| (scaled)
        squared = math.ldexp(code_norm * code_norm, int(exponent)) if center is not None else 0.0
        floor = 4 * terms * tiny  # absolute error of roundings in the subnormal range
        exact = codebook.double()  # the re-comparison runs in float64, on the caller's codes
        if distance == "cosine":
            exact = exact / exact.abs().amax(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
            exact = exact / exact.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        if keep is not None:
            exact = exact[keep]
        if num_distinct >= _STRIPED_MIN_CODES:
            # pad the codes to a multiple of _STRIPES with columns of score +inf (never the best),
            # so that each block of scores splits into stripes for _best_two
            extra = -num_distinct % _STRIPES
            weight_t = torch.cat([weight_t, weight_t.new_zeros(dim, extra)], 1)
            bias = torch.cat([bias, bias.new_full((extra,), math.inf)])
    for start in range(0, n, chunk_size):
        block = flat[start:start + chunk_size].to(dtype)  # (C, D)
        query = block if center is None else block - center
        scores = torch.addmm(bias, query, weight_t, alpha=alpha)  # (C, U): the only C x K matrix
        if num_distinct == 1:
            best = torch.zeros(block.shape[0], dtype=torch.long, device=z.device)
        elif certify:
            if num_distinct >= _STRIPED_MIN_CODES:
                first, best, second = _best_two(scores)
            else:
                top = scores.topk(2, dim=1, largest=False)
                (first, second), best = top.values.unbind(1), top.indices[:, 0].clone()
            # |score_k - exact_k| <= slack (|alpha| |x| R + R^2) + floor for every code, in
            # float64 (no underflow of the bound itself); the gap of two float32 scores is
            # exact in float64
            x_norm = query.norm(dim=1).double() + lost
            bound = slack * (abs(alpha) * code_norm * x_norm + squared) + floor
            unsure = ~((second.double() - first.double()) > 2 * bound)  # NaN or inf rows: unsure
            rows = unsure.nonzero().squeeze(1)
            if rows.numel():  # few rows: re-compare in float64 (no underflow of float32 squares)
                cand = scores[rows, :num_distinct].topk(2, dim=1, largest=False).indices
                best[rows] = _refine(block[rows].double(), exact, cand, distance)
        else:
            top = scores.topk(2, dim=1, largest=False)  # (C, 2) values and indices
            best = _refine(block, codes, top.indices, distance)  # (C,)
        if distance == "cosine" and num_distinct > 1:  # zero query: every similarity is 0, index 0
            best = torch.where(block.abs().amax(1) > 0, best, torch.zeros_like(best))
        del scores
        if canonical is not None:
            best = canonical[best]
        out[start:start + block.shape[0]] = best if keep is None else keep[best]
    return out.reshape(lead)


def _best_two(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(smallest, its index, second smallest)`` of each row of ``scores`` ``(C, U)``,
    ``U`` a multiple of :data:`_STRIPES`: the values and index that ``topk(2)`` gives, for
    the rows whose smallest score is unique (the caller re-compares every other row).

    ``topk`` and ``argmin`` scan a row element by element; here the row is cut into
    :data:`_STRIPES` stripes of ``L = U / S`` columns and one vectorised ``amin`` over the
    stripes gives, for each column offset ``l``, the minimum over ``{s L + l}``. The
    index search then runs on ``(C, L)`` and ``(C, S)`` tensors only. The second
    smallest value is the smaller of the best of the other offsets and the best of the
    winning offset's other stripes; a tie for the smallest gives ``second == smallest``.
    """
    rows, width = scores.shape
    offsets = width // _STRIPES
    striped = scores.view(rows, _STRIPES, offsets)
    part = striped.amin(1)  # (C, L): minimum over the stripes at each offset
    first, offset = part.min(1)  # (C,)
    column = striped.gather(2, offset.view(rows, 1, 1).expand(rows, _STRIPES, 1)).squeeze(2)  # (C, S)
    stripe = column.argmin(1)
    other_offsets = part.scatter(1, offset[:, None], math.inf).amin(1)
    same_offset = column.scatter(1, stripe[:, None], math.inf).amin(1)
    return first, stripe * offsets + offset, torch.minimum(other_offsets, same_offset)


def _matmul_unit_roundoff(dtype: torch.dtype, device: torch.device) -> float:
    """Unit roundoff of the products ``addmm`` computes in ``dtype`` on ``device``.

    float32 products may run in TF32 (``"high"``, or ``allow_tf32`` on CUDA) or bfloat16
    (``"medium"``) when the user allows it; the bound then uses that precision.
    """
    unit = torch.finfo(dtype).eps / 2
    if dtype != torch.float32:
        return unit
    try:
        precision = torch.get_float32_matmul_precision()
        new_api = getattr(getattr(getattr(torch.backends, "mkldnn", None), "matmul", None), "fp32_precision", None)
    except RuntimeError:  # legacy and new precision settings mixed: assume the coarsest
        return max(unit, 2.0 ** -8)
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    if precision == "medium" or new_api == "bf16":
        unit = max(unit, 2.0 ** -8)
    elif precision == "high" or new_api == "tf32" or tf32:
        unit = max(unit, 2.0 ** -11)
    return unit


def _row_keys(codes: torch.Tensor) -> torch.Tensor:
    """``(K,)`` int64 hash of each row's bits: equal rows get equal keys.

    Integer arithmetic, so the key does not depend on the order of the sum; ``+ 0.0``
    turns ``-0.0`` into ``0.0`` (equal as numbers, different as bits).
    """
    bits = (codes + 0.0).view(torch.int32 if codes.element_size() == 4 else torch.int64).long()
    cols = torch.arange(codes.shape[1], dtype=torch.int64, device=codes.device)
    weights = (cols * 6364136223846793005 + 1442695040888963407) | 1  # odd, well mixed (wraps)
    return (bits * weights).sum(1)


def _lowest_duplicate(codes: torch.Tensor) -> torch.Tensor:
    """``(K,)`` map from each code to the lowest index of an identical code, fixed shapes only.

    Codes are grouped by :func:`_row_keys` (a stable sort keeps equal keys in index
    order, so a group starts at its lowest index); a code whose group head is not
    bitwise equal to it (a hash collision) maps to itself.
    """
    num = codes.shape[0]
    order = torch.arange(num, device=codes.device)
    keys, perm = _row_keys(codes).sort(stable=True)
    start = torch.ones_like(keys, dtype=torch.bool)
    start[1:] = keys[1:] != keys[:-1]
    head = perm[torch.where(start, order, torch.zeros_like(order)).cummax(0).values]  # (K,) in sorted order
    canonical = torch.empty_like(perm).scatter_(0, perm, head)  # back to code order
    same = (codes[canonical] == codes).all(1)
    return torch.where(same, canonical, order)


def _first_occurrences(codes: torch.Tensor) -> torch.Tensor | None:
    """Sorted indices of the first occurrence of each distinct row; ``None`` if all differ.

    Removing exact duplicates before the search makes a query at a duplicated
    code resolve to its lowest index whatever rounding the matrix product does.
    """
    num = codes.shape[0]
    if num > 1:
        # cheap screen: equal rows have equal keys, so distinct keys prove that there is no
        # duplicate, and the sort of whole rows (torch.unique) is skipped
        keys = _row_keys(codes).sort().values  # (K,)
        if not bool((keys[1:] == keys[:-1]).any()):
            return None
    unique, inverse = torch.unique(codes, dim=0, return_inverse=True)
    if unique.shape[0] == num:
        return None
    order = torch.arange(num, device=codes.device)
    first = torch.full((unique.shape[0],), num, dtype=torch.long, device=codes.device)
    first.scatter_reduce_(0, inverse, order, reduce="amin")
    return first.sort().values


def _refine(block: torch.Tensor, codes: torch.Tensor, cand: torch.Tensor, distance: str) -> torch.Tensor:
    """Choose between the two best candidates by the direct formula, ties to the lower index.

    Args:
        block: queries ``(C, D)``; codes: ``(U, D)`` (unit rows for cosine);
        cand: ``(C, 2)`` candidate indices from the expanded score.

    Returns:
        ``(C,)`` chosen indices. The direct distance ``sum_i (z_i - e_i)^2`` (or
        ``-sum_i z_i e_i`` for cosine) is computed row by row, so the choice does not
        depend on the chunk size.
    """
    c0, c1 = cand[:, 0], cand[:, 1]
    if distance == "euclidean":
        d0 = (block - codes[c0]).pow(2).sum(1)
        d1 = (block - codes[c1]).pow(2).sum(1)
    else:
        d0 = -(block * codes[c0]).sum(1)
        d1 = -(block * codes[c1]).sum(1)
    take1 = (d1 < d0) | ((d1 == d0) & (c1 < c0))
    return torch.where(take1, c1, c0)
