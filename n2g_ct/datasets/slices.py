"""Datasets over cached CT volumes: unpaired and paired training crops, the paired evaluation set.

Every series is converted once by :class:`n2g_ct.datasets.cache.VolumeCache` (in the process that builds the
dataset); samples are read from its memory-mapped HU arrays, never by decoding DICOM.

- :class:`UnpairedCropStream`: endless batches of (noisy crop, clean crop) for Noise2Grad. Each sample draws a
  slice uniformly from all selected slices of the noisy pool and, independently, one from the clean
  pool, then crops, flips and windows each on its own.
- :class:`PairedCropStream`: endless batches of aligned (low-dose crop, reference crop) for supervised and
  Noise2Noise baselines: one slice position, one crop window and the same flips for both.
- :class:`PairedSliceDataset`: map-style whole (low-dose, reference) slices for evaluation, windowed
  and in HU, with the field-of-view mask.

Seeding: batch ``j`` of a stream comes from ``SeedSequence([seed, rank, j])`` alone, so one base seed
gives reproducible streams that differ per distributed rank, are the same for any number of
DataLoader workers (use ``DataLoader(stream, batch_size=None)``: streams yield whole batches), and
resume exactly from ``start=j``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from n2g_ct.datasets.cache import CachedVolume, VolumeCache
from n2g_ct.datasets.selection import PairSelection, SliceSelection
from n2g_ct.datasets.transforms import (
    DEFAULT_CROP_SIZE,
    HUWindowd,
    Keys,
    apply_plain,
    crop_transforms,
)
from n2g_ct.errors import InputError
from n2g_ct.io.hu_window import HUWindow

log = logging.getLogger(__name__)

SeriesLike = SliceSelection | Path | str

# Paired slices whose positions differ by more than this (mm) are not the same anatomy.
_POSITION_TOLERANCE_MM = 0.05
_SPACING_TOLERANCE_MM = 1e-3
_DIRECTION_TOLERANCE = 1e-4


@dataclass(frozen=True, eq=False)
class SliceTable:
    """Selected slices as flat rows, sampled uniformly.

    Attributes:
        volumes: per entry, the volumes drawn together (one for a pool, two for a pair).
        entry: (n,) entry index of each row.
        z: (n, len(volumes[entry])) slice index in each of the entry's volumes.
    """

    volumes: tuple[tuple[CachedVolume, ...], ...]
    entry: np.ndarray
    z: np.ndarray

    def __len__(self) -> int:
        return len(self.entry)

    def row(self, index: int) -> tuple[tuple[CachedVolume, ...], tuple[int, ...]]:
        """The volumes and slice indices of row ``index``."""
        return self.volumes[self.entry[index]], tuple(int(z) for z in self.z[index])

    def sample(self, rng: np.random.RandomState) -> int:
        """The index of a uniformly random row."""
        return int(rng.randint(len(self.entry)))


def _indices(slices: Sequence[int] | None, volume: CachedVolume, role: str) -> np.ndarray:
    count = volume.shape[0]
    if slices is None:
        return np.arange(count)
    z = np.asarray(slices, dtype=np.int64).reshape(-1)
    bad = z[(z < 0) | (z >= count)]
    if bad.size:
        raise InputError(
            f"{role} {volume.source}: slice index {int(bad[0])} out of range (the series has {count} slices)"
        )
    return z


def _table(
    name: str, volumes: Sequence[tuple[CachedVolume, ...]], zs: Sequence[np.ndarray], min_tissue_fraction: float
) -> SliceTable:
    """Flatten per-entry (n, k) slice indices, keeping rows where every volume has enough tissue."""
    kept = []
    for entry_volumes, z in zip(volumes, zs):
        fractions = np.stack([v.tissue_fraction[z[:, i]] for i, v in enumerate(entry_volumes)], axis=1)
        kept.append(z[(fractions >= min_tissue_fraction).all(axis=1)])
    total = sum(len(z) for z in zs)
    count = sum(len(z) for z in kept)
    if count == 0:
        raise InputError(
            f"{name}: no slices to draw from ({total} selected, min_tissue_fraction={min_tissue_fraction})"
        )
    log.info("%s: %d slices from %d entries (%d below min_tissue_fraction)", name, count, len(volumes), total - count)
    entry = np.concatenate([np.full(len(z), i) for i, z in enumerate(kept)])
    return SliceTable(tuple(volumes), entry, np.concatenate(kept))


def slice_pool(
    name: str, selections: Iterable[SeriesLike], cache: VolumeCache, *, min_tissue_fraction: float = 0.0
) -> SliceTable:
    """The slices of a noisy or clean pool (one volume per entry), converting series into ``cache``."""
    volumes: list[tuple[CachedVolume, ...]] = []
    zs = []
    for item in selections:
        selection = item if isinstance(item, SliceSelection) else SliceSelection(Path(item))
        volume = cache.get(selection.series)
        volumes.append((volume,))
        zs.append(_indices(selection.slices, volume, name)[:, None])
    if not volumes:
        raise InputError(f"{name}: no series given")
    return _table(name, volumes, zs, min_tissue_fraction)


NOISE_PRIOR_ROIS = 8
"""In :func:`pool_noise_power`, a slice's noise spectrum is pulled towards its series' as if that one
came from this many ROIs: a slice with few uniform ROIs mostly takes its series' spectrum."""
NOISE_ROI_SIZES_PX = (16, 8)
"""ROI sides :func:`pool_noise_power` tries in turn: the smaller only when a pool holds no larger one
(small images, thin soft tissue)."""


