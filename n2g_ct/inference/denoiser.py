"""Apply a trained denoiser F to CT slices in HU, a batch of slices at a time (no file IO).

The network sees each slice mapped to [0, 1] by the checkpoint's HU window (`HUWindow.to_unit`), and
its output maps back to HU by the inverse (`HUWindow.to_hu`).
Only one batch of slices is on the device at any time, so a series of any length fits; the U-Net
takes any in-plane size. The precision (float32, or bfloat16/float16 where the device computes them
fast) is chosen by :mod:`n2g_ct.inference.precision`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from n2g_ct.devices import Processes, select_device
from n2g_ct.errors import InputError, N2GError
from n2g_ct.inference.precision import autocast, prepare_network, resolve_precision
from n2g_ct.io.hu_window import HUWindow
from n2g_ct.models.checkpoint import Checkpoint

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = {"cpu": 1, "cuda": 8}
"""Slices per forward pass when none is given. On CPU one 512² slice at a time is the fastest per
slice (measured on 2 cores: 0.47 s/slice at 1, 0.63 at 4, 1.05 at 8; larger batches leave the cache)."""


@dataclass
class Denoiser:
    """The denoiser F of a checkpoint on its device, with the HU window it was trained on.

    Attributes:
        network: F, in eval mode, on ``device``; maps (B, 1, H, W) in [0, 1] to the same shape.
        window: the HU window mapped to [0, 1] for the network.
        method: training method recorded in the checkpoint (e.g. ``noise2grad``).
        device: where the forward pass runs.
        precision: ``fp32``, ``bf16`` or ``fp16`` (:mod:`n2g_ct.inference.precision`; the network is
            prepared for it by :func:`denoiser_from_checkpoint`).
        note: the instructions the precision runs on, for logs and reports.
    """

    network: nn.Module
    window: HUWindow
    method: str
    device: torch.device
    precision: str = "fp32"
    note: str = ""

    @torch.inference_mode()
    def __call__(self, hu: np.ndarray) -> np.ndarray:
        """Denoise one batch of slices: (n, y, x) HU → (n, y, x) float32 HU, on the device at once.

        Raises:
            N2GError: the network produced NaN or Inf (e.g. a float16 overflow; retry with --precision fp32).
        """
        batch = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32)).to(self.device, non_blocking=True)
        batch = self.window.to_unit(batch[:, None])
        with autocast(self.precision, self.device):
            out = self.network(batch)
        out = self.window.to_hu(out[:, 0].float())
        if not torch.isfinite(out).all():
            raise N2GError(
                f"the network produced NaN/Inf values (precision {self.precision})"
                + ("; run again with --precision fp32" if self.precision != "fp32" else "")
            )
        return out.cpu().numpy()


@torch.inference_mode()
def denoise_image(network: nn.Module, image: np.ndarray, device: torch.device) -> torch.Tensor:
    """F applied to one (C, H, W) image in [0, 1] (natural images): (1, C, H, W) float32 on the CPU, clipped to [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(image))[None].to(device)
    return network(x).float().clamp(0.0, 1.0).cpu()


def denoiser_from_checkpoint(checkpoint: Checkpoint, *, device: str = "auto", precision: str = "auto",
                             processes: Processes = Processes()) -> Denoiser:
    """F of a checkpoint (:func:`n2g_ct.models.checkpoint.read_checkpoint`) on ``device``.

    Args:
        checkpoint: the loaded checkpoint.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (:mod:`n2g_ct.inference.precision`).
        processes: this process's place under ``torchrun`` (``auto``/``cuda``: the GPU of its local rank).

    Raises:
        InputError: the model is not for 1-channel CT, or its weights do not fit its U-Net settings.
        ConfigError: CUDA requested but not available.
    """
    info = checkpoint.info
    if info.unet.channels != 1:
        raise InputError(f"{checkpoint.path}: the model has {info.unet.channels} channels; CT denoising needs a "
                         "1-channel model")
    torch_device = select_device(device, processes)
    precision, note = resolve_precision(precision, torch_device)
    network = prepare_network(checkpoint.network(), precision, torch_device).to(torch_device).eval()
    return Denoiser(network, info.window, info.method, torch_device, precision, note)


def denoise_volume(
    denoiser: Denoiser,
    hu: np.ndarray,
    *,
    batch_size: int = 1,
    keep: np.ndarray | None = None,
    out: np.ndarray | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Denoise a stack of slices, ``batch_size`` slices per forward pass.

    Args:
        denoiser: see :func:`denoiser_from_checkpoint`.
        hu: (z, y, x) HU, any number of slices and any in-plane size.
        batch_size: slices on the device at once.
        keep: bool (z, y, x), True where the input is returned unchanged (CT padding outside the
            field of view stays padding).
        out: float32 (z, y, x) array to fill; may be ``hu`` itself (denoised in place).
        on_batch: called with the number of slices after each batch (progress).

    Returns:
        float32 (z, y, x) denoised HU (``out`` when given).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    out = np.empty(hu.shape, np.float32) if out is None else out
    for start in range(0, len(hu), batch_size):
        stop = min(start + batch_size, len(hu))
        denoised = denoiser(hu[start:stop])
        if keep is not None:
            np.copyto(denoised, hu[start:stop], where=keep[start:stop])
        out[start:stop] = denoised
        if on_batch is not None:
            on_batch(stop - start)
    return out
