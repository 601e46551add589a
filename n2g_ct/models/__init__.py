"""The denoiser F (U-Net), its checkpoints, and the models that ship with n2g-ct (`NAMED_MODELS`).

Use :func:`build_denoiser`: it applies the official code's initialisation (pix2pix
``init_weights``, type ``normal``, gain 0.02): every conv weight ~ N(0, 0.02²), every bias 0.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from n2g_ct.errors import InputError
from n2g_ct.models.unet import UNet

__all__ = ["NAMED_MODELS", "OFFICIAL_INIT_STD", "STARTER_MODEL", "UNet", "build_denoiser", "official_init_", "resolve_model"]

OFFICIAL_INIT_STD = 0.02
"""Standard deviation of the official N(0, std²) conv-weight initialisation."""

STARTER_MODEL = Path(__file__).parent / "starter_chest_quarter_dose.pt"
"""The shipped starter model (README, "Starter model"): ``n2g-ct denoise``'s default and the demo's starting point."""

NAMED_MODELS: dict[str, tuple[Path, str]] = {
    "starter": (STARTER_MODEL, "Noise2Grad, trained on simulated quarter-dose chest CT (README, 'Starter model'); "
                "a starting point, not a clinical denoiser"),
}
"""Models that ship with n2g-ct: name → (checkpoint, one-line description)."""


def resolve_model(model: str | Path | None) -> Path:
    """The checkpoint of a named model (``starter``) or a path; None is the starter model.

    Raises:
        InputError: neither a named model nor an existing file.
    """
    if model is None:
        return STARTER_MODEL
    if str(model) in NAMED_MODELS:
        return NAMED_MODELS[str(model)][0]
    path = Path(model).expanduser()
    if not path.is_file():
        raise InputError(f"{model}: no such checkpoint, and not a named model ({', '.join(NAMED_MODELS)})")
    return path


def official_init_(module: nn.Module, std: float = OFFICIAL_INIT_STD) -> nn.Module:
    """Initialise every ``Conv2d`` in ``module`` in place: weight ~ N(0, std²), bias 0.

    Draws from the global torch RNG (seed it with ``torch.manual_seed``). Returns ``module``.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, mean=0.0, std=std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return module


def build_denoiser(
    in_channels: int = 1,
    out_channels: int | None = None,
    base_width: int = 32,
    depth: int = 3,
    residual: bool = False,
    local_mean_px: float = 0.0,
) -> UNet:
    """The noise-removal U-Net F with the official initialisation (see `UNet` for the arguments).

    A residual U-Net starts close to the identity (its head's weights are small), not at it: the
    removed image ``x − F(x)`` must not be exactly zero at the start, since Noise2Grad shapes it
    into the synthetic noise.
    """
    return official_init_(UNet(in_channels, out_channels, base_width, depth, residual, local_mean_px))