def pool_noise_power(table: SliceTable, frequencies_per_px: np.ndarray, window: HUWindow,
                     name: str) -> np.ndarray:
    """The noise power of each row's slice at radial ``frequencies_per_px``, in squared network units.

    Per slice: the noise NPS measured in its own uniform soft-tissue ROIs
    (:func:`n2g_ct.quality.ct_measures.estimate_noise_nps`, no reference; the ROI side is the first of
    :data:`NOISE_ROI_SIZES_PX` the pool holds), averaged with its series' pooled NPS weighted
    :data:`NOISE_PRIOR_ROIS` (a series without ROIs takes the whole pool's); its radial profile
    interpolated at the frequencies (constant beyond the measured rings); HU² divided by the
    squared window width, the units of ``|rfft2|² / (h·w)`` of crops in [0, 1].

    Returns:
        (rows, len(frequencies_per_px)) float32.

    Raises:
        InputError: no slice of the pool holds a uniform soft-tissue region, so its noise cannot be measured.
    """
    from n2g_ct.quality.ct_measures import estimate_noise_nps, radial_nps

    def pooled(estimates: Iterable[tuple[np.ndarray | None, int]]) -> np.ndarray | None:
        found = [(nps, count) for nps, count in estimates if nps is not None]
        return sum(nps * count for nps, count in found) / sum(c for _, c in found) if found else None

    for size in NOISE_ROI_SIZES_PX:
        per_entry: list[dict[int, tuple[np.ndarray | None, int]]] = []
        for entry, volumes in enumerate(table.volumes):
            volume = volumes[0]
            slices = {}
            for z in np.unique(table.z[table.entry == entry, 0]):
                valid = None if volume.padding_mask is None else ~np.asarray(volume.padding_mask[z])
                slices[int(z)] = estimate_noise_nps(np.asarray(volume.hu[z], np.float64), valid, size_px=size)
            per_entry.append(slices)
        pool = pooled(e for slices in per_entry for e in slices.values())
        if pool is not None:
            break
    else:
        raise InputError(f"{name}: no slice holds a uniform soft-tissue region (squares of {NOISE_ROI_SIZES_PX[-1]} px "
                         "or more in [-100, 150] HU), so its noise cannot be measured; use "
                         "method.noise2grad.noise_scale: spectral")
    profiles = {}
    for entry, slices in enumerate(per_entry):
        series = pooled(slices.values())
        series = pool if series is None else series
        for z, (nps, count) in slices.items():
            own = series if nps is None else (count * nps + NOISE_PRIOR_ROIS * series) / (count + NOISE_PRIOR_ROIS)
            frequency, radial = radial_nps(own, (1.0, 1.0))
            profiles[entry, z] = np.interp(frequencies_per_px, frequency, radial) / window.width**2
    log.info("%s: noise measured in the uniform soft-tissue ROIs (%d px) of %d slices", name, size, len(profiles))
    return np.stack([profiles[int(e), int(z)] for e, z in zip(table.entry, table.z[:, 0])]).astype(np.float32)


