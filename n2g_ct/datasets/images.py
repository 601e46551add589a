"""Natural-image training data for the paper's experiments: image folders, noisy/clean pools, crop streams.

A folder of clean images (e.g. BSD300 ``train200/``) becomes, sorted by file name:

- validation: the last ``validation_images`` images, each with one fixed noise realisation;
- the noisy pool: the first half of the rest, each with one fixed noise realisation (as a user has
  one noisy photograph of a scene, not fresh noise at every step), and for Noise2Noise a second one;
- the clean pool: the second half (other scenes).

:class:`ImageCropStream` turns them into the trainer's batches (same contract as the CT streams of
:mod:`n2g_ct.datasets.slices`): Noise2Grad gets independent (noisy, clean) crops; the supervised U-Net gets the
noisy pool's aligned (noisy, clean) crops, or with ``pairs: superposed`` the paper's "fake" pairs:
the true noise of a noisy-pool crop (noisy − clean) added onto an unrelated clean-pool crop, clipped
to [0, 1]; Noise2Noise gets two noisy realisations of the same crop. Images are (C, H, W) float32
in [0, 1] with C = 3 (RGB) or 1 (grey: ITU-R BT.601 luma).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from n2g_ct.datasets.noise_models import NoiseModel
from n2g_ct.datasets.slices import SeededBatchStream
from n2g_ct.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601
NOISY_POOL, SECOND_REALISATION, VALIDATION, TEST = range(4)
"""Noise realisation numbers (``add_noise``): each role draws its own noise."""


def image_files(folder: Path) -> list[Path]:
    """The images of ``folder`` sorted by name.

    Raises:
        InputError: the folder is missing or holds no images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_image(path: Path, color: bool) -> np.ndarray:
    """One image as (3, H, W) RGB or (1, H, W) luma, float32 in [0, 1].

    Raises:
        InputError: unreadable file, or not a grey/RGB(A) image.
    """
    import matplotlib.image

    try:
        image = np.asarray(matplotlib.image.imread(path))
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{path}: cannot read the image ({exc})") from None
    if image.dtype == np.uint8:
        image = image / 255.0
    elif image.dtype == np.uint16:
        image = image / 65535.0
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise InputError(f"{path}: expected a grey or RGB image, got an array of shape {image.shape}")
    rgb = np.moveaxis(image[..., :3], -1, 0).astype(np.float32)
    if color:
        return np.ascontiguousarray(rgb)
    return np.tensordot(np.asarray(LUMA_WEIGHTS, np.float32), rgb, axes=1)[None].astype(np.float32)


def add_noise(images: Sequence[np.ndarray], noise: NoiseModel, seed: int,
              realisation: int = 0) -> tuple[list[np.ndarray], list[float]]:
    """One noisy version per image and its noise level; image ``i`` draws from ``default_rng([seed, realisation, i])``."""
    drawn = [noise.apply(image, np.random.default_rng([seed, realisation, i])) for i, image in enumerate(images)]
    return [noisy for noisy, _ in drawn], [level for _, level in drawn]


@dataclass(frozen=True)
class ImagePools:
    """The pools and validation images of one folder (see the module docstring); lists of (C, H, W)."""

    noisy: list[np.ndarray]
    noisy_clean: list[np.ndarray]  # the clean originals of ``noisy``, for supervised pairs and true noise
    noisy_second: list[np.ndarray]  # a second noisy realisation of each, for Noise2Noise
    clean: list[np.ndarray]
    validation_noisy: list[np.ndarray]
    validation_clean: list[np.ndarray]

    @classmethod
    def from_folder(cls, folder: Path, noise: NoiseModel, *, color: bool, validation_images: int,
                    seed: int, noise2noise: bool = False) -> ImagePools:
        files = image_files(folder)
        if len(files) < validation_images + 2:
            raise InputError(f"{folder}: {len(files)} images; need at least {validation_images + 2} "
                             f"(two pools and {validation_images} validation images)")
        images = [load_image(f, color) for f in files]
        train, validation = images[: len(images) - validation_images], images[len(images) - validation_images:]
        half = len(train) // 2
        noisy_clean, clean = train[:half], train[half:]
        return cls(
            noisy=add_noise(noisy_clean, noise, seed, NOISY_POOL)[0],
            noisy_clean=noisy_clean,
            noisy_second=add_noise(noisy_clean, noise, seed, SECOND_REALISATION)[0] if noise2noise else [],
            clean=clean,
            validation_noisy=add_noise(validation, noise, seed, VALIDATION)[0],
            validation_clean=validation,
        )


def _crop_box(shape: Sequence[int], size: int, rng: np.random.RandomState, where: str) -> tuple[slice, slice]:
    height, width = shape[-2:]
    if size > height or size > width:
        raise InputError(f"{where}: an image of {height}x{width} pixels is smaller than the crop {size}")
    top, left = rng.randint(0, height - size + 1), rng.randint(0, width - size + 1)
    return slice(top, top + size), slice(left, left + size)


def _flip(crop: np.ndarray, flips: tuple[bool, bool]) -> np.ndarray:
    if flips[0]:
        crop = crop[:, ::-1]
    if flips[1]:
        crop = crop[:, :, ::-1]
    return crop


class ImageCropStream(SeededBatchStream):
    """Endless batches of natural-image crops for one training method (see the module docstring).

    Args:
        pools: from :meth:`ImagePools.from_folder`.
        method: ``noise2grad`` → (noisy, clean); ``supervised`` and ``noise2noise`` → (input, target).
        pairs: for ``supervised``: ``original`` or ``superposed``.
        crop_size: square crop side, pixels.
        flip_prob: probability of each of the up-down and left-right flips.
        seeding: ``batch_size``, ``seed``, ``rank``, ``world_size``, ``start`` (:class:`SeededBatchStream`).
    """

    def __init__(self, pools: ImagePools, method: str, *, pairs: str = "original", crop_size: int = 128,
                 flip_prob: float = 0.5, **seeding) -> None:
        super().__init__(**seeding)
        self.pools, self.method, self.pairs = pools, method, pairs
        self.crop_size, self.flip_prob = crop_size, flip_prob

    def _crops(self, images: Sequence[Sequence[np.ndarray]], rng: np.random.RandomState) -> list[np.ndarray]:
        """The same random crop and flips of image ``k`` of every list in ``images`` (k drawn once)."""
        k = rng.randint(len(images[0]))
        box = _crop_box(images[0][k].shape, self.crop_size, rng, "training image")
        flips = (rng.rand() < self.flip_prob, rng.rand() < self.flip_prob)
        return [_flip(group[k][(slice(None), *box)], flips) for group in images]

    def sample(self, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
        """One (first, second) pair of (C, h, w) crops for the method."""
        p = self.pools
        if self.method == "noise2grad":
            return self._crops([p.noisy], rng)[0], self._crops([p.clean], rng)[0]
        if self.method == "noise2noise":
            first, second = self._crops([p.noisy, p.noisy_second], rng)
            return first, second
        if self.pairs == "superposed":
            noisy, original = self._crops([p.noisy, p.noisy_clean], rng)
            clean = self._crops([p.clean], rng)[0]
            return np.clip(clean + (noisy - original), 0.0, 1.0), clean
        noisy, clean = self._crops([p.noisy, p.noisy_clean], rng)
        return noisy, clean

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index``: two (B, C, h, w) float32 tensors in [0, 1]."""
        rng = np.random.RandomState(self.batch_seeds(index, 1)[0])
        samples = [self.sample(rng) for _ in range(self.batch_size)]
        return tuple(torch.from_numpy(np.stack(column).astype(np.float32)) for column in zip(*samples))
