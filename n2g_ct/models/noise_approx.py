"""Noise-approximation modules G of Noise2Grad: the paper's 1×1 convolution and a spectral gain."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn


class NoiseApproximator(nn.Conv2d):
    """G: one 1×1 convolution with bias, ``channels`` → ``channels`` (Lin et al., IJCAI 2021).

    Maps the removed noise ``n_hat = x − F(x)`` to the extracted noise ``n_tilde`` whose image
    gradient is matched to the noisy input's. Weights start at PyTorch's default init;
    `n2g_ct.models.build_noise_approximator` applies the official init or a scaled identity.

    Shapes:
        input (B, channels, H, W) → output (B, channels, H, W), same units as the input.
    """

    def __init__(self, channels: int = 1) -> None:
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"NoiseApproximator channels must be an integer >= 1, got {channels!r}")
        super().__init__(channels, channels, kernel_size=1, bias=True)


def rfft2_radial_frequency(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """(H, W//2+1) radial frequency, cycles/pixel, of each ``torch.fft.rfft2`` coefficient of an (H, W) image."""
    fy = torch.fft.fftfreq(height, device=device)[:, None]
    fx = torch.fft.rfftfreq(width, device=device)[None, :]
    return torch.sqrt(fy**2 + fx**2)


class SpectralNoiseGain(nn.Module):
    """G as a gain per radial frequency band, fitted so the synthetic noise has the input's noise power.

    For a denoiser F that is the minimum-mean-square-error estimate of the clean image, the removed
    noise ``n_hat = x − F(x)`` and the input ``x = s + n`` satisfy, for every linear projection P of
    the image (here: the Fourier coefficients of one frequency band),
    ``E[<P n_hat, P x>] = E[|P n|²]``: the residual's cross-power with the input is the noise power
    (orthogonality of the error to any function of x; n zero-mean and independent of s). The
    residual's own power is smaller, ``r/(1+r)`` of the noise power in a band with noise-to-signal
    ratio r, which is why synthetic noise made of ``n_hat`` alone is too weak wherever image and noise
    compete, and keeps getting weaker as F is trained on it. This G rescales each band of ``n_hat`` by
    ``sqrt(cross / power)``, moving averages of the two sums over the batches it is fitted on, so that
    the synthetic noise's power spectrum is the estimated noise power spectrum.

    At low frequencies the image's power is hundreds to thousands of times the noise's, and small
    errors of F there (a contrast change of a few per cent) swamp the estimate, which then often
    comes out negative. With ``extend_low`` (default) each band's target power is the largest
    estimate at its frequency or above: the noise spectrum is assumed not to fall towards low
    frequencies. That holds for white noise and for the reconstructed CT noise measured in
    BENCHMARKS.md; for noise whose spectrum does fall (an FBP ramp at the lowest frequencies) it
    overestimates the low-frequency noise, which makes F smooth more there.

    The identity holds for a least-squares F only; a trained F is an approximation, and where it
    drifts the estimate follows it (BENCHMARKS.md measures this over a 40-minute run).

    Buffers (saved in checkpoints): ``cross`` and ``power``, (channels, bands) moving averages of
    ``Re(N̂·X̄)`` and ``|N̂|²`` per Fourier coefficient, and ``fits``, their count. ``weight``
    (property): the gains, (channels, bands). Bands split radial frequency ``|f|`` in [0, √2/2]
    cycles/pixel evenly; the zero frequency gets gain 0 (the synthetic noise has zero mean per
    crop). Until the first fit every gain is 1.

    Shapes:
        input (B, channels, H, W) → output (B, channels, H, W), same units as the input.
    """

    BANDS = 16

    def __init__(self, channels: int = 1, extend_low: bool = True) -> None:
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"SpectralNoiseGain channels must be an integer >= 1, got {channels!r}")
        super().__init__()
        self.extend_low = extend_low
        self.register_buffer("cross", torch.ones(channels, self.BANDS))
        self.register_buffer("power", torch.ones(channels, self.BANDS))
        self.register_buffer("fits", torch.zeros((), dtype=torch.long))

    @property
    def weight(self) -> Tensor:
        """Band gains ``sqrt(target / power)``, (channels, bands); ``target = max(cross, 0)``, and with
        ``extend_low`` the largest such estimate at the band's frequency or above."""
        target = self.cross.clamp_min(0)
        if self.extend_low:
            target = target.flip(-1).cummax(-1).values.flip(-1)
        return (target / self.power.clamp_min(torch.finfo(torch.float32).tiny)).sqrt()

    @staticmethod
    def band_index(height: int, width: int, device: torch.device) -> Tensor:
        """(H, W//2+1) band of each ``rfft2`` coefficient; −1 at the zero frequency."""
        radius = rfft2_radial_frequency(height, width, device) / (math.sqrt(0.5) + 1e-6)
        bands = (radius * SpectralNoiseGain.BANDS).long().clamp_max(SpectralNoiseGain.BANDS - 1)
        bands[0, 0] = -1
        return bands

    def forward(self, n_hat: Tensor) -> Tensor:
        spectrum = torch.fft.rfft2(n_hat.float())
        bands = self.band_index(*n_hat.shape[-2:], n_hat.device)
        gains = self.weight.to(n_hat.device)[:, bands.clamp_min(0)] * (bands >= 0)  # (C, H, W//2+1)
        return torch.fft.irfft2(spectrum * gains, s=tuple(n_hat.shape[-2:])).to(n_hat.dtype)

    @torch.no_grad()
    def fit_(self, n_hat: Tensor, x: Tensor, momentum: float) -> Tensor:
        """Move the moving averages (weight ``momentum``; the first fit sets them) towards this batch's
        per-band means of ``Re(N̂·X̄)`` and ``|N̂|²``; returns this batch's gains, (channels, bands).

        Under ``torch.distributed`` the means are averaged over all processes, so every rank has the same G.
        """
        spectrum_n, spectrum_x = torch.fft.rfft2(n_hat.float()), torch.fft.rfft2(x.float())
        bands = self.band_index(*n_hat.shape[-2:], n_hat.device).flatten()
        keep = bands >= 0
        per_coefficient = torch.stack([
            (spectrum_n * spectrum_x.conj()).real.mean(0).flatten(1)[:, keep],  # (C, K)
            spectrum_n.abs().square().mean(0).flatten(1)[:, keep],
        ]) / (n_hat.shape[-1] * n_hat.shape[-2])
        band = bands[keep].expand_as(per_coefficient)
        sums = torch.zeros(2, *self.cross.shape, device=n_hat.device).scatter_add_(2, band, per_coefficient)
        counts = torch.bincount(bands[keep], minlength=self.BANDS)
        means = sums / counts.clamp_min(1)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(means)
            means /= dist.get_world_size()
        # A band without coefficients (only in tiny crops) keeps its average.
        weight = (1.0 if int(self.fits) == 0 else momentum) * (counts > 0).to(self.cross)
        self.cross.mul_(1 - weight).add_(weight * means[0].to(self.cross))
        self.power.mul_(1 - weight).add_(weight * means[1].to(self.power))
        self.fits += 1
        return (means[0].clamp_min(0) / means[1].clamp_min(torch.finfo(torch.float32).tiny)).sqrt()


