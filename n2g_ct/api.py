"""The Python API in three lines::

    import n2g_ct
    model = n2g_ct.load_model("starter")                 # a named model or a checkpoint path
    model.denoise("scans/patient1/").save("out/patient1")   # derived DICOM series ("....nii.gz": NIfTI)

``model.denoise`` also takes an HU array, (y, x) or (z, y, x), and returns the denoised array.
Named models (:data:`n2g_ct.models.NAMED_MODELS`, ``n2g-ct models``) ship with the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from n2g_ct.errors import InputError
from n2g_ct.models import resolve_model

if TYPE_CHECKING:
    from n2g_ct.io.dicom_writer import Derivation
    from n2g_ct.io.volume import CTVolume

@dataclass
class DenoisedVolume:
    """A volume read from a path and denoised: ``hu`` (z, y, x) float32, ``source`` the volume read
    (its headers are the templates of a derived series), ``derivation`` how it was made."""

    hu: np.ndarray
    source: CTVolume
    derivation: Derivation

    def save(self, path: str | Path) -> Path:
        """Write to ``path``: a NIfTI file when it ends in .nii/.nii.gz, else a derived DICOM series
        folder (from DICOM input). Written atomically; returns ``path``."""
        from n2g_ct.atomic import staged_output
        from n2g_ct.io.dicom_writer import write_derived_series
        from n2g_ct.io.nifti import is_nifti, write_volume_nifti

        path = Path(path)
        with staged_output(path) as staging:
            if is_nifti(path):
                write_volume_nifti(staging, self.hu, self.source)
            else:
                write_derived_series(self.source, self.hu, staging, self.derivation)
        return path


class Model:
    """A denoising model on its device (from :func:`load_model`)."""

    def __init__(self, checkpoint: Path, device: str = "auto", precision: str = "auto",
                 batch_size: int | None = None) -> None:
        from n2g_ct.inference.denoiser import DEFAULT_BATCH_SIZE, denoiser_from_checkpoint
        from n2g_ct.io.dicom_writer import Derivation
        from n2g_ct.models.checkpoint import read_checkpoint

        self.checkpoint = checkpoint
        loaded = read_checkpoint(checkpoint)
        self.denoiser = denoiser_from_checkpoint(loaded, device=device, precision=precision)
        self.derivation = Derivation(self.denoiser.method, loaded.sha256, self.denoiser.precision)
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE[self.denoiser.device.type]

    def denoise(self, data: str | Path | np.ndarray) -> DenoisedVolume | np.ndarray:
        """Denoise a path (DICOM series folder or file, NIfTI file) or an HU array (y, x) / (z, y, x).

        Returns:
            For a path, a :class:`DenoisedVolume` (``.hu``, ``.save(path)``); for an array, the
            denoised float32 array of its shape. Padding outside the field of view stays as it was.
        """
        from n2g_ct.inference.denoiser import denoise_volume
        from n2g_ct.io import read_volume

        if isinstance(data, np.ndarray):
            if data.ndim not in (2, 3):
                raise InputError(f"an HU array needs shape (y, x) or (z, y, x), got {data.shape}")
            stack = np.asarray(data, np.float32).reshape(-1, *data.shape[-2:])
            return denoise_volume(self.denoiser, stack, batch_size=self.batch_size).reshape(data.shape)
        volume = read_volume(Path(data))
        hu = denoise_volume(self.denoiser, volume.hu, batch_size=self.batch_size, keep=volume.padding_mask)
        return DenoisedVolume(hu, volume, self.derivation)


def load_model(model: str | Path = "starter", *, device: str = "auto", precision: str = "auto") -> Model:
    """Load a named model (``starter``) or a checkpoint written by ``n2g-ct train``/``export``.

    Args:
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (:mod:`n2g_ct.inference.precision`).
    """
    return Model(resolve_model(model), device=device, precision=precision)