def pair_table(
    pairs: Iterable[PairSelection], cache: VolumeCache, *, min_tissue_fraction: float = 0.0
) -> SliceTable:
    """The slices of paired (low-dose, reference) series, after checking that each pair matches."""
    volumes: list[tuple[CachedVolume, ...]] = []
    zs = []
    for pair in pairs:
        low, ref = cache.get(pair.low_dose), cache.get(pair.reference)
        z_low = _indices(pair.slices, low, "low-dose series")
        z_ref = _indices(pair.reference_slices, ref, "reference series")
        _check_pair(pair, low, ref, z_low, z_ref)
        volumes.append((low, ref))
        zs.append(np.stack([z_low, z_ref], axis=1))
    if not volumes:
        raise InputError("paired set: no pairs given")
    return _table("paired set", volumes, zs, min_tissue_fraction)


def _check_pair(
    pair: PairSelection, low: CachedVolume, ref: CachedVolume, z_low: np.ndarray, z_ref: np.ndarray
) -> None:
    """InputError naming both series unless they image the same positions on the same grid."""

    def mismatch(what: str, a: Any, b: Any) -> InputError:
        return InputError(
            f"paired series do not match ({what}): "
            f"low-dose {pair.low_dose} has {a}, reference {pair.reference} has {b}"
        )

    if len(z_low) != len(z_ref):
        raise mismatch("slice count", f"{len(z_low)} slices", f"{len(z_ref)} slices")
    if low.shape[1:] != ref.shape[1:]:
        raise mismatch("slice size", f"{low.shape[1:]} pixels", f"{ref.shape[1:]} pixels")
    if not np.allclose(low.spacing_xyz[:2], ref.spacing_xyz[:2], atol=_SPACING_TOLERANCE_MM):
        raise mismatch("pixel spacing", f"{low.spacing_xyz[:2]} mm", f"{ref.spacing_xyz[:2]} mm")
    if not np.allclose(low.direction, ref.direction, atol=_DIRECTION_TOLERANCE):
        raise mismatch("orientation", low.direction.tolist(), ref.direction.tolist())
    gap = np.abs(low.positions_lps[z_low] - ref.positions_lps[z_ref]).max(axis=1)
    if gap.max() > _POSITION_TOLERANCE_MM:
        i = int(gap.argmax())
        raise mismatch(f"slice position, {gap[i]:.2f} mm apart", f"slice {z_low[i]}", f"slice {z_ref[i]}")


