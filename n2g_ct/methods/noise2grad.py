"""Noise2Grad (Lin et al., "Noise2Grad: Extract Image Noise to Denoise", IJCAI 2021).

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
  band by band, the noise power spectrum measured beforehand on the crop's own slice, less the
  clean slice's own noise, and the target is corrected so that F learns to remove all the noise
  (`MeasuredNoiseSpectrum`); a sample whose clean crop is noisier than its noisy crop trains on the
  noisy crop itself (``self_pairs``). F is a residual U-Net. ``L_grad`` is only reported.
- ``robust``: ``default`` plus a random gain in [1/3, 3] on each sample's synthetic noise
  (``noise_gain``), so F also learns noise levels beyond the pool's (slices noisier than the pool).

BENCHMARKS.md measures each variant on the chest benchmarks and on in-house pools, and the study
options that no variant adopted (their code is in the commit it names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
from torch import Tensor, nn

from n2g_ct.methods.base import StepResult, TrainingMethod
from n2g_ct.methods.destruction import DESTRUCTIONS, keep
from n2g_ct.methods.losses import denoise_loss, gradient_loss
from n2g_ct.methods.noise_scale import build_noise_scale
from n2g_ct.models.checkpoint import load_weights

NOISE_SCALES = ("learned", "spectral", "measured")
DEFAULT_PERIOD = 500
"""The paper's update-delay period, optimiser steps."""

VARIANTS: dict[str, dict[str, object]] = {
    "faithful": {"destruction": "sign", "grad_into_denoiser": True, "noise_scale": "learned",
                 "noise_gain": 1.0, "self_pairs": False},
    "default": {"destruction": "phase", "grad_into_denoiser": False, "noise_scale": "measured",
                "noise_gain": 1.0, "self_pairs": True},
    "robust": {"destruction": "phase", "grad_into_denoiser": False, "noise_scale": "measured",
               "noise_gain": 3.0, "self_pairs": True},
}
"""The choices each variant makes for the options left unset (see `Noise2GradOptions`)."""

_STUDY = "a study option no variant adopted; BENCHMARKS.md keeps its measurements and names the commit with its code"


