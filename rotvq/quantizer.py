"""A vector-quantisation layer with a choice of gradient estimator.

:class:`VectorQuantizer` maps channel-last encoder outputs ``z`` of shape
``(..., D)`` to their nearest codes ``q`` in a learned codebook of ``K`` codes and
returns ``z_q``, whose forward value is exactly ``q`` and whose backward pass is
given by a gradient estimator: the straight-through estimator (STE) or one of
the Jacobian surrogates of :mod:`rotvq.operators`, the rotation trick by default.

Loss convention. The source text (Su Jianlin, "VQ的旋转技巧", 2024, eq. in
section 回顾) writes the VQ-VAE loss as::

    L = |x - decoder(z_q)|^2 + beta |q - sg[z]|^2 + gamma |z - sg[q]|^2

so **beta weighs the codebook term** ``|q - sg[z]|^2`` (it moves the codes) and
**gamma weighs the commitment term** ``|z - sg[q]|^2`` (it moves the encoder).
This module follows that convention: ``codebook_weight`` is beta (default 1.0)
and ``commitment_weight`` is gamma (default 0.25). Note that van den Oord et al.
(2017, eq. 3) use the opposite naming: their ``beta`` (0.25) weighs the
commitment term and the codebook term has weight 1. Both terms are mean squared
errors over all ``N * D`` entries (``F.mse_loss`` style).

References:
    van den Oord, Vinyals, Kavukcuoglu, "Neural Discrete Representation
    Learning", NeurIPS 2017, arXiv 1711.00937 (VQ-VAE; the loss, eq. 3; the
    EMA codebook update, appendix A.1).
    Razavi, van den Oord, Vinyals, "Generating Diverse High-Fidelity Images with
    VQ-VAE-2", NeurIPS 2019, arXiv 1906.00446 (EMA codebook updates).
    Fifty et al., "Restructuring Vector Quantization with the Rotation Trick",
    2024, arXiv 2410.06424 (the rotation trick).
    Su Jianlin, "VQ的旋转技巧：梯度直通估计的一般推广", Scientific Spaces, 2024
    (k-means initialisation as the remedy for |q| << |z|).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .estimators import SURROGATE_NAMES, apply_estimator
from .kmeans import kmeans
from .operators import JacobianSurrogate
from .search import DEFAULT_MEMORY_BUDGET, DISTANCES, nearest_code

__all__ = ["INITS", "VQOutput", "VectorQuantizer"]

INITS = ("normal", "uniform", "kmeans")


class VQOutput(NamedTuple):
    """Result of :meth:`VectorQuantizer.forward` (N = number of input vectors)."""

    quantized: torch.Tensor  # (..., D) input dtype; forward value == codebook[indices]
    indices: torch.Tensor  # (...) int64, the input's leading shape
    loss: torch.Tensor  # () beta * codebook_loss + gamma * commitment_loss (no codebook term with EMA)
    codebook_loss: torch.Tensor  # () mean over N*D entries of (q - sg[z])^2; gradient to the codebook only
    commitment_loss: torch.Tensor  # () mean over N*D entries of (z - sg[q])^2; gradient to z only
    usage: torch.Tensor  # () fraction of the K codes chosen at least once in the batch
    perplexity: torch.Tensor  # () exp(entropy of the batch's code histogram), in [1, K]
    z_norm: torch.Tensor  # () mean |z| over the N vectors
    q_norm: torch.Tensor  # () mean |q| over the N vectors
    quantization_error: torch.Tensor  # () mean over N of |z - q|^2 (summed over D)


def _gen_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


class VectorQuantizer(nn.Module):
    """Nearest-code vector quantiser with a pluggable gradient estimator.

    Args:
        dim: D, the code dimension (>= 1).
        codebook_size: K, the number of codes (>= 1).
        estimator: gradient estimator, ``"ste"``, ``"rotation"`` or any name in
            :data:`rotvq.SURROGATE_NAMES`, or a :class:`rotvq.JacobianSurrogate`.
        distance: ``"euclidean"`` (nearest code) or ``"cosine"`` (code with the
            largest cosine similarity). In both modes ``quantized`` is the chosen
            code itself, unnormalised, so its forward value is ``codebook[indices]``.
        codebook_weight: beta, weight of the codebook term (>= 0, default 1.0).
        commitment_weight: gamma, weight of the commitment term (>= 0, default 0.25).
        ema: learn the codebook by exponential moving averages of cluster sizes
            and sums (the codebook is then a buffer, updated in training mode only,
            and the codebook term is left out of ``loss``) instead of by gradient
            of the codebook term (the codebook is then an ``nn.Parameter``).
        decay: EMA decay in (0, 1), used for the EMA codebook and for the
            ``cluster_size`` buffer (EMA of per-batch code counts) in both modes.
        eps: Laplace smoothing constant of the EMA cluster sizes (> 0).
        init: ``"normal"`` (std ``init_scale``), ``"uniform"`` (on
            ``[-init_scale, init_scale]``), or ``"kmeans"``: k-means with k-means++
            seeding on the first training batch (at most ``kmeans_max_points``
            vectors of it, drawn at random); until then the codebook holds a
            normal(0, ``init_scale``) placeholder, which eval-mode calls use as is.
        init_scale: std / half-width of the random init (> 0); make it small to
            start with codes much shorter than the encoder outputs.
        kmeans_iters: Lloyd iterations for ``init="kmeans"`` (>= 0).
        kmeans_max_points: most batch vectors used by the k-means init (>= 1).
        dead_code_threshold: in training mode, codes whose ``cluster_size`` falls
            below this value are replaced by random encoder outputs of the current
            batch (0, the default, turns this off).
        memory_budget: bytes per chunk of the nearest-code search.
        generator: optional ``torch.Generator`` for the random init, the k-means
            init and dead-code resets (``None``: torch's global generator).
    """

    def __init__(self, dim: int, codebook_size: int, *, estimator: str | JacobianSurrogate = "rotation",
                 distance: str = "euclidean", codebook_weight: float = 1.0,
                 commitment_weight: float = 0.25, ema: bool = False, decay: float = 0.99,
                 eps: float = 1e-5, init: str = "normal", init_scale: float = 1.0,
                 kmeans_iters: int = 10, kmeans_max_points: int = 65536,
                 dead_code_threshold: float = 0.0, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("codebook_size", codebook_size),
                            ("kmeans_max_points", kmeans_max_points), ("memory_budget", memory_budget)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        checks = (("codebook_weight", codebook_weight >= 0), ("commitment_weight", commitment_weight >= 0),
                  ("decay", 0 < decay < 1), ("eps", eps > 0), ("init_scale", init_scale > 0),
                  ("kmeans_iters", kmeans_iters >= 0), ("dead_code_threshold", dead_code_threshold >= 0))
        for name, ok in checks:
            if not ok:
                raise ValueError(f"invalid {name}={locals()[name]!r} (weights, iters and threshold "
                                 "must be >= 0, decay in (0, 1), eps and init_scale > 0)")
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.estimator = self._check_estimator(estimator)
        self.dim, self.codebook_size, self.distance, self.ema = dim, codebook_size, distance, bool(ema)
        self.codebook_weight, self.commitment_weight = float(codebook_weight), float(commitment_weight)
        self.decay, self.eps, self.init, self.init_scale = float(decay), float(eps), init, float(init_scale)
        self.kmeans_iters, self.kmeans_max_points = kmeans_iters, kmeans_max_points
        self.dead_code_threshold, self.memory_budget = float(dead_code_threshold), memory_budget
        self.generator = generator

        weight = torch.empty(codebook_size, dim, device=_gen_device(generator, torch.device("cpu")))
        if init == "uniform":
            weight.uniform_(-init_scale, init_scale, generator=generator)
        else:  # "normal", and the placeholder of "kmeans"
            weight.normal_(0.0, init_scale, generator=generator)
        weight = weight.cpu()
        if self.ema:
            self.register_buffer("embedding", weight)
            # one pseudo-observation at each code: embed_sum / cluster_size == codebook
            self.register_buffer("embed_sum", weight.clone())
        else:
            self.embedding = nn.Parameter(weight)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("initialized", torch.tensor(init != "kmeans"))

    @staticmethod
    def _check_estimator(estimator: str | JacobianSurrogate) -> str | JacobianSurrogate:
        if isinstance(estimator, JacobianSurrogate):
            return estimator
        if isinstance(estimator, str):
            if estimator not in SURROGATE_NAMES:
                raise ValueError(f"unknown estimator {estimator!r}; valid: {', '.join(SURROGATE_NAMES)} "
                                 "or a rotvq.JacobianSurrogate")
            return estimator
        raise TypeError(f"estimator must be a name or a JacobianSurrogate, got {type(estimator).__name__}")

    @property
    def codebook(self) -> torch.Tensor:
        """The codes, shape ``(K, D)``: an ``nn.Parameter``, or a buffer with ``ema=True``."""
        return self.embedding

    def extra_repr(self) -> str:
        est = self.estimator if isinstance(self.estimator, str) else type(self.estimator).__name__
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, estimator={est!r}, "
                f"distance={self.distance!r}, ema={self.ema}, init={self.init!r}")

    def forward(self, z: torch.Tensor) -> VQOutput:
        """Quantise ``z`` and compute the VQ losses and batch statistics.

        In training mode this also runs the k-means init (first batch), the EMA
        codebook update and dead-code resets, all *after* choosing the codes:
        ``quantized`` holds the codes as they were before this call's update.
        An empty batch returns empty tensors, zero losses, usage 0, perplexity 1
        and updates nothing.

        Args:
            z: encoder outputs, shape ``(..., D)``, floating point (float16 and
                bfloat16 allowed: the search runs in float32, and the chosen codes
                are cast to ``z.dtype`` *before* the estimator, so the forward
                value is exactly the code rounded to the input dtype).

        Returns:
            :class:`VQOutput`; ``quantized`` has the shape and dtype of ``z``,
            ``indices`` the shape ``z.shape[:-1]``, the rest are scalars.
        """
        if not isinstance(z, torch.Tensor) or not torch.is_floating_point(z):
            raise TypeError(f"input must be a floating-point tensor, got "
                            f"{z.dtype if isinstance(z, torch.Tensor) else type(z).__name__}")
        if z.dim() < 1 or z.shape[-1] != self.dim:
            raise ValueError(f"input's last dimension must be dim={self.dim}, got shape {tuple(z.shape)}")
        lead = z.shape[:-1]
        flat = z.reshape(-1, self.dim)  # (N, D)
        n = flat.shape[0]
        if self.training and n > 0 and not bool(self.initialized):
            self._init_from_batch(flat.detach())

        indices = nearest_code(flat.detach(), self.embedding.detach(), distance=self.distance,
                               memory_budget=self.memory_budget)  # (N,) int64, no gradient
        codes = self.embedding[indices]  # (N, D) codebook dtype; carries the codebook's gradient
        q = codes.detach().to(z.dtype)  # (N, D) chosen codes in the input dtype, no gradient
        # gradient estimator: forward value exactly q; backward maps dL/dz_q to z through the
        # surrogate Jacobian (STE, rotation trick, ...); q itself gets no gradient here
        z_q = apply_estimator(flat, q, self.estimator)  # (N, D)

        acc = torch.promote_types(torch.promote_types(codes.dtype, z.dtype), torch.float32)
        entries = max(n * self.dim, 1)
        codebook_loss = (codes.to(acc) - flat.detach().to(acc)).pow(2).sum() / entries
        commitment_loss = (flat.to(acc) - codes.detach().to(acc)).pow(2).sum() / entries
        loss = self.commitment_weight * commitment_loss
        if not self.ema:  # with EMA the codebook term moves nothing: the EMA update replaces it
            loss = loss + self.codebook_weight * codebook_loss

        with torch.no_grad():
            counts, sums = self._reduce_statistics(*self._batch_statistics(flat.detach(), indices))
            p = counts / counts.sum().clamp_min(1)  # (K,)
            perplexity = torch.exp(-torch.special.xlogy(p, p).sum())
            usage = (counts > 0).to(acc).mean()
            zf, qf = flat.detach().to(acc), codes.detach().to(acc)
            z_norm = zf.norm(dim=1).sum() / max(n, 1)
            q_norm = qf.norm(dim=1).sum() / max(n, 1)
            quantization_error = (zf - qf).pow(2).sum() / max(n, 1)
            if self.training and n > 0:
                self._update(flat.detach(), counts, sums)
        return VQOutput(z_q.reshape(z.shape), indices.reshape(lead), loss, codebook_loss,
                        commitment_loss, usage, perplexity, z_norm, q_norm, quantization_error)

    def _batch_statistics(self, flat_z: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The one place where per-batch code statistics are accumulated.

        Args:
            flat_z: encoder outputs, shape ``(N, D)``, no gradient.
            indices: chosen codes, shape ``(N,)`` int64.

        Returns:
            ``(counts, sums)``: ``counts[k]`` = number of vectors assigned to code
            k, shape ``(K,)``; ``sums[k]`` = sum of those vectors, shape ``(K, D)``;
            both in the dtype of ``cluster_size`` / at least float32.
        """
        dtype = torch.promote_types(self.embedding.dtype, torch.float32)
        counts = torch.bincount(indices, minlength=self.codebook_size).to(self.cluster_size.dtype)
        sums = torch.zeros(self.codebook_size, self.dim, dtype=dtype, device=flat_z.device)
        return counts, sums.index_add_(0, indices, flat_z.to(dtype))

    def _reduce_statistics(self, counts: torch.Tensor, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook to combine batch statistics across data-parallel replicas.

        The identity in this single-process version. A distributed version sums
        ``counts`` and ``sums`` over replicas (``torch.distributed.all_reduce``)
        so that every replica sees the global batch: the usage/perplexity
        statistics, the EMA update and the dead-code criterion then agree on all
        replicas (dead-code replacements would also have to be broadcast).
        """
        return counts, sums

    def _update(self, flat_z: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor) -> None:
        """Training-mode state update: EMA of cluster sizes (and codebook), dead codes."""
        d = self.decay
        self.cluster_size.mul_(d).add_(counts, alpha=1 - d)  # N_k <- d N_k + (1 - d) n_k
        if self.ema:
            self.embed_sum.mul_(d).add_(sums, alpha=1 - d)  # m_k <- d m_k + (1 - d) sum_k z
            total = self.cluster_size.sum()
            # Laplace smoothing: N_k <- (N_k + eps) / (total + K eps) * total, never 0
            smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
            self.embedding.copy_(self.embed_sum / smoothed[:, None])  # e_k = m_k / N_k
        if self.dead_code_threshold > 0:
            self._reset_dead_codes(flat_z)

    def _sample_rows(self, n: int, m: int, device: torch.device) -> torch.Tensor:
        """``m`` row indices in ``[0, n)``, without replacement when ``m <= n``."""
        dev = _gen_device(self.generator, device)
        if m <= n:
            return torch.randperm(n, generator=self.generator, device=dev)[:m].to(device)
        return torch.randint(0, n, (m,), generator=self.generator, device=dev).to(device)

    def _reset_dead_codes(self, flat_z: torch.Tensor) -> int:
        """Replace codes with ``cluster_size < dead_code_threshold`` by random batch vectors.

        A replaced code gets ``cluster_size = dead_code_threshold`` (and, with
        EMA, ``embed_sum = threshold * code``), so it is reset again only if it
        stays unused. Optimiser state (e.g. Adam moments) of replaced rows is
        not touched. Returns the number of codes replaced.
        """
        dead = torch.nonzero(self.cluster_size < self.dead_code_threshold).squeeze(1)  # (M,)
        m = dead.numel()
        if m == 0:
            return 0
        new = flat_z[self._sample_rows(flat_z.shape[0], m, flat_z.device)].to(self.embedding.dtype)
        self.embedding[dead] = new
        self.cluster_size[dead] = self.dead_code_threshold
        if self.ema:
            self.embed_sum[dead] = new * self.dead_code_threshold
        return m

    @torch.no_grad()
    def _init_from_batch(self, flat_z: torch.Tensor) -> None:
        """k-means (k-means++ seeding) init of the codebook from one batch ``(N, D)``."""
        if flat_z.shape[0] > self.kmeans_max_points:
            flat_z = flat_z[self._sample_rows(flat_z.shape[0], self.kmeans_max_points, flat_z.device)]
        centroids, _ = kmeans(flat_z.to(torch.promote_types(flat_z.dtype, torch.float32)),
                              self.codebook_size, iters=self.kmeans_iters, generator=self.generator,
                              memory_budget=self.memory_budget)
        self.embedding.copy_(centroids)
        self.cluster_size.fill_(1.0)
        if self.ema:
            self.embed_sum.copy_(self.embedding)
        self.initialized.fill_(True)