def _rank_and_world_size(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else those of an initialised ``torch.distributed`` group, else (0, 1)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if distributed else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if distributed else 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return rank, world_size


class SeededBatchStream(IterableDataset):
    """Endless batches where batch ``j`` (counted from 0 over the whole run) depends only on ``(seed, rank, j)``.

    A stream started at ``start=j`` continues a run exactly where it stopped (resume), and DataLoader
    workers split the batch indices round-robin (worker ``w`` of ``W`` makes ``j = start + w,
    start + w + W, ...``), which ``DataLoader(stream, batch_size=None)`` returns in order. So the
    batches are the same for any ``num_workers``. Subclasses implement :meth:`batch`.
    """

    def __init__(self, *, batch_size: int = 1, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, start: int = 0) -> None:
        if seed < 0 or start < 0 or batch_size < 1:
            raise ValueError(f"need seed ≥ 0, start ≥ 0 and batch_size ≥ 1, got {seed}, {start}, {batch_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world_size = _rank_and_world_size(rank, world_size)
        self.start = start

    def batch_seeds(self, index: int, count: int) -> np.ndarray:
        """``count`` independent uint32 seeds of batch ``index`` on this rank."""
        return np.random.SeedSequence([self.seed, self.rank, index]).generate_state(count)

    def batch(self, index: int) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for index in itertools.count(self.start + worker_id, workers):
            yield self.batch(index)


class _CropStream(SeededBatchStream):
    """Batches of CT crops: per sample, one row from each table through its own crop chain.

    A draw may carry per-row values (an array whose first axis runs over the table's rows), which
    the batch returns after the crops, stacked, for the rows drawn.
    """

    def __init__(
        self,
        draws: Sequence[tuple[SliceTable, tuple[str, ...]] | tuple[SliceTable, tuple[str, ...], np.ndarray]],
        *,
        crop_size: Sequence[int] = DEFAULT_CROP_SIZE,
        flip_prob: float = 0.5,
        window: HUWindow = HUWindow(),
        **seeding: Any,
    ) -> None:
        super().__init__(**seeding)
        self.draws = tuple(
            (draw[0], draw[1], crop_transforms(draw[1], crop_size=crop_size, flip_prob=flip_prob, window=window))
            for draw in draws
        )
        self.row_values = tuple(draw[2] if len(draw) > 2 else None for draw in draws)
        for table, _, _ in self.draws:
            for volume in (v for volumes in table.volumes for v in volumes):
                if any(c > s for c, s in zip(crop_size, volume.shape[1:])):
                    raise InputError(f"{volume.source}: slices {volume.shape[1:]} are smaller than the crop {tuple(crop_size)}")

    def batch(self, index: int) -> tuple[torch.Tensor, ...]:
        """Batch ``index``: one (B, 1, h, w) float32 tensor in [0, 1] per key, then (B, ...) per-row values."""
        seeds = self.batch_seeds(index, 1 + len(self.draws))
        pick = np.random.RandomState(seeds[0])
        for (_, _, chain), chain_seed in zip(self.draws, seeds[1:]):
            state = np.random.RandomState(chain_seed)  # one per chain: cheaper than one per transform
            for transform in chain.transforms:
                if isinstance(transform, Randomizable):
                    transform.set_random_state(state=state)
        crops: list[list[torch.Tensor]] = []
        rows: list[list[int]] = []
        for _ in range(self.batch_size):
            sample: list[torch.Tensor] = []
            drawn = []
            for table, keys, chain in self.draws:
                row = table.sample(pick)
                volumes, zs = table.row(row)
                out = apply_plain(chain, {key: v.hu[z] for key, v, z in zip(keys, volumes, zs)})
                sample.extend(out[key] for key in keys)
                drawn.append(row)
            crops.append(sample)
            rows.append(drawn)
        extras = [torch.from_numpy(values[[r[i] for r in rows]])
                  for i, values in enumerate(self.row_values) if values is not None]
        return (*(torch.stack(column) for column in zip(*crops)), *extras)


class UnpairedCropStream(_CropStream):
    """Endless (noisy, clean) crops, each float32 (1, h, w) in [0, 1]; a DataLoader batches (B, 1, h, w).

    Args (``options`` are the keyword arguments of the common base: ``batch_size``, ``crop_size``,
    ``flip_prob``, ``window``, ``seed``, ``rank``, ``world_size``, ``start``):
        noisy, clean: the pools: :class:`SliceSelection` s, or series paths (all slices).
        crop_size: (rows, columns) in pixels.
        flip_prob: probability of each of the up-down and left-right flips.
        window: the HU window mapped to [0, 1] (clipped outside).
        batch_size: samples per yielded batch.
        seed: base seed (see the module docstring).
        rank, world_size: distributed rank; default from ``torch.distributed`` when initialised.
        start: index of the first batch (the number of batches a resumed run already used).
        min_tissue_fraction: skip slices with less than this share of voxels above -500 HU
            (0 keeps every slice, as the paper does).
        cache: where volumes are cached.
        noise_bands: radial frequencies (cycles/pixel); when given, each batch ends with two more
            tensors, (B, len(noise_bands)) float32: the noise power of each noisy crop's slice and
            the own noise power of each clean crop's slice at those frequencies, in the network's
            units (see :func:`pool_noise_power`).
    """

    def __init__(
        self,
        noisy: Iterable[SeriesLike],
        clean: Iterable[SeriesLike],
        *,
        min_tissue_fraction: float = 0.0,
        cache: VolumeCache,
        noise_bands: np.ndarray | None = None,
        **options: Any,
    ) -> None:
        draws: list[tuple] = [
            (slice_pool("noisy pool", noisy, cache, min_tissue_fraction=min_tissue_fraction), (Keys.NOISY,)),
            (slice_pool("clean pool", clean, cache, min_tissue_fraction=min_tissue_fraction), (Keys.CLEAN,)),
        ]
        if noise_bands is not None:
            window = options.get("window", HUWindow())
            draws = [(table, keys, pool_noise_power(table, noise_bands, window, name))
                     for (table, keys), name in zip(draws, ("noisy pool", "clean pool"))]
        super().__init__(draws, **options)



class PairedCropStream(_CropStream):
    """Endless aligned (low-dose, reference) crops: same slice position, crop window and flips.

    Each crop is float32 (1, h, w) in [0, 1]. Args as for :class:`UnpairedCropStream`, with
    ``pairs`` instead of the two pools (the tissue filter keeps a slice when both images pass).
    """

    def __init__(
        self,
        pairs: Iterable[PairSelection],
        *,
        min_tissue_fraction: float = 0.0,
        cache: VolumeCache,
        **options: Any,
    ) -> None:
        table = pair_table(pairs, cache, min_tissue_fraction=min_tissue_fraction)
        super().__init__([(table, (Keys.LOW_DOSE, Keys.REFERENCE))], **options)


class PairedSliceDataset(Dataset):
    """Whole paired slices for evaluation, in selection order.

    Item ``i`` is a dict (see :class:`Keys`): ``low_dose``/``reference`` float32 (1, y, x) windowed
    to [0, 1]; ``low_dose_hu``/``reference_hu`` float32 (1, y, x) in HU; ``valid`` bool (1, y, x),
    False where either series has padding; ``pair`` (index into ``pairs``) and ``slice`` (index in
    the low-dose series).

    Raises:
        InputError: a pair's series differ in slice count, size, spacing, orientation or position.
    """

    def __init__(
        self,
        pairs: Iterable[PairSelection],
        *,
        window: HUWindow = HUWindow(),
        cache: VolumeCache,
    ) -> None:
        self.table = pair_table(pairs, cache)
        self.window = HUWindowd((Keys.LOW_DOSE, Keys.REFERENCE), window)


    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, Any]:
        (low, ref), (z_low, z_ref) = self.table.row(index)
        hu = {Keys.LOW_DOSE: np.array(low.hu[z_low], dtype=np.float32)[None],
              Keys.REFERENCE: np.array(ref.hu[z_ref], dtype=np.float32)[None]}
        valid = np.ones(hu[Keys.LOW_DOSE].shape, bool)
        for volume, z in ((low, z_low), (ref, z_ref)):
            if volume.padding_mask is not None:
                valid &= ~volume.padding_mask[z][None]
        windowed = apply_plain(self.window, dict(hu))
        return {
            Keys.LOW_DOSE: windowed[Keys.LOW_DOSE],
            Keys.REFERENCE: windowed[Keys.REFERENCE],
            Keys.LOW_DOSE_HU: torch.from_numpy(hu[Keys.LOW_DOSE]),
            Keys.REFERENCE_HU: torch.from_numpy(hu[Keys.REFERENCE]),
            Keys.VALID: torch.from_numpy(valid),
            Keys.PAIR: int(self.table.entry[index]),
            Keys.SLICE: z_low,
        }
