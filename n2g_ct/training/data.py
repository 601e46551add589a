"""The trainer's data: crop batches per step and periodic validation, from a config's data section."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from n2g_ct.datasets.cache import VolumeCache
from n2g_ct.datasets.manifest import load_split
from n2g_ct.datasets.selection import SliceSelection, evenly_spaced
from n2g_ct.datasets.slices import PairedCropStream, PairedSliceDataset, UnpairedCropStream, pair_table, slice_pool
from n2g_ct.datasets.transforms import Keys
from n2g_ct.inference.denoiser import Denoiser, denoise_image
from n2g_ct.methods.noise_scale import band_centres
from n2g_ct.quality.metrics import IMAGE_RANGE, psnr, ssim, windowed_scores
from n2g_ct.quality.self_check import SelfCheck, SelfCheckResult
from n2g_ct.training.config import DataConfig, ImageDataConfig, TrainConfig


@dataclass(frozen=True)
class Validation:
    """Periodic validation of a run.

    Attributes:
        score: F → mean scores over the validation images by name (e.g. ``psnr_display``).
        primary: the score that picks ``best.pt`` (higher is better), and the learning curves'.
        label: what ``primary`` measures, for plot axes.
    """

    score: Callable[[nn.Module], dict[str, float]]
    primary: str
    label: str


def _pools(data: DataConfig) -> tuple[tuple[SliceSelection, ...], tuple[SliceSelection, ...]]:
    if data.manifest is None:
        return data.noisy, data.clean
    split = load_split(data.manifest, data.split, data.data_root)
    return split.noisy, split.clean


def _rank0_first(rank: int, world_size: int, build: Callable[[], object]) -> object:
    """``build()`` on rank 0 first (it fills the cache), then on the other ranks (they reuse it)."""
    if world_size > 1 and rank != 0:
        dist.barrier()
    result = build()
    if world_size > 1 and rank == 0:
        dist.barrier()
    return result


def build_training_batches(
    config: TrainConfig, rank: int = 0, world_size: int = 1, first_step: int = 1
) -> Iterator[dict[str, Tensor]]:
    """Endless batches for steps ``first_step, first_step + 1, ...`` of this rank.

    Noise2Grad batches hold ``noisy`` and ``clean`` (independent draws from the two pools); the
    supervised and Noise2Noise batches hold aligned ``input`` and ``target`` crops. Each is
    (B, C, h, w) float32 in [0, 1]. The batch of step ``t`` depends only on (seed, rank, t).
    """
    data = config.data
    keys = ("noisy", "clean") if config.method.name == "noise2grad" else ("input", "target")
    if _measures_noise(config):
        keys += ("noise_power", "clean_power")
    if data.images is not None:
        stream = _image_stream(config, rank, world_size, first_step)
    else:
        stream = _ct_stream(config, rank, world_size, first_step)
    loader = DataLoader(stream, batch_size=None, num_workers=data.num_workers,
                        persistent_workers=data.num_workers > 0)
    for batch in loader:
        yield dict(zip(keys, batch))


def _ct_stream(config: TrainConfig, rank: int, world_size: int, first_step: int):
    data = config.data
    options = dict(
        batch_size=config.optim.batch_size,
        crop_size=(data.crop_size, data.crop_size),
        window=data.window,
        seed=config.run.seed,
        rank=rank,
        world_size=world_size,
        start=first_step - 1,
        cache=VolumeCache(data.cache_dir),
    )
    if config.method.name == "noise2grad":
        noisy, clean = _pools(data)
        bands = band_centres().numpy() if _measures_noise(config) else None
        return _rank0_first(rank, world_size, lambda: UnpairedCropStream(noisy, clean, noise_bands=bands, **options))
    return _rank0_first(rank, world_size, lambda: PairedCropStream(data.paired, **options))


def _measures_noise(config: TrainConfig) -> bool:
    """Whether batches carry each noisy crop's measured noise power (Noise2Grad's ``measured`` scale)."""
    return config.method.name == "noise2grad" and config.method.noise2grad.noise_scale == "measured"


@functools.lru_cache(maxsize=2)
def _image_pools(images: ImageDataConfig, noise2noise: bool = False):
    """The pools of ``images``, read and noised once per process (training and validation share them)."""
    from n2g_ct.datasets.images import ImagePools

    return ImagePools.from_folder(images.folder, images.noise, color=images.color,
                                  validation_images=images.validation_images, seed=images.noise_seed,
                                  noise2noise=noise2noise)


def _image_stream(config: TrainConfig, rank: int, world_size: int, first_step: int):
    from n2g_ct.datasets.images import ImageCropStream

    images = config.data.images
    pools = _image_pools(images, config.method.name == "noise2noise")
    return ImageCropStream(pools, config.method.name, pairs=images.pairs, crop_size=config.data.crop_size,
                           batch_size=config.optim.batch_size, seed=config.run.seed, rank=rank,
                           world_size=world_size, start=first_step - 1)


def _image_validation(images: ImageDataConfig, device: torch.device) -> Validation:
    pools = _image_pools(images)

    @torch.no_grad()
    def score(network: nn.Module) -> dict[str, float]:
        network.eval()
        psnrs, ssims = [], []
        for noisy, clean in zip(pools.validation_noisy, pools.validation_clean):
            output = denoise_image(network, noisy, device)
            reference = torch.from_numpy(clean)[None]
            psnrs.append(psnr(output, reference, IMAGE_RANGE))
            ssims.append(ssim(output, reference, IMAGE_RANGE))
        return {"psnr": float(torch.cat(psnrs).mean()), "ssim": float(torch.cat(ssims).mean())}

    return Validation(score, "psnr", "validation PSNR (dB), images in [0, 1]")


def build_validation(data: DataConfig, device: torch.device) -> Validation | None:
    """Scoring of the denoiser on the validation images, or None when none are configured.

    Natural images (``data.images``): mean PSNR and SSIM (``psnr``, ``ssim``; data range 1) on
    the held-out images. CT: it runs F as inference does (:class:`n2g_ct.inference.denoiser.Denoiser`) and returns the mean PSNR (dB)
    and SSIM over the slices in both windows of :mod:`n2g_ct.quality.metrics` (keys ``psnr_display``,
    ``ssim_display``, ``psnr_full``, ``ssim_full``), padding excluded.
    """
    if data.images is not None:
        return _image_validation(data.images, device)
    if not data.validation:
        return None
    dataset = PairedSliceDataset(data.validation, window=data.window, cache=VolumeCache(data.cache_dir))
    count = len(dataset) if data.validation_slices == 0 else min(data.validation_slices, len(dataset))
    subset = Subset(dataset, evenly_spaced(len(dataset), count).tolist())

    def score(network: nn.Module) -> dict[str, float]:
        network.eval()
        denoise = Denoiser(network, data.window, "validation", device)
        scores: dict[str, list[Tensor]] = {}
        for item in DataLoader(subset, batch_size=1):
            reference, valid = item[Keys.REFERENCE_HU], item[Keys.VALID]
            output = torch.from_numpy(denoise(item[Keys.LOW_DOSE_HU][:, 0].numpy()))[:, None]
            for name, values in windowed_scores(output, reference, valid).items():
                scores.setdefault(name, []).append(values)
        return {name: float(torch.cat(values).mean()) for name, values in scores.items()}

    return Validation(score, "psnr_display", "validation PSNR (dB), window [-160, 240] HU")


def build_self_check(config: TrainConfig, device: torch.device) -> Callable[[nn.Module], SelfCheckResult] | None:
    """The reference-free self-check of F (:mod:`n2g_ct.quality.self_check`) on slices the run learns to denoise.

    The slices: ``run.self_check_slices`` evenly spaced over the noisy pool (Noise2Grad) or the
    paired low-dose inputs (baselines), whole, denoised as inference does. None for natural-image
    runs or when ``run.self_check_every`` is 0.
    """
    data = config.data
    if data.images is not None or config.run.self_check_every == 0:
        return None
    cache = VolumeCache(data.cache_dir)
    if config.method.name == "noise2grad":
        table = slice_pool("self-check slices", _pools(data)[0], cache)
    else:
        table = pair_table(data.paired, cache)
    rows = evenly_spaced(len(table), config.run.self_check_slices)
    slices = []
    for row in rows:
        volumes, zs = table.row(int(row))
        volume, z = volumes[0], zs[0]
        valid = None if volume.padding_mask is None else ~np.asarray(volume.padding_mask[z])
        slices.append((np.asarray(volume.hu[z], np.float32), valid, (volume.spacing_xyz[1], volume.spacing_xyz[0])))

    def check(network: nn.Module) -> SelfCheckResult:
        network.eval()
        denoise = Denoiser(network, data.window, "self-check", device)
        checker = SelfCheck()
        for hu, valid, spacing in slices:
            denoised = denoise(hu[None])[0]
            checker.add(hu, denoised if valid is None else np.where(valid, denoised, hu), spacing, valid)
        return checker.result()

    return check
