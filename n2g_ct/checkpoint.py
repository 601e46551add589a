"""Training checkpoints: written atomically, loaded with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors and Python scalars/containers (no pickled classes), so it
loads safely. Its ``format`` key identifies it; anything else (a foreign ``.pt``, a truncated file)
gets a clear :class:`~n2g_ct.errors.InputError`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from n2g_ct import __version__
from n2g_ct.atomic import atomic_file
from n2g_ct.errors import InputError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "n2g-ct-checkpoint/1"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` (plus format and versions) to ``path`` atomically: temp file, fsync, rename.

    A reader never sees a partial file, and an interrupted write leaves the previous checkpoint.
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "versions": {"n2g_ct": __version__, "torch": str(torch.__version__)},
        **state,
    }
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


def export_model(checkpoint: Path, out: Path) -> dict[str, Any]:
    """Write an inference-only copy of a training checkpoint: F's weights and the settings to use them.

    Drops the optimiser, the noise approximator and the training data paths (which may name
    patients' folders), so the file is small and safe to share. ``n2g-ct denoise --model`` reads it
    like a training checkpoint.

    Returns:
        The exported dict (without the format/version keys added on save).

    Raises:
        InputError: ``checkpoint`` is not an n2g-ct checkpoint or lacks the denoiser/config, or
            ``out`` is the checkpoint itself (its optimiser state would be lost).
    """
    if Path(out).expanduser().resolve() == Path(checkpoint).expanduser().resolve():
        raise InputError(f"{out}: the export would replace the checkpoint it is made from; choose another --out")
    state = load_checkpoint(checkpoint)
    try:
        config = state["config"]
        exported = {
            "config": {
                "data": {"window_hu": list(config["data"]["window_hu"]), "crop_size": config["data"]["crop_size"]},
                "model": dict(config["model"]),
                "method": dict(config["method"]),
                "optim": dict(config["optim"]),
            },
            "denoiser": state["denoiser"],
            "step": state["step"],
            "total_steps": state["total_steps"],
            "trained_with": dict(state.get("versions", {})),
            "self_check": state.get("self_check"),
        }
    except (KeyError, TypeError) as exc:
        raise InputError(f"{checkpoint}: lacks the denoiser or its config ({exc!r}); was it written by n2g-ct train?") from None
    save_checkpoint(exported, out)
    return exported


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
