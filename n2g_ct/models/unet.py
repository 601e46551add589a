"""Noise-removal module F of Noise2Grad: the official code's 2-D U-Net, for any input size."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """(3×3 conv, padding 1 → ReLU) × 2, no normalisation (official `double_conv`)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net that maps a noisy image to the clean image (no global residual).

    Architecture of the official Noise2Grad ``denoisenet`` (Lin et al., IJCAI 2021): ``depth``
    max-pool downsamplings, a double 3×3 conv + ReLU per level, widths ``base_width·2**level``
    except the deepest level, which keeps the width of the level above (32-64-128-128 at the
    defaults), bilinear ×2 upsampling (``align_corners=True``) concatenated after the skip, then a
    double conv whose width is that of the next skip, and a 3×3 conv head to ``out_channels``.
    No normalisation layers. About 0.84 M parameters at the defaults.

    Any spatial size is accepted: the input is padded (replicate) to a multiple of ``2**depth``,
    split evenly between both sides, and the output is cropped back, so the output has the input's
    shape. Weights start at PyTorch's default init; `n2g_ct.models.build_denoiser` applies the
    official one.

    Args:
        in_channels: image channels (1 for CT, 3 for RGB).
        out_channels: output channels; ``None`` means ``in_channels``.
        base_width: feature channels at full resolution.
        depth: number of 2× downsamplings.
        residual: output ``input + U-Net(input)`` (a global residual, not in the official
            network); needs ``out_channels == in_channels``.
        local_mean_px: residual only: σ, pixels, of a Gaussian whose local average is taken out of
            the residual, ``input + r − G_σ * r``: F changes detail only and cannot shift the local
            mean of the image at scales beyond ~2σ (no CT-number shift, no flattening of large
            structures; the noise there is a small share of CT noise). 0: the plain residual.

    Shapes:
        input (B, in_channels, H, W) → output (B, out_channels, H, W), same units as the input.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        base_width: int = 32,
        depth: int = 3,
        residual: bool = False,
        local_mean_px: float = 0.0,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        if residual and out_channels != in_channels:
            raise ValueError(f"a residual UNet needs out_channels == in_channels, got {out_channels} and {in_channels}")
        if not local_mean_px >= 0:
            raise ValueError(f"UNet local_mean_px must be >= 0, got {local_mean_px!r}")
        self.residual = residual
        self.low_precision: torch.dtype | None = None
        """Inference only (``n2g_ct.inference.precision``): the dtype of levels 1 and deeper; None: one dtype."""
        self.local_mean_px = float(local_mean_px) if residual else 0.0
        radius = max(1, round(3 * self.local_mean_px))
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (offsets / max(self.local_mean_px, 1e-6)) ** 2)
        self.register_buffer("_local_mean_kernel", (kernel / kernel.sum()).view(1, 1, 1, -1), persistent=False)
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("base_width", base_width),
            ("depth", depth),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"UNet {name} must be an integer >= 1, got {value!r}")
        self.depth = depth
        widths = [base_width * 2 ** min(level, depth - 1) for level in range(depth + 1)]

        self.encoder = nn.ModuleList(
            [_double_conv(in_channels, widths[0])]
            + [_double_conv(widths[level - 1], widths[level]) for level in range(1, depth + 1)]
        )
        # Deepest first; each block outputs the width of the skip it meets next.
        decoder = []
        width = widths[depth]
        for level in reversed(range(depth)):
            out_width = widths[max(level - 1, 0)]
            decoder.append(_double_conv(width + widths[level], out_width))
            width = out_width
        self.decoder = nn.ModuleList(decoder)
        self.head = nn.Conv2d(width, out_channels, kernel_size=3, padding=1)

    def forward(self, image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        multiple = 2**self.depth
        pad_h, pad_w = -height % multiple, -width % multiple
        top, left = pad_h // 2, pad_w // 2
        features = image
        if pad_h or pad_w:
            features = F.pad(image, (left, pad_w - left, top, pad_h - top), mode="replicate")

        skips = []
        for level, block in enumerate(self.encoder):
            if level:
                features = F.max_pool2d(features, 2)
            with self._precision(level, image.device.type):
                features = block(features)
            skips.append(features)
        skips.pop()  # the deepest features are the decoder's input, not a skip
        for level, block in zip(reversed(range(self.depth)), self.decoder):
            features = F.interpolate(features, scale_factor=2, mode="bilinear", align_corners=True)
            skip = skips.pop()
            with self._precision(level, image.device.type):
                features = block(torch.cat([skip, features.to(skip.dtype)], dim=1))
        with self._precision(0, image.device.type):
            output = self.head(features)[..., top : top + height, left : left + width].to(image.dtype)
        if not self.residual:
            return output
        with torch.autocast(image.device.type, enabled=False):  # the residual stage at the input's precision
            if self.local_mean_px:
                output = output - self._local_mean(output)
            return image + output

    def _precision(self, level: int, device_type: str) -> AbstractContextManager:
        """Inference with :attr:`low_precision`: levels 1 and deeper under autocast to it, the
        full-resolution level (first and last blocks, head) at the input's precision."""
        if self.low_precision is None:
            return nullcontext()
        return torch.autocast(device_type, dtype=self.low_precision, enabled=level > 0)

    def _local_mean(self, image: Tensor) -> Tensor:
        """Each channel blurred by the Gaussian of ``local_mean_px`` (separable, borders replicated: any image size)."""
        kernel = self._local_mean_kernel.to(image.dtype)
        radius = kernel.shape[-1] // 2
        flat = image.reshape(-1, 1, *image.shape[-2:])
        blurred = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel)
        blurred = F.conv2d(F.pad(blurred, (0, 0, radius, radius), mode="replicate"), kernel.transpose(-1, -2))
        return blurred.reshape(image.shape)
