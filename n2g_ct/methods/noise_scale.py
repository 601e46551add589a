"""The noise scale G of Noise2Grad: how the removed image becomes synthetic noise.

Every G has one interface (`NoiseScale`): ``pairs(batch, y)`` says which clean images the synthetic
noise goes onto and what F must output for them; ``G(n_hat, x, pairs, fit)`` gives the extracted
noise ``n_tilde``, (B, C, H, W), in the units of ``n_hat``. Three kinds:

- `LearnedNoiseScale`, the paper's: a 1×1 convolution trained by the optimiser on the gradient loss.
- `SpectralNoiseGain`: a gain per radial frequency band fitted to the removed image's cross-power
  with the input (natural-image runs, which have no soft tissue to measure noise in).
- `MeasuredNoiseSpectrum`, the CT default: each crop gets the noise power spectrum measured on its
  own slice before training, less the clean slice's own noise, and a target corrected for it.

Bands split the radial frequency ``|f|`` in [0, √2/2] cycles/pixel into `BANDS` equal bands; the zero
frequency is in none (synthetic noise has zero mean per crop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from n2g_ct.models import official_init_

BANDS = 16
"""Radial frequency bands of the spectral and measured noise scales."""

SCALE_MOMENTUM = 0.1
"""Weight of each new fit in the moving averages of `SpectralNoiseGain`."""


def rfft2_radial_frequency(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """(H, W//2+1) radial frequency, cycles/pixel, of each ``torch.fft.rfft2`` coefficient of an (H, W) image."""
    fy = torch.fft.fftfreq(height, device=device)[:, None]
    fx = torch.fft.rfftfreq(width, device=device)[None, :]
    return torch.sqrt(fy**2 + fx**2)


def band_index(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """(H, W//2+1) band of each ``rfft2`` coefficient of an (H, W) image; −1 at the zero frequency."""
    radius = rfft2_radial_frequency(height, width, device) / (math.sqrt(0.5) + 1e-6)
    bands = (radius * BANDS).long().clamp_max(BANDS - 1)
    bands[0, 0] = -1
    return bands


def band_counts(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """(bands,) how many ``rfft2`` coefficients of an (H, W) image each band holds."""
    return torch.bincount(band_index(height, width, device).flatten().clamp_min(0), minlength=BANDS)


def band_centres(bands: int = BANDS) -> Tensor:
    """(bands,) centre radial frequency of each band, cycles/pixel."""
    return (torch.arange(bands, dtype=torch.float64) + 0.5) / bands * math.sqrt(0.5)


def band_power(noise: Tensor) -> Tensor:
    """(B, C, bands) mean ``|rfft2|² / (H·W)`` of each image over the coefficients of each band of
    the bands (`band_index`) (the zero frequency left out): a noise power spectrum per image.

    >>> white = torch.randn(16, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 3
    >>> bool(((band_power(white).mean(0) / 9 - 1).abs() < 0.15).all())  # flat at the variance
    True
    """
    height, width = noise.shape[-2:]
    bands = band_index(height, width, noise.device).flatten()
    keep = bands >= 0
    power = torch.fft.rfft2(noise.float()).abs().square().flatten(2)[..., keep] / (height * width)
    sums = torch.zeros(*power.shape[:2], BANDS, device=noise.device)
    sums.scatter_add_(2, bands[keep].expand_as(power), power)
    return sums / torch.bincount(bands[keep], minlength=BANDS).clamp_min(1)


def band_filter(image: Tensor, gains: Tensor) -> Tensor:
    """Multiply each band of the bands (`band_index`) of each image by its gain; the zero frequency by 0.

    Args:
        image: (B, C, H, W).
        gains: (B, bands) or (B, C, bands).

    Returns:
        (B, C, H, W), same dtype.
    """
    height, width = image.shape[-2:]
    bands = band_index(height, width, image.device)
    gains = gains.to(image.device, torch.float32)
    gains = gains[:, None, :] if gains.ndim == 2 else gains
    gain_map = gains[..., bands.clamp_min(0)] * (bands >= 0)  # (B, C or 1, H, W//2+1)
    return torch.fft.irfft2(torch.fft.rfft2(image.float()) * gain_map, s=(height, width)).to(image.dtype)


MIN_NOISE_EXCESS = 1.25
"""Measured noise scale: a band gets synthetic noise only where the noisy slice's noise power is at
least this multiple of the clean slice's own; below it, the clean image is too noisy to teach that
band (the corrected target would be mostly noise), and the band is left alone."""


MIN_SYNTHETIC_SHARE = 0.5
"""With ``self_pairs``, a sample whose clean crop can carry less than this share of the noisy crop's
noise power (summed over its Fourier coefficients) is trained on the noisy crop itself instead."""


def own_noise_correction(noise_power: Tensor, clean_power: Tensor) -> tuple[Tensor, Tensor]:
    """Synthetic noise power and target correction per crop and band for the measured noise scale.

    A routine-dose image ``y = s + e`` has noise of its own (power ``E_e`` per band). Trained on
    ``y + n → y``, F learns to keep noise like ``e``, and so removes only what exceeds it. Instead,
    with ``n`` of power ``E_n = E_x − E_e`` (so that ``y + n`` is as noisy as the noisy slice, power
    ``E_x``) and the target ``y − (E_e / E_n)·n`` (band by band), the expected target given the
    input is the clean ``s`` whenever ``e`` and ``n`` are independent and Gaussian: then
    ``E[e | z] = E_e / (E_e + E_n) · E[e + n | z]`` and the two terms cancel (the unequal-noise form
    of Noisier2Noise, Moran et al., CVPR 2020, and Recorrupted-to-Recorrupted, Pang et al., CVPR 2021).
    F learns to remove all the noise, at the noisy slice's level.

    Args:
        noise_power: (B, bands) ``E_x``, the noisy crops' slices' noise power.
        clean_power: (B, bands) ``E_e``, the clean crops' slices' own noise power.

    Returns:
        ((B, bands) ``E_n``, 0 where ``E_x < MIN_NOISE_EXCESS·E_e``; (B, bands) ``E_e / E_n``, 0 there too).

    >>> power, correction = own_noise_correction(torch.tensor([[4.0, 1.0]]), torch.tensor([[1.0, 1.0]]))
    >>> power.tolist(), correction.tolist()
    ([[3.0, 0.0]], [[0.3333333432674408, 0.0]])
    """
    usable = noise_power >= MIN_NOISE_EXCESS * clean_power
    power = torch.where(usable, noise_power - clean_power, torch.zeros_like(noise_power))
    correction = torch.where(usable, clean_power / power.clamp_min(torch.finfo(torch.float32).tiny),
                             torch.zeros_like(noise_power))
    return power, correction


def self_paired(noise_power: Tensor, synthetic_power: Tensor, band_counts: Tensor) -> Tensor:
    """(B,) bool: the samples whose clean crop carries less than :data:`MIN_SYNTHETIC_SHARE` of the
    noisy crop's noise power (a noisy pool less noisy than the clean pool's own noise).

    Such a sample is trained on its noisy crop ``x`` itself (own noise ``E_x``): synthetic noise of
    power ``E_x`` and the target ``x − n`` (:func:`own_noise_correction` with ``E_e = E_n = E_x``),
    the recorrupted pairs of Pang et al. (CVPR 2021): F learns that slice's anatomy at twice its noise
    power, from no other image.

    Args:
        noise_power, synthetic_power: (B, bands) ``E_x`` and the ``E_n`` a clean crop allows.
        band_counts: (bands,) Fourier coefficients per band (the weights of the power sums).
    """
    weights = band_counts.to(noise_power)
    share = (synthetic_power * weights).sum(1) / (noise_power * weights).sum(1).clamp_min(torch.finfo(torch.float32).tiny)
    return share < MIN_SYNTHETIC_SHARE



@dataclass(frozen=True)
class SyntheticPairs:
    """The clean side of a batch's synthetic pairs.

    Attributes:
        clean: (B, C, H, W) the images the synthetic noise is added to.
        power: (B, bands) the synthetic noise power per crop and band (measured scale), else ``None``.
        correction: (B, bands) the own-noise correction of the target (measured scale), else ``None``.
    """

    clean: Tensor
    power: Tensor | None = None
    correction: Tensor | None = None

    def target(self, noise: Tensor, gains: Tensor) -> Tensor:
        """What F must output for ``clean + noise``, with ``gains`` (B, 1, 1, 1) the noise gains applied."""
        if self.correction is None:
            return self.clean
        return self.clean - band_filter(noise, self.correction / gains.flatten()[:, None] ** 2)


class NoiseScale(nn.Module):
    """G: the removed image ``n_hat`` → the extracted noise ``n_tilde`` (module docstring).

    Attributes:
        learned: the optimiser trains G through the gradient loss.
    """

    learned = False

    def pairs(self, batch: dict[str, Tensor], y: Tensor) -> SyntheticPairs:
        """The clean images of the synthetic pairs and their targets (``y``: the clean crops)."""
        return SyntheticPairs(y)

    def forward(self, n_hat: Tensor, x: Tensor, pairs: SyntheticPairs, fit: bool) -> Tensor:
        """``n_tilde`` from ``n_hat`` (B, C, H, W); ``fit``: first fit G to this batch (``x``, the noisy crops)."""
        raise NotImplementedError

    def logged_weight(self) -> float | str:
        """G's mean weight for ``train_log.csv`` (``""``: G has none)."""
        return ""


class LearnedNoiseScale(NoiseScale):
    """The paper's G: one 1×1 convolution with bias, ``channels`` → ``channels``, learned from ~0.

    Official init (pix2pix ``init_weights``, ``normal``, gain 0.02): weight ~ N(0, 0.02²), bias 0,
    drawn from the global torch RNG; so the first synthetic noise is ~50× weaker than the removed
    noise. The zero bias matters: the gradient loss is blind to a constant offset, so the bias never
    receives a gradient and keeps its initial value.
    """

    learned = True

    def __init__(self, channels: int = 1) -> None:
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"the noise scale's channels must be an integer >= 1, got {channels!r}")
        super().__init__()
        self.conv = official_init_(nn.Conv2d(channels, channels, kernel_size=1, bias=True))

    def forward(self, n_hat: Tensor, x: Tensor, pairs: SyntheticPairs, fit: bool) -> Tensor:
        return self.conv(n_hat)

    def logged_weight(self) -> float:
        return float(self.conv.weight.detach().mean())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # Checkpoints before the method interface saved the convolution's tensors without ``conv.``.
        for name in ("weight", "bias"):
            if prefix + name in state_dict:
                state_dict[f"{prefix}conv.{name}"] = state_dict.pop(prefix + name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SpectralNoiseGain(NoiseScale):
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
    comes out negative. So each band's target power is the largest
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

    def __init__(self, channels: int = 1) -> None:
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"SpectralNoiseGain channels must be an integer >= 1, got {channels!r}")
        super().__init__()
        self.register_buffer("cross", torch.ones(channels, BANDS))
        self.register_buffer("power", torch.ones(channels, BANDS))
        self.register_buffer("fits", torch.zeros((), dtype=torch.long))

    @property
    def weight(self) -> Tensor:
        """Band gains ``sqrt(target / power)``, (channels, bands); ``target = max(cross, 0)`` lifted to
        the largest such estimate at the band's frequency or above."""
        target = self.cross.clamp_min(0).flip(-1).cummax(-1).values.flip(-1)
        return (target / self.power.clamp_min(torch.finfo(torch.float32).tiny)).sqrt()

    def forward(self, n_hat: Tensor, x: Tensor, pairs: SyntheticPairs, fit: bool) -> Tensor:
        if fit:
            self.fit_(n_hat.detach(), x, SCALE_MOMENTUM)
        spectrum = torch.fft.rfft2(n_hat.float())
        bands = band_index(*n_hat.shape[-2:], n_hat.device)
        gains = self.weight.to(n_hat.device)[:, bands.clamp_min(0)] * (bands >= 0)  # (C, H, W//2+1)
        return torch.fft.irfft2(spectrum * gains, s=tuple(n_hat.shape[-2:])).to(n_hat.dtype)

    def logged_weight(self) -> float:
        return float(self.weight.mean())

    @torch.no_grad()
    def fit_(self, n_hat: Tensor, x: Tensor, momentum: float) -> Tensor:
        """Move the moving averages (weight ``momentum``; the first fit sets them) towards this batch's
        per-band means of ``Re(N̂·X̄)`` and ``|N̂|²``; returns this batch's gains, (channels, bands).

        Under ``torch.distributed`` the means are averaged over all processes, so every rank has the same G.
        """
        spectrum_n, spectrum_x = torch.fft.rfft2(n_hat.float()), torch.fft.rfft2(x.float())
        bands = band_index(*n_hat.shape[-2:], n_hat.device).flatten()
        keep = bands >= 0
        per_coefficient = torch.stack([
            (spectrum_n * spectrum_x.conj()).real.mean(0).flatten(1)[:, keep],  # (C, K)
            spectrum_n.abs().square().mean(0).flatten(1)[:, keep],
        ]) / (n_hat.shape[-1] * n_hat.shape[-2])
        band = bands[keep].expand_as(per_coefficient)
        sums = torch.zeros(2, *self.cross.shape, device=n_hat.device).scatter_add_(2, band, per_coefficient)
        counts = torch.bincount(bands[keep], minlength=BANDS)
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



class MeasuredNoiseSpectrum(NoiseScale):
    """G that gives each crop's extracted noise, band by band, a noise power measured before training.

    The target comes from the noise power spectra of the crops' slices, measured in their uniform
    soft-tissue ROIs without F (`pool_noise_power`): the level cannot drift with F,
    nor be inflated by anatomy that F removes (edges, contrast), which is where an estimate from the
    removed image fails when the noisy pool differs from the clean one. The removed image ``n_hat``
    supplies the rest: its texture within each band (streak directions), then scrambled.

    Shapes:
        forward(n_hat (B, C, H, W), ...) → (B, C, H, W): per image and band, ``|rfft2|² / (H·W)``
        averages ``pairs.power`` (zero mean; the units of the power).
    """

    def __init__(self, self_pairs: bool = True) -> None:
        super().__init__()
        self.self_pairs = self_pairs

    def pairs(self, batch: dict[str, Tensor], y: Tensor) -> SyntheticPairs:
        """Synthetic power and target correction from the batch's ``noise_power`` and ``clean_power``
        (B, bands); with ``self_pairs``, a sample whose clean crop is too noisy trains on its noisy crop."""
        noise_power, clean_power = batch.get("noise_power"), batch.get("clean_power")
        if noise_power is None or clean_power is None or len(noise_power) != len(y) or len(clean_power) != len(y):
            raise ValueError("the measured noise scale needs noise_power and clean_power, (B, bands) per crop")
        power, correction = own_noise_correction(noise_power, clean_power)
        if self.self_pairs:
            own = self_paired(noise_power, power, band_counts(*y.shape[-2:], y.device))
            power = torch.where(own[:, None], noise_power, power)
            correction = torch.where(own[:, None], torch.ones_like(correction), correction)
            y = torch.where(own[:, None, None, None], batch["noisy"], y)
        return SyntheticPairs(y, power, correction)

    def forward(self, n_hat: Tensor, x: Tensor, pairs: SyntheticPairs, fit: bool) -> Tensor:
        power = band_power(n_hat).clamp_min(torch.finfo(torch.float32).tiny)
        return band_filter(n_hat, (pairs.power.to(power)[:, None, :] / power).sqrt())


def build_noise_scale(kind: str, channels: int, self_pairs: bool) -> NoiseScale:
    """The G of ``method.noise2grad.noise_scale`` (``learned``, ``spectral`` or ``measured``)."""
    if kind == "learned":
        return LearnedNoiseScale(channels)
    if kind == "spectral":
        return SpectralNoiseGain(channels)
    return MeasuredNoiseSpectrum(self_pairs)