def band_centres(bands: int | None = None) -> Tensor:
    """(bands,) centre radial frequency of each band of :class:`SpectralNoiseGain`, cycles/pixel."""
    bands = SpectralNoiseGain.BANDS if bands is None else bands
    return (torch.arange(bands, dtype=torch.float64) + 0.5) / bands * math.sqrt(0.5)


def band_power(noise: Tensor) -> Tensor:
    """(B, C, bands) mean ``|rfft2|² / (H·W)`` of each image over the coefficients of each band of
    :class:`SpectralNoiseGain` (the zero frequency left out): a noise power spectrum per image.

    >>> white = torch.randn(16, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 3
    >>> bool(((band_power(white).mean(0) / 9 - 1).abs() < 0.15).all())  # flat at the variance
    True
    """
    height, width = noise.shape[-2:]
    bands = SpectralNoiseGain.band_index(height, width, noise.device).flatten()
    keep = bands >= 0
    power = torch.fft.rfft2(noise.float()).abs().square().flatten(2)[..., keep] / (height * width)
    sums = torch.zeros(*power.shape[:2], SpectralNoiseGain.BANDS, device=noise.device)
    sums.scatter_add_(2, bands[keep].expand_as(power), power)
    return sums / torch.bincount(bands[keep], minlength=SpectralNoiseGain.BANDS).clamp_min(1)


def band_filter(image: Tensor, gains: Tensor) -> Tensor:
    """Multiply each band of :class:`SpectralNoiseGain` of each image by its gain; the zero frequency by 0.

    Args:
        image: (B, C, H, W).
        gains: (B, bands) or (B, C, bands).

    Returns:
        (B, C, H, W), same dtype.
    """
    height, width = image.shape[-2:]
    bands = SpectralNoiseGain.band_index(height, width, image.device)
    gains = gains.to(image.device, torch.float32)
    gains = gains[:, None, :] if gains.ndim == 2 else gains
    gain_map = gains[..., bands.clamp_min(0)] * (bands >= 0)  # (B, C or 1, H, W//2+1)
    return torch.fft.irfft2(torch.fft.rfft2(image.float()) * gain_map, s=(height, width)).to(image.dtype)


class MeasuredNoiseSpectrum(nn.Module):
    """G that gives each crop's extracted noise, band by band, a noise power measured before training.

    The target comes from the noise power spectra of the crops' slices, measured in their uniform
    soft-tissue ROIs without F (:func:`n2g_ct.data.pool_noise_power`): the level cannot drift with F,
    nor be inflated by anatomy that F removes (edges, contrast), which is where an estimate from the
    removed image fails when the noisy pool differs from the clean one. The removed image ``n_hat``
    supplies the rest: its texture within each band (streak directions), then scrambled.

    Shapes:
        forward(n_hat (B, C, H, W), target (B, bands)) → (B, C, H, W): per image and band,
        ``|rfft2|² / (H·W)`` averages ``target`` (zero mean; the units of the target).
    """

    def forward(self, n_hat: Tensor, target: Tensor) -> Tensor:
        power = band_power(n_hat).clamp_min(torch.finfo(torch.float32).tiny)
        return band_filter(n_hat, (target.to(power)[:, None, :] / power).sqrt())
