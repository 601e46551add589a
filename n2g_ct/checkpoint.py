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
