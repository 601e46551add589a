"""MONAI transforms for CT slices: HU window → [0, 1], random crops read from cached volumes, flips.

Array transforms and their dictionary twins (``…d``) sit side by side, with the dictionary keys of
the whole data layer in :class:`Keys`. Random transforms sample their parameters with MONAI's
``self.R`` (seed with ``set_random_state``) and then call a deterministic transform.

MONAI's own transforms are used where they fit: :class:`HUWindowd` is ``ScaleIntensityRanged`` with
clipping (the mapping of :class:`~n2g_ct.io.hu_window.HUWindow`), flips are ``RandFlipd``. The crop is ours: MONAI's ``RandSpatialCrop`` wraps the whole
input in a tensor first, which for a read-only memory-mapped slice warns about non-writable memory;
:class:`CropSlice` slices the memmap and copies only the crop (only those rows are read from disk).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.data.meta_obj import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    MapTransform,
    RandFlipd,
    Randomizable,
    ScaleIntensityRanged,
    Transform,
)

from n2g_ct.io.hu_window import HUWindow

DEFAULT_CROP_SIZE: tuple[int, int] = (128, 128)


class Keys:
    """Dictionary keys used by the data layer's transforms and samples."""

    NOISY = "noisy"  # unpaired training: a crop from the noisy (low-dose) pool
    CLEAN = "clean"  # unpaired training: a crop from the clean (routine-dose) pool
    LOW_DOSE = "low_dose"  # paired data: the low-dose image, windowed to [0, 1]
    REFERENCE = "reference"  # paired data: the reference image, windowed to [0, 1]
    LOW_DOSE_HU = "low_dose_hu"  # paired evaluation: the low-dose slice in HU
    REFERENCE_HU = "reference_hu"  # paired evaluation: the reference slice in HU
    VALID = "valid"  # paired evaluation: True inside the field of view of both series
    PAIR = "pair"  # paired evaluation: index of the pair (series) in the selection list
    SLICE = "slice"  # paired evaluation: slice index in the low-dose series


class HUWindowd(ScaleIntensityRanged):
    """HU → [0, 1] by an `HUWindow` (linear, clipped outside; float32) for the ``keys`` of a sample."""

    def __init__(self, keys: KeysCollection, window: HUWindow = HUWindow()) -> None:
        super().__init__(keys, a_min=window.low, a_max=window.high, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32)


def _check_size(roi_size: Sequence[int]) -> tuple[int, int]:
    size = tuple(int(v) for v in roi_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"crop size must be two positive pixel counts (rows, columns), got {tuple(roi_size)}")
    return size


class CropSlice(Transform):
    """Copy a (rows, columns) window out of a 2-D slice (y, x), e.g. a read-only memmap view.

    Returns a float32 array (1, h, w): channel first, writable, independent of the input.
    """

    def __init__(self, roi_start: Sequence[int], roi_size: Sequence[int]) -> None:
        self.roi_start = tuple(int(v) for v in roi_start)
        self.roi_size = _check_size(roi_size)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        (y0, x0), (h, w) = self.roi_start, self.roi_size
        if img.ndim != 2 or y0 < 0 or x0 < 0 or y0 + h > img.shape[0] or x0 + w > img.shape[1]:
            raise ValueError(f"crop {self.roi_size} at {self.roi_start} does not fit a slice of shape {img.shape}")
        return np.array(img[y0 : y0 + h, x0 : x0 + w], dtype=np.float32)[None]


class RandCropSlice(Randomizable, Transform):
    """:class:`CropSlice` at a uniformly random position that fits inside the slice."""

    def __init__(self, roi_size: Sequence[int] = DEFAULT_CROP_SIZE) -> None:
        self.roi_size = _check_size(roi_size)
        self._start: tuple[int, int] = (0, 0)

    def randomize(self, data: Sequence[int]) -> None:
        """Sample the crop's top-left corner for a slice of shape ``data`` = (rows, columns)."""
        rows, cols = data
        h, w = self.roi_size
        if h > rows or w > cols:
            raise ValueError(f"crop {self.roi_size} is larger than the slice ({rows}, {cols})")
        self._start = (int(self.R.randint(rows - h + 1)), int(self.R.randint(cols - w + 1)))

    def __call__(self, img: np.ndarray, randomize: bool = True) -> np.ndarray:
        if randomize:
            self.randomize(img.shape)
        return CropSlice(self._start, self.roi_size)(img)


class RandCropSliced(Randomizable, MapTransform):
    """Dictionary version of :class:`RandCropSlice`: one position for all ``keys`` (same-shape slices)."""

    def __init__(self, keys: KeysCollection, roi_size: Sequence[int] = DEFAULT_CROP_SIZE) -> None:
        MapTransform.__init__(self, keys)
        self.cropper = RandCropSlice(roi_size)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandCropSliced:
        super().set_random_state(seed, state)
        self.cropper.set_random_state(seed, state)
        return self

    def randomize(self, data: Sequence[int]) -> None:
        self.cropper.randomize(data)

    def __call__(self, data: Mapping[Hashable, np.ndarray]) -> dict[Hashable, np.ndarray]:
        out = dict(data)
        shapes = {key: out[key].shape for key in self.key_iterator(out)}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"paired crops need slices of one shape, got {shapes}")
        self.randomize(next(iter(shapes.values())))
        for key in shapes:
            out[key] = self.cropper(out[key], randomize=False)
        return out


def crop_transforms(
    keys: Sequence[str],
    *,
    crop_size: Sequence[int] = DEFAULT_CROP_SIZE,
    flip_prob: float = 0.5,
    window: HUWindow = HUWindow(),
) -> Compose:
    """Training chain: random crop → random up-down and left-right flips → HU window.

    Input: a dict of 2-D HU slices (y, x) under ``keys`` (memmap views: only the crop is read).
    Output: (1, h, w) float32 tensors in [0, 1]. All ``keys`` get the same crop position and the same
    flips (aligned pairs); use one chain per key for independent draws. Each flip happens with
    probability ``flip_prob``, independently per axis.
    """
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    return Compose(
        [
            RandCropSliced(keys, crop_size),
            RandFlipd(keys, prob=flip_prob, spatial_axis=0),
            RandFlipd(keys, prob=flip_prob, spatial_axis=1),
            HUWindowd(keys, window),
        ]
    )


def apply_plain(transform: Any, data: dict[str, Any]) -> dict[str, Any]:
    """``transform(data)`` with MONAI's metadata tracking off: values come back as plain tensors.

    Training crops and evaluation slices never need inverting, and the ``MetaTensor`` bookkeeping
    makes a crop about four times slower. MONAI keeps the switch in a process-wide flag, restored
    on return, so call this from one thread at a time (a Dataset in the main process or a worker).
    """
    previous = get_track_meta()
    set_track_meta(False)
    try:
        return transform(data)
    finally:
        set_track_meta(previous)