@dataclass(frozen=True)
class Noise2GradOptions:
    """Switches of Noise2Grad (``method.noise2grad``).

    ``variant`` picks the method (module docstring). Options left unset (``None``) take the
    variant's value (`VARIANTS`); set ones override it.

    Attributes:
        variant: ``default``, ``faithful`` or ``robust``.
        period: update-delay period: optimiser steps (an integer; paper: 500), or a share of the
            run's steps written ``"10%"``, so that the delay schedule scales with the budget as the
            learning-rate schedule does; ``τ = ⌊t/period⌋ + 1``.
        detail_destruction: scramble the extracted noise before adding it to the clean image;
            ``false`` is the paper's N2G_D ablation (``m ≡ 1``).
        update_delay: apply the gradient loss only on steps with ``t mod τ == 0``; ``false`` is the
            N2G_U ablation (``τ ≡ 1``, every step).
        destruction: ``sign`` (paper) flips the sign of each pixel, which whitens spatially
            correlated noise; ``phase`` randomises the Fourier phases of each crop, which destroys
            image structure but keeps the noise power spectrum.
        grad_into_denoiser: the gradient loss also trains F through ``n_hat`` (paper).
        noise_scale: G: ``learned`` (paper, a 1×1 conv trained on the gradient loss), ``spectral``
            (a gain per frequency band fitted to the removed image) or ``measured`` (the noise
            spectrum measured on each crop's slice; CT only). See :mod:`n2g_ct.methods.noise_scale`.
        noise_gain: ``r`` ≥ 1: each sample's synthetic noise is multiplied by a gain drawn
            log-uniformly from [1/r, r], so F learns to remove noise of any level in that range.
            The mean noise power grows by ``E[g²] = (r² − r⁻²) / (4 ln r)``: 1.35 at 2, 2.02 at 3.
        self_pairs: ``measured`` scale only: a sample whose clean crop is too noisy to carry the
            noisy crop's noise is trained on the noisy crop itself, with recorrupted pairs.
    """

    variant: str = "default"
    period: int | str | None = None
    detail_destruction: bool = True
    update_delay: bool = True
    destruction: str | None = None
    grad_into_denoiser: bool | None = None
    noise_scale: str | None = None
    noise_gain: float | None = None
    self_pairs: bool | None = None
    from_variant: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)
    """The options that took the variant's value (left unset)."""

    REMOVED: ClassVar[dict[str, tuple[str, tuple[object, ...]]]] = {
        "period_fraction": ("write the share into period instead, e.g. period: 10%", (None,)),
        "freeze_extractor": (_STUDY, (None, 1, 1.0)), "noise_reuse": (_STUDY, (1,)),
        "scale_momentum": (_STUDY, (0.1,)), "extend_low": (_STUDY, (True,)),
    }
    """Keys of earlier releases: what replaces each, and the values that meant "off" (accepted, so
    that a run's saved ``config.yaml`` still loads)."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        unset = frozenset(name for name in VARIANTS[self.variant] if getattr(self, name) is None)
        for name in unset:
            object.__setattr__(self, name, VARIANTS[self.variant][name])
        object.__setattr__(self, "from_variant", unset)
        self.period_for(1)  # validates the period
        for name in ("detail_destruction", "update_delay", "grad_into_denoiser", "self_pairs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, allowed in (("destruction", tuple(DESTRUCTIONS)), ("noise_scale", NOISE_SCALES)):
            if getattr(self, name) not in allowed:
                hint = (f" ({_STUDY})" if getattr(self, name) in ("envelope", "split", "fitted") else "")
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}{hint}")
        if not self.noise_gain >= 1.0:
            raise ValueError(f"noise_gain must be >= 1, got {self.noise_gain!r}")
        if self.noise_scale != "measured" and self.self_pairs:
            if "self_pairs" in unset:
                object.__setattr__(self, "self_pairs", False)
            else:
                raise ValueError("self_pairs applies to the measured noise scale only")
        if not self.detail_destruction and "destruction" not in unset:
            raise ValueError("destruction means nothing with detail_destruction: false; set one or the other")
        if not self.update_delay and self.period is not None:
            raise ValueError("period means nothing with update_delay: false; set one or the other")

    def for_images(self) -> Noise2GradOptions:
        """These options for natural images: a ``measured`` noise scale the variant chose becomes
        ``spectral`` (natural images have no soft tissue to measure the noise in); an explicit one stays."""
        if self.noise_scale == "measured" and "noise_scale" in self.from_variant:
            given = {f.name: getattr(self, f.name) for f in fields(self) if f.init and f.name not in self.from_variant}
            return Noise2GradOptions(**{**given, "noise_scale": "spectral"})  # the rest from the variant again
        return self

    def period_for(self, total_steps: int) -> int:
        """The update-delay period, optimiser steps, of a run of ``total_steps`` steps.

        >>> Noise2GradOptions(period="10%").period_for(2000), Noise2GradOptions().period_for(2000)
        (200, 500)
        """
        if self.period is None:
            return DEFAULT_PERIOD
        if isinstance(self.period, int) and not isinstance(self.period, bool) and self.period >= 1:
            return self.period
        text = str(self.period).strip()
        share = float(text[:-1]) if text.endswith("%") and _is_number(text[:-1]) else math.nan
        if not 0.0 < share <= 100.0:
            raise ValueError(f"period must be a number of steps >= 1 or a share of the run such as 10%, "
                             f"got {self.period!r}")
        return max(1, round(share / 100.0 * total_steps))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _require_positive_int(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")


def update_delay(step: int, period: int = DEFAULT_PERIOD) -> int:
    """Update delay ``τ = ⌊step/period⌋ + 1``; ``step`` is the global optimiser step, from 1.

    >>> [update_delay(t) for t in (1, 499, 500, 999, 1000)]
    [1, 1, 2, 2, 3]
    """
    _require_positive_int(step, "step (global optimiser step, from 1)")
    _require_positive_int(period, "period (optimiser steps)")
    return step // period + 1


def uses_gradient_loss(step: int, period: int = DEFAULT_PERIOD, delay_enabled: bool = True) -> bool:
    """Whether the gradient loss is applied at ``step``: ``step mod τ == 0`` (``τ ≡ 1`` without delay)."""
    tau = update_delay(step, period)  # validates step and period in both modes
    return not delay_enabled or step % tau == 0


def random_noise_gain(batch: int, max_gain: float, generator: torch.Generator) -> Tensor:
    """(batch, 1, 1, 1) gains drawn log-uniformly from [1/max_gain, max_gain].

    >>> gains = random_noise_gain(1000, 2.0, torch.Generator().manual_seed(0))
    >>> bool(gains.min() >= 0.5 and gains.max() <= 2.0)
    True
    """
    uniform = torch.rand((batch, 1, 1, 1), generator=generator, device=generator.device)
    return torch.exp((2 * uniform - 1) * math.log(max_gain))


def _noisy_and_clean(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    x, y = batch["noisy"], batch["clean"]
    if x.ndim != 4 or x.shape != y.shape:
        raise ValueError(f"noisy and clean crops must both be (B, C, H, W) of one shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    return x, y


def _result(loss_denoise: Tensor, loss_grad: Tensor | None, **images: Tensor) -> StepResult:
    """The step's result: the gradient loss counts in the loss only where it trains something."""
    counts = loss_grad is not None and loss_grad.requires_grad
    return StepResult(loss=loss_denoise + loss_grad if counts else loss_denoise, denoise_loss=loss_denoise.detach(),
                      grad_loss=None if loss_grad is None else loss_grad.detach(),
                      images={name: image.detach() for name, image in images.items()})


