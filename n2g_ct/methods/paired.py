"""Paired baselines: supervised training and Noise2Noise (Lehtinen et al., ICML 2018)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from n2g_ct.methods.base import StepResult, TrainingMethod
from n2g_ct.methods.losses import denoise_loss


class PairedMethod(TrainingMethod):
    """``MSE(F(input), target)`` over batches with keys ``input`` and ``target``, (B, C, H, W).

    Supervised: the target is the clean (reference) image. Noise2Noise: the input and the target
    are two independent noisy realisations of one image.
    """

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, batch: dict[str, Tensor], step: int, generator: torch.Generator) -> StepResult:
        prediction = self.denoiser(batch["input"])
        loss = denoise_loss(prediction, batch["target"])
        return StepResult(loss=loss, denoise_loss=loss.detach(), images={"prediction": prediction.detach()})
