"""Small VQ-VAEs (van den Oord et al. 2017, arXiv 1711.00937) for the book's experiments.

Two models share one interface: :class:`MLPVQVAE` for flat vectors ``(B, D)`` and
:class:`ConvVQVAE` for channel-first images ``(B, C, H, W)``.  Both are

    x --encoder--> z (channel-last, ``(..., latent_dim)``)
      --VectorQuantizer--> z_q --decoder--> x_hat

with the gradient estimator (STE, rotation trick, ...) chosen by the quantizer's
``estimator`` argument; every keyword argument the models do not know is passed on to
:class:`rotvq.quantizer.VectorQuantizer`.  The training loss is
``recon_loss + vq.loss``, where ``recon_loss`` is the mean squared error of the
reconstruction (the reconstruction term of eq. 3 of van den Oord et al. for a Gaussian
decoder, up to constants) and ``vq.loss`` the quantizer's weighted
codebook and commitment terms.

Controlling the norm of the encoder output.  The source text's critique says that the
rotation trick's scale factor ``|q|/|z|`` matters when codes are much shorter than encoder
outputs (``|q| << |z|``), as happens with a small codebook initialisation.  To produce that
regime on purpose there are two knobs:

* ``encoder_scale`` -- a fixed (non-trainable) gain multiplying the encoder output, during
  all of training.  With Adam it also scales the size of the steps ``z`` takes.
* :meth:`calibrate_encoder_norm` -- rescales the last encoder layer once, so that the mean
  ``|z|`` on a given batch equals a target; it sets where training starts, not where it
  goes.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .._checks import check_nonnegative_int, check_positive_int
from ..quantizer import VectorQuantizer

__all__ = ["VQVAEOutput", "MLPVQVAE", "ConvVQVAE"]


class VQVAEOutput(NamedTuple):
    """Result of a VQ-VAE forward pass.

    Attributes:
        reconstruction: decoder output, same shape as the input ``x``.
        z: encoder output (after ``encoder_scale``), channel-last ``(..., latent_dim)``.
        vq: the quantizer's result (``quantized``, ``indices``, ``usage``, ``perplexity``, ...).
        recon_loss: scalar, mean squared error between ``reconstruction`` and ``x``.
        codebook_loss: scalar, the quantizer's (unweighted) codebook loss.
        commitment_loss: scalar, the quantizer's (unweighted) commitment loss.
        loss: scalar, ``recon_loss + vq.loss`` (the quantizer applies its weights).
    """

    reconstruction: torch.Tensor
    z: torch.Tensor
    vq: Any
    recon_loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    loss: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """The pass's named scalars as python floats, in the lab's one vocabulary.

        ``loss`` (the model's training loss), ``recon_loss``, ``vq_loss`` (the quantizer's
        weighted loss, called ``loss`` in :meth:`rotvq.VQOutput.metrics`), then the
        quantizer's own statistics under the names :meth:`rotvq.VQOutput.metrics` gives them:
        ``codebook_loss``, ``commitment_loss``, ``usage``, ``perplexity``, ``z_norm``,
        ``q_norm``, ``quantization_error``.  These are the column names of
        :class:`rotvq.lab.training.History` and of the experiment's CSV files.
        """
        loss, recon_loss = torch.stack([self.loss.detach().double(),
                                        self.recon_loss.detach().double()]).tolist()
        vq = self.vq.metrics()
        return {"loss": loss, "recon_loss": recon_loss, "vq_loss": vq.pop("loss"), **vq}


class _VQVAE(nn.Module):
    """Shared forward pass; subclasses define ``_encode``, ``_decode`` and ``encoder_head``."""

    encoder_head: nn.Module  # last encoder layer, rescaled by calibrate_encoder_norm

    def __init__(self, latent_dim: int, codebook_size: int, encoder_scale: float,
                 vq_kwargs: dict) -> None:
        super().__init__()
        check_positive_int("latent_dim", latent_dim)
        check_positive_int("codebook_size", codebook_size)
        scale = float(encoder_scale)
        if not (scale > 0 and scale < float("inf")):
            raise ValueError(f"encoder_scale must be positive and finite, got {encoder_scale!r}")
        self.latent_dim = latent_dim
        self.codebook_size = codebook_size
        self.register_buffer("encoder_scale", torch.tensor(scale))
        # z is channel-last (B, ..., latent_dim) for both models: say so, never let the layer guess
        self.quantizer = VectorQuantizer(latent_dim, codebook_size,
                                         **{"channel_first": False, **vq_kwargs})

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output ``z``, channel-last ``(..., latent_dim)``, times ``encoder_scale``."""
        return self._encode(x) * self.encoder_scale

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Reconstruction from channel-last (quantized) latents."""
        return self._decode(z_q)

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        """Encode, quantize, decode.

        Args:
            x: a batch of inputs (shape: see the subclass).

        Returns:
            :class:`VQVAEOutput` with the reconstruction, ``z``, the quantizer's result and
            the losses.
        """
        z = self.encode(x)
        vq = self.quantizer(z)  # the estimator named by `estimator=` acts here
        reconstruction = self.decode(vq.quantized)
        recon_loss = F.mse_loss(reconstruction, x)
        return VQVAEOutput(reconstruction, z, vq, recon_loss, vq.codebook_loss,
                           vq.commitment_loss, recon_loss + vq.loss)

    @torch.no_grad()
    def calibrate_encoder_norm(self, x: torch.Tensor, target: float) -> float:
        """Rescale the last encoder layer so that mean ``|z|`` over ``x`` equals ``target``.

        Args:
            x: a batch of inputs (e.g. the first training batch).
            target: desired mean Euclidean norm of the latent vectors ``z``, > 0.

        Returns:
            The factor the last layer's weight and bias were multiplied by.
        """
        target = float(target)
        if not (target > 0 and target < float("inf")):
            raise ValueError(f"target norm must be positive and finite, got {target!r}")
        current = self.encode(x).norm(dim=-1).mean().item()
        if not current > 0:
            raise ValueError(f"mean |z| on this batch is {current}; cannot rescale it")
        factor = target / current
        for parameter in self.encoder_head.parameters():
            parameter.mul_(factor)
        return factor


class MLPVQVAE(_VQVAE):
    """VQ-VAE with fully connected encoder and decoder, for flat inputs ``(B, input_dim)``.

    The encoder maps each input to ``num_latents`` latent vectors of size ``latent_dim``
    (``z`` has shape ``(B, num_latents, latent_dim)``), each quantized independently; the
    decoder maps the concatenated codes back to ``(B, input_dim)`` (linear output).

    Args:
        input_dim: size of an input vector (64 for the embedded digits).
        hidden: hidden layer width, or a sequence of widths (encoder order; the decoder
            mirrors it).
        latent_dim: size of a latent / code vector.
        codebook_size: number of codes.
        num_latents: latent vectors per input.
        encoder_scale: fixed gain on the encoder output (see the module docstring).
        **vq_kwargs: passed to :class:`rotvq.quantizer.VectorQuantizer` (``estimator``,
            ``init``, ``init_scale``, ``codebook_weight``, ``commitment_weight``, ``ema``,
            ...).
    """

    def __init__(self, input_dim: int, hidden: int | Sequence[int], latent_dim: int,
                 codebook_size: int, *, num_latents: int = 4, encoder_scale: float = 1.0,
                 **vq_kwargs: Any) -> None:
        super().__init__(latent_dim, codebook_size, encoder_scale, vq_kwargs)
        check_positive_int("input_dim", input_dim)
        check_positive_int("num_latents", num_latents)
        widths = [hidden] if isinstance(hidden, int) else list(hidden)
        for width in widths:
            check_positive_int("hidden width", width)
        self.input_dim, self.num_latents = input_dim, num_latents
        code_dim = num_latents * latent_dim
        encoder: list[nn.Module] = []
        for a, b in zip([input_dim] + widths[:-1], widths):
            encoder += [nn.Linear(a, b), nn.ReLU()]
        self.encoder_head = nn.Linear(widths[-1] if widths else input_dim, code_dim)
        self.encoder = nn.Sequential(*encoder, self.encoder_head)
        decoder: list[nn.Module] = []
        back = widths[::-1]
        for a, b in zip([code_dim] + back[:-1], back):
            decoder += [nn.Linear(a, b), nn.ReLU()]
        decoder.append(nn.Linear(back[-1] if back else code_dim, input_dim))
        self.decoder = nn.Sequential(*decoder)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"expected x of shape (B, {self.input_dim}), got {tuple(x.shape)}")
        return self.encoder(x).reshape(x.shape[0], self.num_latents, self.latent_dim)

    def _decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_q.reshape(z_q.shape[0], -1))  # (B, input_dim)


class ConvVQVAE(_VQVAE):
    """VQ-VAE with convolutional encoder and decoder, for images ``(B, C, H, W)``.

    The encoder halves the resolution ``downsamples`` times (4x4 convolutions, stride 2),
    then a 1x1 convolution gives ``latent_dim`` channels; the latents are moved to
    channel-last, ``z`` of shape ``(B, H', W', latent_dim)`` with ``H' = H / 2**downsamples``,
    before the quantizer.  The decoder mirrors this with transposed convolutions
    (linear output).  ``H`` and ``W`` must be divisible by ``2**downsamples``.

    Args:
        in_channels: image channels (1 for digits/MNIST, 3 for patches/CIFAR-10).
        hidden: channels of the hidden convolutions.
        latent_dim: size of a latent / code vector.
        codebook_size: number of codes.
        downsamples: number of stride-2 stages (0 keeps the resolution).
        encoder_scale: fixed gain on the encoder output (see the module docstring).
        **vq_kwargs: passed to :class:`rotvq.quantizer.VectorQuantizer`.
    """

    def __init__(self, in_channels: int, hidden: int = 32, latent_dim: int = 8,
                 codebook_size: int = 64, *, downsamples: int = 1, encoder_scale: float = 1.0,
                 **vq_kwargs: Any) -> None:
        super().__init__(latent_dim, codebook_size, encoder_scale, vq_kwargs)
        check_positive_int("in_channels", in_channels)
        check_positive_int("hidden", hidden)
        check_nonnegative_int("downsamples", downsamples)
        self.in_channels, self.downsamples = in_channels, downsamples
        encoder: list[nn.Module] = []
        channels = in_channels
        for _ in range(downsamples):
            encoder += [nn.Conv2d(channels, hidden, 4, stride=2, padding=1), nn.ReLU()]
            channels = hidden
        encoder += [nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU()]
        self.encoder_head = nn.Conv2d(hidden, latent_dim, 1)
        self.encoder = nn.Sequential(*encoder, self.encoder_head)
        decoder: list[nn.Module] = [nn.Conv2d(latent_dim, hidden, 3, padding=1), nn.ReLU()]
        for _ in range(downsamples):
            decoder += [nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1), nn.ReLU()]
        decoder.append(nn.Conv2d(hidden, in_channels, 3, padding=1))
        self.decoder = nn.Sequential(*decoder)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        factor = 2 ** self.downsamples
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images of shape (B, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"H and W must be divisible by 2**downsamples = {factor}, "
                             f"got {tuple(x.shape[2:])}")
        return self.encoder(x).permute(0, 2, 3, 1)  # (B, C', H', W') -> (B, H', W', C')

    def _decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_q.permute(0, 3, 1, 2))  # (B, H', W', C') -> (B, C, H, W)