class Noise2Grad(TrainingMethod):
    """Noise2Grad as a `TrainingMethod`: F, G (`noise_scale`) and the options, resolved once.

    Batches hold ``noisy`` and ``clean`` crops (B, C, H, W) in [0, 1]; with the measured noise scale
    also ``noise_power`` and ``clean_power`` (B, bands).
    """

    def __init__(self, denoiser: nn.Module, options: Noise2GradOptions, channels: int = 1) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.noise_scale = build_noise_scale(options.noise_scale, channels, options.self_pairs)
        self.options = options
        self.destroy = DESTRUCTIONS[options.destruction] if options.detail_destruction else keep
        self.period = options.period_for(1)

    def start(self, total_steps: int) -> None:
        self.period = self.options.period_for(total_steps)

    def forward(self, batch: dict[str, Tensor], step: int, generator: torch.Generator) -> StepResult:
        x, y = _noisy_and_clean(batch)
        grad_step = uses_gradient_loss(step, self.period, self.options.update_delay)
        trains = torch.is_grad_enabled()
        into_f = trains and grad_step and self.options.grad_into_denoiser
        with torch.set_grad_enabled(into_f):
            n_hat = x - self.denoiser(x)                                    # removed noise
        pairs = self.noise_scale.pairs(batch, y)
        with torch.set_grad_enabled(into_f or (trains and grad_step and self.noise_scale.learned)):
            n_tilde = self.noise_scale(n_hat, x, pairs, fit=trains and grad_step)  # extracted noise
        noise, gains = self._scramble(n_tilde.detach(), generator)          # detail destruction
        x_s = (pairs.clean + noise).clamp(0, 1)                              # synthetic noisy image
        x_s_denoised = self.denoiser(x_s)
        loss_denoise = denoise_loss(x_s_denoised, pairs.target(noise, gains))
        loss_grad = gradient_loss(n_tilde, x) if grad_step else None
        return _result(loss_denoise, loss_grad, n_hat=n_hat, n_tilde=n_tilde, x_s=x_s, x_s_denoised=x_s_denoised)

    def _scramble(self, n_tilde: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Detail destruction, then each sample's noise gain: (noise (B, C, H, W), gains (B, 1, 1, 1))."""
        noise = self.destroy(n_tilde, generator)
        if self.options.noise_gain == 1:
            return noise, torch.ones(len(noise), 1, 1, 1).to(noise)
        gains = random_noise_gain(len(noise), self.options.noise_gain, generator).to(noise)
        return noise * gains, gains

    def before_optimizer_step(self, result: StepResult) -> None:
        if result.grad_loss is None:
            # G learns only from the gradient loss; DDP fills unused gradients with zeros, which
            # Adam's momentum would still turn into an update. Keep G untouched, as in one process.
            for parameter in self.noise_scale.parameters():
                parameter.grad = None

    def log_values(self, result: StepResult) -> dict[str, float | str]:
        return {"g_weight": self.noise_scale.logged_weight(),
                "noise_std": float(result.images["n_tilde"].float().std())}

    def auxiliary_state(self) -> dict[str, Tensor]:
        return self.noise_scale.state_dict()

    def load_auxiliary_state(self, state: dict[str, Tensor] | None, source: str) -> None:
        load_weights(self.noise_scale, state, f"{source} (G)")
