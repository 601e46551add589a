"""The checkpoint contract: what a checkpoint holds, written and read only here.

A checkpoint is a plain dict of tensors and Python scalars/containers (no pickled classes), written
atomically and loaded with ``torch.load(weights_only=True)``, so it loads safely. Keys:

- ``format`` (`CHECKPOINT_FORMAT`), ``versions`` (n2g_ct, torch);
- ``config``: the training configuration as plain data (``data.window_hu``, ``model.*``, ``method.*``);
- ``denoiser``: F's state dict; ``step``, ``total_steps`` (``None`` while a time budget is being
  measured), ``self_check`` (the last self-check's values, or ``None``);
- a training checkpoint also the trainer's state (`TRAINING_KEYS`); an exported model instead
  ``trained_with`` (the versions it was trained with).

`CheckpointInfo` is the typed view every reader uses; checkpoints of earlier releases (the starter
model) read the same way.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from n2g_ct import __version__
from n2g_ct.atomic import atomic_file
from n2g_ct.errors import InputError
from n2g_ct.io.hu_window import HUWindow
from n2g_ct.models import build_denoiser
from n2g_ct.models.unet import UNet

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "n2g-ct-checkpoint/1"
TRAINING_KEYS = ("noise_approximator", "optimizer", "scheduler", "scaler", "best_psnr", "failed_checks",
                 "elapsed_s", "world_size")
"""What a training checkpoint adds for an exact resume (absent from exported models)."""


@dataclass(frozen=True)
class UNetSettings:
    """The U-Net F a checkpoint's weights fit (``model.*`` of the training config)."""

    channels: int = 1
    base_width: int = 32
    depth: int = 3
    residual: bool = False
    local_mean_px: float = 0.0

    def build(self) -> UNet:
        """A freshly initialised U-Net of these settings (global torch RNG)."""
        return build_denoiser(self.channels, self.channels, self.base_width, self.depth, self.residual,
                              self.local_mean_px)


