"""One training step of Noise2Grad (Lin et al., "Noise2Grad: Extract Image Noise to Denoise", IJCAI 2021).

With ``x`` noisy crops and ``y`` unrelated clean crops (both in [0, 1], (B, C, H, W)):

1. ``n_hat = x − F(x)``; ``n_tilde = G(n_hat)``
2. ``x_s = clamp(y + D(n_tilde.detach()), 0, 1)`` with ``D`` the detail destruction
3. ``L_denoise = MSE(F(x_s), y)`` every step; ``L_grad = MSE(∇n_tilde, ∇x)`` on steps ``t`` with
   ``t mod τ == 0``, ``τ = ⌊t/period⌋ + 1`` (update delay); ``loss = L_denoise + L_grad``.

Three variants (`Noise2GradOptions.variant`):

- ``faithful``, the paper and its official code: ``D`` multiplies by random ±1 per pixel; G (a 1×1
  conv) is learned by the optimiser from ~0; ``L_grad`` trains F too, through ``n_hat``.
- ``default``, this toolkit's, built to hold where users train: pools that differ in anatomy,
  scanner and noise level. ``D`` randomises the Fourier phases of each crop (keeps the noise power
  spectrum, so CT's spatially correlated noise stays correlated). G gives each crop's ``n_hat``,
  band by band, the noise power spectrum measured beforehand on the crop's own slice, in its
  uniform soft-tissue ROIs (`MeasuredNoiseSpectrum`): an estimate that needs no F, so anatomy F
  removes (a skull's edges, contrast that differs from the clean pool's) cannot inflate it, and
  each slice keeps its own level. The clean images' own noise is measured the same way: the
  synthetic noise adds only what the noisy slice has in excess, and the target is corrected so that
  F learns to remove all the noise, not only the excess (`own_noise_correction`); a sample whose
  clean crop is noisier than its noisy crop trains on the noisy crop itself (``self_pairs``,
  `self_paired`). F is a residual U-Net without a local mean (``model.residual``,
  ``model.local_mean_px``): it keeps every CT number it has no reason to change. ``L_grad`` is only
  reported.
- ``robust``: ``default`` plus a random gain in [1/3, 3] on each sample's synthetic noise
  (``noise_gain``), so F also learns noise levels beyond the pool's (slices noisier than the pool).

Earlier toolkit defaults stay selectable as options: ``noise_scale: spectral`` (G a gain per band
fitted to the removed noise's cross-power with the input; `SpectralNoiseGain`) and ``fitted``.
BENCHMARKS.md measures each variant on the chest benchmarks and on in-house pools.

The step only computes losses (and, for a fitted or spectral scale, updates G in place); the caller
owns the optimiser, the step counter and logging. It keeps the input dtype and works inside ``torch.autocast``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d
from torch import Tensor, nn

from n2g_ct.losses import denoise_loss, gradient_loss, image_gradient
from n2g_ct.models.noise_approx import SpectralNoiseGain, band_filter, rfft2_radial_frequency

DESTRUCTIONS = ("sign", "phase", "envelope", "split")
SPLIT_CUTOFF = 0.125
"""Radial frequency, cycles/pixel, below which ``split`` destruction randomises phases."""
ENVELOPE_SIGMA_PX = 8.0
"""Gaussian σ, pixels, of the local noise amplitude that ``envelope`` destruction keeps."""
NOISE_SCALES = ("learned", "fitted", "spectral", "measured")


VARIANTS: dict[str, dict[str, object]] = {
    "faithful": {"destruction": "sign", "grad_into_denoiser": True, "noise_scale": "learned",
                 "freeze_extractor": 1.0, "noise_gain": 1.0, "self_pairs": False},
    "default": {"destruction": "phase", "grad_into_denoiser": False, "noise_scale": "measured",
                "freeze_extractor": 1.0, "noise_gain": 1.0, "self_pairs": True},
    "robust": {"destruction": "phase", "grad_into_denoiser": False, "noise_scale": "measured",
               "freeze_extractor": 1.0, "noise_gain": 3.0, "self_pairs": True},
}
"""The choices each variant makes for the options left unset (see `Noise2GradOptions`)."""


@dataclass(frozen=True)
class Noise2GradOptions:
    """Switches of the Noise2Grad step.

    ``variant`` picks the method: ``faithful`` is the paper's (Lin et al., IJCAI 2021, and its
    official code); ``default`` is this toolkit's, which departs from it where BENCHMARKS.md
    measured a win; ``robust`` adds a noise gain for slices noisier than the pool (module
    docstring). Options left unset (``None``) take the variant's value (`VARIANTS`); set ones override it.

    Attributes:
        variant: ``default``, ``faithful`` or ``robust``.
        period: update-delay period, in optimiser steps (paper: 500); ``τ = ⌊t/period⌋ + 1``.
        period_fraction: instead of ``period``: the period as a fraction of the run's total steps,
            so that the delay schedule scales with the budget as the learning-rate schedule does
            (0.1: τ grows from 1 to 11 over any run length). See :meth:`period_for`.
        detail_destruction: scramble the extracted noise before adding it to the clean image;
            ``False`` is the N2G_D ablation (``m ≡ 1``).
        update_delay: apply the gradient loss only on steps with ``t mod τ == 0``; ``False`` is the
            N2G_U ablation (``τ ≡ 1``, every step).
        destruction: how detail destruction scrambles the noise: ``sign`` (paper) flips the sign of
            each pixel, which whitens spatially correlated noise; ``phase`` randomises the Fourier
            phases of each crop, which destroys image structure but keeps the noise power spectrum
            (and spreads the noise evenly over the crop); ``envelope`` randomises the phases of the
            noise divided by its local amplitude and multiplies the amplitude back, which also keeps
            where the noise is strong or weak (`envelope_scramble`); ``split`` randomises the phases
            below ``SPLIT_CUTOFF`` only (where the residual carries image structure) and keeps the
            rest as it is, up to a random flip of each axis and sign (`split_scramble`).
        grad_into_denoiser: the gradient loss also trains F through ``n_hat`` (paper). ``False``:
            it sets the noise scale only, and F learns from the synthetic pairs alone.
        noise_scale: ``learned`` (paper): G is trained by the optimiser on the gradient loss.
            ``fitted``: on gradient-loss steps G's weight moves towards the least-squares scale
            ``a = <∇n_hat, ∇x> / <∇n_hat, ∇n_hat>`` (per channel, over the batch), an exponential
            moving average with weight ``scale_momentum``; the optimiser does not touch G.
            ``spectral``: G is a `SpectralNoiseGain`, one gain per radial frequency band, fitted on
            the same steps so that the synthetic noise's power in each band is the residual's
            cross-power with the input, which estimates the noise power (see its docstring).
            ``measured``: G is a `MeasuredNoiseSpectrum`: each crop's synthetic noise gets the noise
            power spectrum measured on its own slice before training, less the clean image's own
            noise, and the target is corrected for that own noise (`own_noise_correction`). CT only.
        scale_momentum: weight of each new fit in the moving average of ``fitted``, in (0, 1].
        freeze_extractor: ``φ`` in (0, 1]: from step ``⌈φ·total_steps⌉`` on, ``n_hat`` comes from a
            frozen copy of F taken at that step, so the synthetic noise stops following F. Without it
            the loop "F removes less → less noise is extracted → F learns to remove less" can drift:
            F, trained ever longer on synthetic noise, tells it ever better from the real noise,
            keeps more of the real noise, and the noise estimate and PSNR fall as training continues.
            1 (paper, the variants): F extracts throughout.
        extend_low: ``spectral`` scale only: take each band's noise power as at least that of every
            higher band, where the estimate is reliable (see `SpectralNoiseGain`); ``False``
            uses every band's own estimate.
        noise_gain: ``r`` ≥ 1: each sample's synthetic noise is multiplied by a gain drawn
            log-uniformly from [1/r, r], so F learns to remove noise of any level in that range
            (CT noise varies along the body; the slices to denoise may be noisier than the pool).
            The mean noise power grows by ``E[g²] = (r² − r⁻²) / (4 ln r)``: 1.35 at 2, 2.02 at 3.
            1 (paper, ``default``): no gain; ``robust``: 3.
        self_pairs: ``measured`` scale only: a sample whose clean crop is too noisy to carry the
            noisy crop's noise (see `self_paired`) is trained on the noisy crop itself, with
            recorrupted pairs; ``False`` leaves such samples' noise at what the clean crop allows.
        noise_reuse: ``k`` ≥ 1: the noise is extracted from only the first ``⌈B/k⌉`` noisy crops of
            a batch of B, and each extracted noise feeds ``k`` synthetic pairs (each with its own
            detail destruction and gain). The extraction forward of F costs about a quarter of a
            step, so ``k`` = 2 fits about an eighth more steps into a time budget. 1 (paper): every
            crop's own noise.
    """

    variant: str = "default"
    period: int = 500
    period_fraction: float | None = None
    detail_destruction: bool = True
    update_delay: bool = True
    destruction: str | None = None
    grad_into_denoiser: bool | None = None
    noise_scale: str | None = None
    scale_momentum: float = 0.1
    noise_gain: float | None = None
    freeze_extractor: float | None = None
    extend_low: bool = True
    noise_reuse: int = 1
    self_pairs: bool | None = None
    from_variant: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)
    """The options that took the variant's value (left unset)."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"Noise2GradOptions.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        unset = frozenset(name for name in VARIANTS[self.variant] if getattr(self, name) is None)
        for name in unset:
            object.__setattr__(self, name, VARIANTS[self.variant][name])
        object.__setattr__(self, "from_variant", unset)
        _require_positive_int(self.period, "Noise2GradOptions.period (optimiser steps)")
        _require_positive_int(self.noise_reuse, "Noise2GradOptions.noise_reuse (synthetic pairs per extracted noise)")
        if self.noise_scale == "measured" and self.noise_reuse > 1:
            raise ValueError("Noise2GradOptions.noise_reuse > 1 does not combine with the measured noise scale")
        for name in ("detail_destruction", "update_delay", "grad_into_denoiser", "extend_low", "self_pairs"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"Noise2GradOptions.{name} must be true or false, got {value!r}")
        for name, allowed in (("destruction", DESTRUCTIONS), ("noise_scale", NOISE_SCALES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Noise2GradOptions.{name} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        if self.period_fraction is not None and not 0.0 < self.period_fraction <= 1.0:
            raise ValueError(f"Noise2GradOptions.period_fraction must be in (0, 1], got {self.period_fraction!r}")
        if not 0.0 < self.scale_momentum <= 1.0:
            raise ValueError(f"Noise2GradOptions.scale_momentum must be in (0, 1], got {self.scale_momentum!r}")
        if not 0.0 < self.freeze_extractor <= 1.0:
            raise ValueError(f"Noise2GradOptions.freeze_extractor must be in (0, 1], got {self.freeze_extractor!r}")
        if not self.noise_gain >= 1.0:
            raise ValueError(f"Noise2GradOptions.noise_gain must be >= 1, got {self.noise_gain!r}")


    def for_images(self) -> Noise2GradOptions:
        """These options for natural images: a ``measured`` noise scale the variant chose becomes
        ``spectral`` (natural images have no soft tissue to measure the noise in); an explicit one stays."""
        if self.noise_scale == "measured" and "noise_scale" in self.from_variant:
            return dataclasses.replace(self, noise_scale="spectral")
        return self

    def period_for(self, total_steps: int) -> int:
        """The update-delay period of a run of ``total_steps`` steps (``period`` unless ``period_fraction``).

        >>> Noise2GradOptions(period_fraction=0.1).period_for(2000), Noise2GradOptions().period_for(2000)
        (200, 500)
        """
        if self.period_fraction is None:
            return self.period
        return max(1, round(self.period_fraction * total_steps))

    @property
    def freezes_extractor(self) -> bool:
        """Whether a frozen copy of F extracts the noise from some step on (``freeze_extractor`` < 1)."""
        return self.freeze_extractor < 1.0

    def freeze_step(self, total_steps: int | None) -> int | None:
        """The step from which the noise extractor is frozen (``None``: never).

        >>> [Noise2GradOptions(freeze_extractor=value).freeze_step(2000) for value in (0.25, 1.0)]
        [500, None]
        """
        if not self.freezes_extractor:
            return None
        if total_steps is None:
            raise ValueError("options.freeze_extractor needs the run's total_steps")
        return max(1, math.ceil(self.freeze_extractor * total_steps))


@dataclass(frozen=True)
class StepResult:
    """What one training step computed.

    Attributes:
        loss: scalar to call ``backward()`` on.
        denoise_loss: detached scalar tensor (kept on the device: no host sync per step; ``float()``
            it when logging).
        grad_loss: detached scalar tensor, or ``None`` on steps without the gradient loss (with
            a ``fitted`` scale and ``grad_into_denoiser`` off it is reported but trains nothing).
        images: detached (B, C, H, W) tensors by name, for logging and inspection. Noise2Grad:
            ``n_hat``, ``n_tilde`` (⌈B/noise_reuse⌉ crops), ``x_s`` (synthetic noisy image),
            ``x_s_denoised``; baselines: ``prediction``.
    """

    loss: Tensor
    denoise_loss: Tensor
    grad_loss: Tensor | None = None
    images: dict[str, Tensor] = field(default_factory=dict)


def _require_positive_int(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")


def update_delay(step: int, period: int = 500) -> int:
    """Update delay ``τ = ⌊step/period⌋ + 1``; ``step`` is the global optimiser step, from 1.

    >>> [update_delay(t) for t in (1, 499, 500, 999, 1000)]
    [1, 1, 2, 2, 3]
    """
    _require_positive_int(step, "step (global optimiser step, from 1)")
    _require_positive_int(period, "period (optimiser steps)")
    return step // period + 1


def uses_gradient_loss(step: int, period: int = 500, delay_enabled: bool = True) -> bool:
    """Whether the gradient loss is applied at ``step``: ``step mod τ == 0`` (``τ ≡ 1`` without delay)."""
    tau = update_delay(step, period)  # validates step and period in both modes
    return not delay_enabled or step % tau == 0


def detail_destruction_mask(shape: torch.Size | tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Random signs: each element independently +1 or −1 with probability 1/2.

    Drawn only from ``generator`` (never the global RNG), on ``generator.device``, float32; move it
    with ``.to(tensor)``. A CPU generator therefore gives the same masks on every device. Masks are
    per element, so every sample (and, as in the official code, every channel) gets its own.

    Args:
        shape: mask shape, normally that of the noise, (B, C, H, W).
        generator: seeded ``torch.Generator``.

    >>> detail_destruction_mask((2, 3), torch.Generator().manual_seed(0)).abs().unique()
    tensor([1.])
    """
    bits = torch.randint(
        0, 2, tuple(shape), generator=generator, device=generator.device, dtype=torch.float32
    )
    return bits * 2 - 1


def phase_scramble(noise: Tensor, generator: torch.Generator) -> Tensor:
    """Randomise the Fourier phases of each (H, W) image, keeping its amplitude spectrum.

    The phases are those of a white Gaussian field drawn from ``generator`` (a valid Hermitian
    phase field, so the result is real). Image structure (edges, organs) is scrambled into texture
    while the noise power spectrum, and so the spatial correlation of CT noise, is kept exactly.

    Args:
        noise: (B, C, H, W).
        generator: seeded ``torch.Generator``; its device is where the phases are drawn.

    Returns:
        (B, C, H, W), same dtype and device, same amplitude spectrum per image.

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


def local_amplitude(noise: Tensor, sigma_px: float = ENVELOPE_SIGMA_PX) -> Tensor:
    """Local RMS of ``noise``: the square root of its square blurred by a Gaussian of ``sigma_px`` pixels.

    Args:
        noise: (B, C, H, W).
        sigma_px: Gaussian σ, pixels (borders replicate).

    Returns:
        (B, C, H, W) float32, > 0 (at least 1/30 of each crop's RMS, so that dividing by it is safe).
    """
    kernel = gaussian_1d(torch.tensor(float(sigma_px)), truncated=4.0)
    power = separable_filtering(noise.float().square(), kernel, mode="replicate")
    floor = 1e-3 * power.mean(dim=(-2, -1), keepdim=True) + torch.finfo(torch.float32).tiny
    return torch.maximum(power, floor).sqrt()


def envelope_scramble(noise: Tensor, generator: torch.Generator) -> Tensor:
    """Phase-scramble the noise divided by its local amplitude, then multiply the amplitude back.

    CT noise is not stationary: within a 128² crop its local std varies about threefold (streaks
    from bone, more noise behind dense anatomy). `phase_scramble` alone keeps the crop's noise power
    spectrum but spreads the noise evenly over the crop; this keeps the spectrum of the normalised
    noise and the local amplitude (`local_amplitude`, a smooth map), while image structure is
    scrambled as by `phase_scramble`. On stationary noise it is `phase_scramble` up to the small
    fluctuations of the estimated amplitude.

    Args:
        noise: (B, C, H, W).
        generator: seeded ``torch.Generator`` (see `phase_scramble`).

    Returns:
        (B, C, H, W), same dtype and device.

    >>> noise = torch.randn(1, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    >>> noise[..., :64] *= 4  # the left half is 4 times noisier
    >>> generator = torch.Generator().manual_seed(1)
    >>> [round(float(out[..., :48].std() / out[..., 80:].std()))
    ...  for out in (envelope_scramble(noise, generator), phase_scramble(noise, generator))]
    [4, 1]
    """
    amplitude = local_amplitude(noise)
    return (amplitude * phase_scramble(noise.float() / amplitude, generator)).to(noise.dtype)


def split_scramble(noise: Tensor, generator: torch.Generator, cutoff: float = SPLIT_CUTOFF) -> Tensor:
    """Phase-scramble the noise below ``cutoff`` cycles/pixel; flip the rest, whole, at random.

    The residual's low frequencies carry what F changed in the image (contrast, organ outlines);
    its high frequencies are mostly noise, with its real texture: streaks, their direction, where
    the noise is strong. Each sample's high-frequency part is kept as it is up to a random flip of
    each axis and a random sign.

    Args:
        noise: (B, C, H, W).
        generator: seeded ``torch.Generator``.

    Returns:
        (B, C, H, W), same dtype and device.
    """
    height, width = noise.shape[-2:]
    coarse = rfft2_radial_frequency(height, width, noise.device) < cutoff
    low = torch.fft.irfft2(torch.fft.rfft2(noise.float()) * coarse, s=(height, width))
    high = noise.float() - low
    draws = torch.randint(0, 8, (len(noise), 1, 1, 1), generator=generator, device=generator.device)
    flip_width, flip_height, keep_sign = ((draws.to(noise.device) >> bit) & 1 == 1 for bit in range(3))
    high = torch.where(flip_width, high.flip(-1), high)
    high = torch.where(flip_height, high.flip(-2), high)
    high = torch.where(keep_sign, high, -high)
    return (phase_scramble(low, generator) + high).to(noise.dtype)


def destroy_details(noise: Tensor, options: Noise2GradOptions, generator: torch.Generator) -> Tensor:
    """Detail destruction of the extracted noise, (B, C, H, W) → same, as ``options`` selects."""
    if not options.detail_destruction:
        return noise
    if options.destruction == "phase":
        return phase_scramble(noise, generator)
    if options.destruction == "envelope":
        return envelope_scramble(noise, generator)
    if options.destruction == "split":
        return split_scramble(noise, generator)
    return noise * detail_destruction_mask(noise.shape, generator).to(noise)


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


def random_noise_gain(batch: int, max_gain: float, generator: torch.Generator) -> Tensor:
    """(batch, 1, 1, 1) gains drawn log-uniformly from [1/max_gain, max_gain] (all 1 when max_gain is 1).

    >>> gains = random_noise_gain(1000, 2.0, torch.Generator().manual_seed(0))
    >>> bool(gains.min() >= 0.5 and gains.max() <= 2.0)
    True
    """
    uniform = torch.rand((batch, 1, 1, 1), generator=generator, device=generator.device)
    return torch.exp((2 * uniform - 1) * math.log(max_gain))


@torch.no_grad()
def fit_noise_scale_(noise_approximator: nn.Conv2d, n_hat: Tensor, x: Tensor, momentum: float) -> Tensor:
    """Move G towards the least-squares scale of ``∇n_hat`` against ``∇x``; returns the fitted scale.

    ``a_c = <∇n_hat_c, ∇x_c> / <∇n_hat_c, ∇n_hat_c>`` per channel over the batch (summed over all
    processes under ``torch.distributed``, so every rank fits the same scale). G becomes diagonal:
    ``weight ← (1 − momentum)·weight + momentum·diag(a)``, bias 0 (the gradient loss is blind to it).

    Args:
        noise_approximator: G, a ``channels → channels`` 1×1 convolution; updated in place.
        n_hat: removed noise ``x − F(x)``, (B, C, H, W).
        x: noisy input, (B, C, H, W).
        momentum: weight of this fit, in (0, 1].

    Returns:
        (C,) the scale fitted on this batch.
    """
    grad_n, grad_x = image_gradient(n_hat.float()), image_gradient(x.float())
    sums = torch.stack([(grad_n * grad_x).sum(dim=(0, 2, 3)), (grad_n * grad_n).sum(dim=(0, 2, 3))])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    scale = sums[0] / sums[1].clamp_min(torch.finfo(torch.float32).tiny)
    weight = noise_approximator.weight
    target = torch.diag(scale).to(weight).view_as(weight)
    weight.mul_(1 - momentum).add_(momentum * target)
    noise_approximator.bias.zero_()
    return scale


def noise2grad_step(
    denoiser: nn.Module,
    noise_approximator: nn.Module,
    x: Tensor,
    y: Tensor,
    step: int,
    options: Noise2GradOptions,
    generator: torch.Generator,
    total_steps: int | None = None,
    extractor: nn.Module | None = None,
    noise_power: Tensor | None = None,
    clean_power: Tensor | None = None,
) -> StepResult:
    """Noise2Grad losses for one batch (see the module docstring); does not step any optimiser.

    Args:
        denoiser: noise-removal module F, image → clean image.
        noise_approximator: noise-approximation module G.
        x: noisy crops in [0, 1], (B, C, H, W).
        y: unrelated clean crops in [0, 1], same shape.
        step: global optimiser step, from 1 (drives the update delay).
        options: ablation switches and the update-delay period.
        generator: source of the detail-destruction masks (unused when detail destruction is off).
        total_steps: the run's length, for ``options.period_fraction`` (ignored without it).
        extractor: the module whose output gives ``n_hat = x − extractor(x)``; ``None``: F itself.
            The caller applies ``options.freeze_extractor`` by passing its frozen copy of F here.
        noise_power: (B, bands) the noise power spectrum of each noisy crop's slice (``measured``
            noise scale only; see `MeasuredNoiseSpectrum`).
        clean_power: (B, bands) the own noise power spectrum of each clean crop's slice
            (``measured`` only; see `own_noise_correction`).

    Returns:
        `StepResult`; ``grad_loss`` is ``None`` on steps without the gradient loss. G receives a
        gradient only from the gradient loss, since the synthetic image uses ``n_tilde.detach()``.
    """
    if x.ndim != 4 or x.shape != y.shape:
        raise ValueError(
            "x (noisy) and y (clean) must both be (B, C, H, W) of one shape, "
            f"got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if options.period_fraction is not None and total_steps is None:
        raise ValueError("options.period_fraction needs the run's total_steps")
    measured = options.noise_scale == "measured"
    if measured and (noise_power is None or clean_power is None or len(noise_power) != len(x)
                     or len(clean_power) != len(y)):
        raise ValueError("the measured noise scale needs noise_power and clean_power, (B, bands) per crop")
    period = options.period if total_steps is None else options.period_for(total_steps)
    apply_gradient_loss = uses_gradient_loss(step, period, options.update_delay)

    # The graph through F is needed only where the gradient loss trains F; through G, only where
    # the optimiser learns G. Otherwise the branch feeds the detached synthetic noise alone.
    train_denoiser = (apply_gradient_loss and options.grad_into_denoiser and extractor is None
                      and torch.is_grad_enabled())
    learn_scale = apply_gradient_loss and options.noise_scale == "learned" and torch.is_grad_enabled()
    source = x[: math.ceil(len(x) / options.noise_reuse)]  # the crops whose noise is extracted
    with torch.set_grad_enabled(train_denoiser):
        n_hat = source - (denoiser if extractor is None else extractor)(source)
    if apply_gradient_loss and options.noise_scale in ("fitted", "spectral") and torch.is_grad_enabled():
        if options.noise_scale == "spectral":
            noise_approximator.fit_(n_hat.detach(), source, options.scale_momentum)
        else:
            fit_noise_scale_(noise_approximator, n_hat.detach(), source, options.scale_momentum)
    if measured:
        synthetic_power, correction = own_noise_correction(noise_power, clean_power)
        if options.self_pairs:
            counts = torch.bincount(SpectralNoiseGain.band_index(*x.shape[-2:], x.device).flatten().clamp_min(0),
                                    minlength=SpectralNoiseGain.BANDS)
            own = self_paired(noise_power, synthetic_power, counts)
            synthetic_power = torch.where(own[:, None], noise_power, synthetic_power)
            correction = torch.where(own[:, None], torch.ones_like(correction), correction)
            y = torch.where(own[:, None, None, None], x, y)
    with torch.set_grad_enabled(train_denoiser or learn_scale):
        if measured:
            n_tilde = noise_approximator(n_hat, synthetic_power[: len(source)])
        else:
            n_tilde = noise_approximator(n_hat)
    noise = n_tilde.detach().repeat_interleave(options.noise_reuse, dim=0)[: len(y)]
    noise = destroy_details(noise, options, generator)
    gains = torch.ones(len(noise), 1, 1, 1).to(noise)
    if options.noise_gain > 1:
        gains = random_noise_gain(len(noise), options.noise_gain, generator).to(noise)
        noise = noise * gains
    x_s = (y + noise).clamp(0, 1)
    x_s_denoised = denoiser(x_s)
    target = y - band_filter(noise, correction / gains.flatten()[:, None] ** 2) if measured else y

    loss_denoise = denoise_loss(x_s_denoised, target)
    loss_grad = gradient_loss(n_tilde, source) if apply_gradient_loss else None
    trains = loss_grad is not None and loss_grad.requires_grad
    return StepResult(
        loss=loss_denoise + loss_grad if trains else loss_denoise,
        denoise_loss=loss_denoise.detach(),
        grad_loss=None if loss_grad is None else loss_grad.detach(),
        images={
            "n_hat": n_hat.detach(),
            "n_tilde": n_tilde.detach(),
            "x_s": x_s,
            "x_s_denoised": x_s_denoised.detach(),
        },
    )


def _paired_step(denoiser: nn.Module, x: Tensor, target: Tensor) -> StepResult:
    prediction = denoiser(x)
    loss = denoise_loss(prediction, target)
    return StepResult(loss=loss, denoise_loss=loss.detach(), images={"prediction": prediction.detach()})


def supervised_step(denoiser: nn.Module, x: Tensor, y: Tensor) -> StepResult:
    """Supervised baseline: ``MSE(F(x), y)`` for paired noisy ``x`` and clean ``y``, (B, C, H, W)."""
    return _paired_step(denoiser, x, y)


def noise2noise_step(denoiser: nn.Module, x1: Tensor, x2: Tensor) -> StepResult:
    """Noise2Noise baseline (Lehtinen et al., ICML 2018): ``MSE(F(x1), x2)``.

    ``x1`` and ``x2`` are two independent noisy realisations of the same image, (B, C, H, W).
    """
    return _paired_step(denoiser, x1, x2)
