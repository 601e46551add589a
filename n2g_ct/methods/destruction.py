"""Detail destruction of Noise2Grad: scramble the extracted noise before it is added to a clean image.

Each destruction maps noise (B, C, H, W) and a seeded ``torch.Generator`` to scrambled noise of the
same shape, dtype and device, drawing only from that generator (never the global RNG), so that
resume is exact and a CPU generator gives the same result on every device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Destruction = Callable[[Tensor, torch.Generator], Tensor]


def detail_destruction_mask(shape: torch.Size | tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Random signs: each element independently +1 or −1 with probability 1/2.

    Drawn on ``generator.device``, float32; move it with ``.to(tensor)``. Masks are per element, so
    every sample (and, as in the official code, every channel) gets its own.

    >>> detail_destruction_mask((2, 3), torch.Generator().manual_seed(0)).abs().unique()
    tensor([1.])
    """
    bits = torch.randint(0, 2, tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return bits * 2 - 1


def sign_flip(noise: Tensor, generator: torch.Generator) -> Tensor:
    """The paper's destruction: multiply each pixel by a random sign (whitens correlated noise)."""
    return noise * detail_destruction_mask(noise.shape, generator).to(noise)


def phase_scramble(noise: Tensor, generator: torch.Generator) -> Tensor:
    """Randomise the Fourier phases of each (H, W) image, keeping its amplitude spectrum.

    The phases are those of a white Gaussian field drawn from ``generator`` (a valid Hermitian
    phase field, so the result is real). Image structure (edges, organs) is scrambled into texture
    while the noise power spectrum, and so the spatial correlation of CT noise, is kept exactly.

    >>> n = torch.randn(1, 1, 8, 8)
    >>> s = phase_scramble(n, torch.Generator().manual_seed(0))
    >>> bool(torch.allclose(torch.fft.rfft2(s).abs(), torch.fft.rfft2(n).abs(), atol=1e-4))
    True
    """
    white = torch.randn(tuple(noise.shape), generator=generator, device=generator.device).to(noise.device)
    phases = torch.fft.rfft2(white)
    phases = phases / phases.abs().clamp_min(torch.finfo(torch.float32).tiny)
    scrambled = torch.fft.irfft2(torch.fft.rfft2(noise.float()) * phases, s=tuple(noise.shape[-2:]))
    return scrambled.to(noise.dtype)


def keep(noise: Tensor, generator: torch.Generator) -> Tensor:
    """No destruction (the N2G_D ablation, ``m ≡ 1``)."""
    return noise


DESTRUCTIONS: dict[str, Destruction] = {"sign": sign_flip, "phase": phase_scramble}
"""The destructions by their option name (``method.noise2grad.destruction``)."""
