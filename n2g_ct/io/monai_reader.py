"""n2g-ct's reader as a MONAI ``ImageReader``, so MONAI transform chains load CT with correct geometry.

``LoadImage(reader=CTSeriesReader())`` (or ``LoadImaged(keys, reader=CTSeriesReader())``) then reads
DICOM series folders (sorted along the slice normal, HU from RescaleSlope/Intercept) and NIfTI files.
MONAI's array convention is kept: spatial axes in ITK index order (x, y, z), ``affine`` in RAS.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys

from n2g_ct.io import read_volume
from n2g_ct.io.volume import CTVolume


class CTSeriesReader(ImageReader):
    """Read one CT volume per path (series folder, DICOM file or NIfTI) via :func:`read_volume`.

    Args:
        allow_non_ct: also read series whose Modality is not CT.
    """

    def __init__(self, allow_non_ct: bool = False) -> None:
        super().__init__()
        self.allow_non_ct = allow_non_ct

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        """Series folders, DICOM files (any or no suffix) and NIfTI files are all accepted."""
        return True

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs: Any) -> CTVolume | list[CTVolume]:
        """One :class:`CTVolume` per path."""
        if isinstance(data, (str, Path)):
            return read_volume(Path(data), allow_non_ct=self.allow_non_ct)
        return [read_volume(Path(d), allow_non_ct=self.allow_non_ct) for d in data]

    def get_data(self, img: CTVolume | list[CTVolume]) -> tuple[np.ndarray, dict]:
        """(HU array (x, y, z), or (n, x, y, z) for several volumes; MONAI metadata with a RAS affine).

        Raises:
            InputError: a volume is not a regular grid (irregular spacing, duplicated positions,
                tilt, mixed orientations): one affine cannot place its slices.
        """
        volumes = [img] if isinstance(img, CTVolume) else list(img)
        for volume in volumes:
            volume.require_regular_grid("a MONAI image with one affine")
        arrays = [v.hu.transpose(2, 1, 0) for v in volumes]
        first = volumes[0]
        meta = {
            MetaKeys.AFFINE: first.affine_ras(),
            MetaKeys.ORIGINAL_AFFINE: first.affine_ras(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(arrays[0].shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if len(arrays) == 1 else 0,
            "spacing": np.asarray(first.spacing_xyz),
            "series_uid": first.series_uid,
        }
        data = arrays[0] if len(arrays) == 1 else np.stack(arrays)
        return data, meta