@dataclass(frozen=True)
class CheckpointInfo:
    """The typed metadata of a checkpoint (module docstring).

    Attributes:
        unet: the U-Net settings; window: the HU window F was trained on.
        method: ``noise2grad``, ``supervised`` or ``noise2noise``; variant: Noise2Grad's, else ``None``.
        step: optimiser steps done; total_steps: the run's budget (``None``: not fixed yet).
        versions: the n2g_ct and torch versions that trained F.
        self_check: the last self-check's values (``SelfCheckResult.as_dict``), or ``None``.
        config: the training configuration as plain data.
    """

    unet: UNetSettings
    window: HUWindow
    method: str
    variant: str | None
    step: int
    total_steps: int | None
    versions: dict[str, str]
    self_check: dict[str, Any] | None
    config: dict[str, Any]

    @classmethod
    def of(cls, state: dict[str, Any], source: str) -> CheckpointInfo:
        """Read the metadata of a loaded checkpoint; InputError naming ``source`` when it lacks any."""
        try:
            config = state["config"]
            model, method = config["model"], config["method"]
            unet = UNetSettings(int(model["channels"]), int(model["base_width"]), int(model["depth"]),
                                bool(model.get("residual", False)), float(model.get("local_mean_px", 0.0)))
            window = HUWindow.of(config["data"]["window_hu"])
            name = str(method["name"])
            variant = method.get("noise2grad", {}).get("variant") if name == "noise2grad" else None
            total = state.get("total_steps")
            return cls(unet, window, name, variant, int(state["step"]), None if total is None else int(total),
                       dict(state.get("trained_with") or state.get("versions") or {}), state.get("self_check"),
                       config)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"{source}: lacks the denoiser's settings ({exc!r}); was it written by n2g-ct train?") from None

    @property
    def complete(self) -> bool:
        """The run reached its step budget."""
        return self.total_steps is not None and self.step >= self.total_steps

    def describe(self) -> str:
        """E.g. ``noise2grad (default) denoiser, step 2748``."""
        variant = f" ({self.variant})" if self.variant else ""
        return f"{self.method}{variant} denoiser, step {self.step}"


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: its file, its metadata and everything it holds (``state``)."""

    path: Path
    info: CheckpointInfo
    state: dict[str, Any]

    def network(self) -> UNet:
        """F with the checkpoint's weights, in eval mode, on the CPU."""
        network = self.info.unet.build()
        load_weights(network, self.state.get("denoiser"),
                     f"{self.path} (U-Net of width {self.info.unet.base_width}, depth {self.info.unet.depth})")
        return network.eval()

    @functools.cached_property
    def sha256(self) -> str:
        """Hex SHA-256 of the file (cited in reports and derived DICOM)."""
        return file_sha256(self.path)


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load and check a checkpoint (:func:`load_checkpoint`) and read its metadata."""
    state = load_checkpoint(path, map_location)
    return Checkpoint(Path(path), CheckpointInfo.of(state, str(path)), state)


def save_checkpoint(path: Path, *, config: dict[str, Any], denoiser: dict[str, Any], step: int,
                    total_steps: int | None, self_check: dict[str, Any] | None, **extra: Any) -> None:
    """Write a checkpoint atomically (temp file, fsync, rename): a reader never sees a partial file,
    and an interrupted write leaves the previous one. ``extra``: `TRAINING_KEYS` or ``trained_with``."""
    unknown = set(extra) - set(TRAINING_KEYS) - {"trained_with"}
    if unknown:
        raise ValueError(f"not checkpoint keys: {sorted(unknown)}")
    payload = {"format": CHECKPOINT_FORMAT, "versions": {"n2g_ct": __version__, "torch": str(torch.__version__)},
               "config": config, "denoiser": denoiser, "step": step, "total_steps": total_steps,
               "self_check": self_check, **extra}
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs).

    Raises:
        InputError: missing, truncated or damaged file, or a file that is not an n2g-ct checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for damaged or foreign files
        log.debug("torch.load(%s) failed", path, exc_info=exc)
        raise InputError(
            f"{path}: not a readable n2g-ct checkpoint (damaged, truncated, or a file that needs "
            f"code execution to load: {type(exc).__name__})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise InputError(f"{path}: not an n2g-ct checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")
    return state


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file (checkpoint hashes in reports and derived DICOM)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_model(checkpoint: Path, out: Path) -> CheckpointInfo:
    """Write an inference-only copy of a training checkpoint: F's weights and the settings to use them.

    Drops the optimiser, the noise scale G and the training data paths (which may name patients'
    folders), so the file is small and safe to share; ``n2g-ct denoise --model`` reads it like a
    training checkpoint.

    Raises:
        InputError: ``checkpoint`` is not an n2g-ct checkpoint or lacks the denoiser/config, or
            ``out`` is the checkpoint itself (its optimiser state would be lost).
    """
    if Path(out).expanduser().resolve() == Path(checkpoint).expanduser().resolve():
        raise InputError(f"{out}: the export would replace the checkpoint it is made from; choose another --out")
    source = read_checkpoint(checkpoint)
    info = source.info
    config = {"data": {"window_hu": info.window.as_list(), "crop_size": info.config["data"].get("crop_size")},
              **{key: dict(info.config.get(key, {})) for key in ("model", "method", "optim")}}
    source.network()  # the weights must fit the settings
    save_checkpoint(out, config=config, denoiser=source.state["denoiser"], step=info.step,
                    total_steps=info.total_steps, self_check=info.self_check, trained_with=info.versions)
    return CheckpointInfo.of({**source.state, "config": config}, str(out))


def load_weights(module: torch.nn.Module, weights: Any, source: str) -> None:
    """Load ``weights`` (a state dict) into ``module``; one-line InputError naming ``source`` and the
    first mismatch when they do not fit (another U-Net width or depth, another method)."""
    if not isinstance(weights, dict):
        raise InputError(f"{source}: holds no weights where a state dict was expected")
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    reshaped = [k for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or reshaped:
        example = (f"{reshaped[0]} is {tuple(weights[reshaped[0]].shape)} where {tuple(expected[reshaped[0]].shape)} "
                   "is expected" if reshaped else f"e.g. {(missing or unexpected)[0]}")
        raise InputError(f"{source}: the weights do not fit this model: {len(reshaped)} tensor(s) of another "
                         f"shape, {len(missing)} missing, {len(unexpected)} unexpected ({example})")
    module.load_state_dict(weights)
