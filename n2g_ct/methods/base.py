"""The interface between the trainer and a training method."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class StepResult:
    """What one training step computed.

    Attributes:
        loss: scalar to call ``backward()`` on.
        denoise_loss: detached scalar tensor (kept on the device: no host sync per step; ``float()``
            it when logging).
        grad_loss: detached scalar tensor, or ``None`` on steps without a gradient loss.
        images: detached (B, C, H, W) tensors by name, for logging and inspection. Noise2Grad:
            ``n_hat``, ``n_tilde``, ``x_s`` (synthetic noisy image), ``x_s_denoised``; paired
            methods: ``prediction``.
    """

    loss: Tensor
    denoise_loss: Tensor
    grad_loss: Tensor | None = None
    images: dict[str, Tensor] = field(default_factory=dict)


class TrainingMethod(nn.Module):
    """A way to train the denoiser F: the modules and state it owns and one step.

    The trainer knows only this interface. It calls the method (``forward``) once per optimiser
    step, so that ``DistributedDataParallel`` sees one forward per step; it owns the optimiser
    (over ``parameters()``), the step counter, checkpoints and logs.

    Attributes:
        denoiser: F, image in [0, 1] → clean image, (B, C, H, W) → same.
    """

    denoiser: nn.Module

    def start(self, total_steps: int) -> None:
        """The run's length in optimiser steps (provisional until a time budget is calibrated)."""

    def forward(self, batch: dict[str, Tensor], step: int, generator: torch.Generator) -> StepResult:
        """Losses of one batch (tensors (B, C, H, W) in [0, 1] by key); ``step`` counts from 1;
        ``generator`` is the step's own random source (exact resume)."""
        raise NotImplementedError

    def before_optimizer_step(self, result: StepResult) -> None:
        """After ``backward()``, before the optimiser steps: adjust gradients if the method must."""

    def log_values(self, result: StepResult) -> dict[str, float | str]:
        """The method's own columns of ``train_log.csv`` for this step."""
        return {}

    def auxiliary_state(self) -> dict[str, Tensor] | None:
        """State besides F to save in checkpoints (``None``: none)."""
        return None

    def load_auxiliary_state(self, state: dict[str, Tensor] | None, source: str) -> None:
        """Restore :meth:`auxiliary_state` from a checkpoint (``source`` names it in errors)."""
