"""One training step of Noise2Grad (Lin et al., "Noise2Grad: Extract Image Noise to Denoise", IJCAI 2021).

With ``x`` noisy crops and ``y`` unrelated clean crops (both in [0, 1], (B, C, H, W)):

1. ``n_hat = x − F(x)``; ``n_tilde = G(n_hat)``
2. ``x_s = clamp(y + n_tilde.detach() ⊙ m, 0, 1)`` with ``m`` = ±1 per element (detail destruction)
3. ``L_denoise = MSE(F(x_s), y)`` every step; ``L_grad = MSE(∇n_tilde, ∇x)`` on steps ``t`` with
   ``t mod τ == 0``, ``τ = ⌊t/period⌋ + 1`` (update delay); ``loss = L_denoise + L_grad``.

The step only computes losses; the caller owns the optimiser, the step counter and logging. It
keeps the input dtype and works inside ``torch.autocast``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from n2g_ct.losses import denoise_loss, gradient_loss


@dataclass(frozen=True)
class Noise2GradOptions:
    """Switches of the Noise2Grad step; the defaults are the paper's method.

    Attributes:
        period: update-delay period, in optimiser steps (paper: 500); ``τ = ⌊t/period⌋ + 1``.
            Scale it with the run length for short runs.
        detail_destruction: multiply the extracted noise by a random ±1 mask before adding it to
            the clean image; ``False`` is the N2G_D ablation (``m ≡ 1``).
        update_delay: apply the gradient loss only on steps with ``t mod τ == 0``; ``False`` is the
            N2G_U ablation (``τ ≡ 1``, every step).
    """

    period: int = 500
    detail_destruction: bool = True
    update_delay: bool = True

    def __post_init__(self) -> None:
        _require_positive_int(self.period, "Noise2GradOptions.period (optimiser steps)")
        for name in ("detail_destruction", "update_delay"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"Noise2GradOptions.{name} must be true or false, got {value!r}")


@dataclass(frozen=True)
class StepResult:
    """What one training step computed.

    Attributes:
        loss: scalar to call ``backward()`` on.
        denoise_loss: detached scalar tensor (kept on the device: no host sync per step; ``float()``
            it when logging).
        grad_loss: detached scalar tensor, or ``None`` on steps without the gradient loss.
        images: detached (B, C, H, W) tensors by name, for logging and inspection. Noise2Grad:
            ``n_hat``, ``n_tilde``, ``x_s`` (synthetic noisy image), ``x_s_denoised``; baselines:
            ``prediction``.
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


def noise2grad_step(
    denoiser: nn.Module,
    noise_approximator: nn.Module,
    x: Tensor,
    y: Tensor,
    step: int,
    options: Noise2GradOptions,
    generator: torch.Generator,
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

    Returns:
        `StepResult`; ``grad_loss`` is ``None`` on steps without the gradient loss. G receives a
        gradient only from the gradient loss, since the synthetic image uses ``n_tilde.detach()``.
    """
    if x.ndim != 4 or x.shape != y.shape:
        raise ValueError(
            "x (noisy) and y (clean) must both be (B, C, H, W) of one shape, "
            f"got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    apply_gradient_loss = uses_gradient_loss(step, options.period, options.update_delay)

    # Without the gradient loss this branch feeds only the detached synthetic noise: no graph needed.
    with torch.set_grad_enabled(apply_gradient_loss and torch.is_grad_enabled()):
        n_hat = x - denoiser(x)
        n_tilde = noise_approximator(n_hat)
    noise = n_tilde.detach()
    if options.detail_destruction:
        noise = noise * detail_destruction_mask(noise.shape, generator).to(noise)
    x_s = (y + noise).clamp(0, 1)
    x_s_denoised = denoiser(x_s)

    loss_denoise = denoise_loss(x_s_denoised, y)
    loss_grad = gradient_loss(n_tilde, x) if apply_gradient_loss else None
    return StepResult(
        loss=loss_denoise if loss_grad is None else loss_denoise + loss_grad,
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
