"""Natural-image pools and crop streams: which images each method's crops come from, and how."""

import matplotlib.image
import numpy as np
import pytest
import torch

from n2g_ct.datasets.images import (
    ImageCropStream,
    ImagePools,
    add_noise,
    image_files,
    load_image,
)
from n2g_ct.datasets.noise_models import NoiseModel
from n2g_ct.errors import InputError

COUNT, VALIDATION = 12, 2
NOISE = NoiseModel("gaussian", level=5)


def level(i: int) -> int:
    """Image i is flat at (50 + 12 i) / 255: a crop's mean tells which image it came from."""
    return 50 + 12 * i


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i in range(COUNT):
        matplotlib.image.imsave(folder / f"img_{i:02d}.png", np.full((40, 48, 3), level(i) / 255))
    return folder


@pytest.fixture(scope="module")
def pools(folder):
    return ImagePools.from_folder(folder, NOISE, color=True, validation_images=VALIDATION, seed=0, noise2noise=True)


def source(crop: torch.Tensor) -> int:
    return round((float(crop.mean()) * 255 - 50) / 12)


def test_the_folder_splits_into_disjoint_pools_and_validation(pools):
    half = (COUNT - VALIDATION) // 2
    assert [round(float(im.mean()) * 255) for im in pools.noisy_clean] == [level(i) for i in range(half)]
    assert [round(float(im.mean()) * 255) for im in pools.clean] == [level(i) for i in range(half, 2 * half)]
    assert [round(float(im.mean()) * 255) for im in pools.validation_clean] == [level(i) for i in (10, 11)]
    for noisy, clean in zip(pools.noisy, pools.noisy_clean):
        assert np.std(noisy - clean) * 255 == pytest.approx(5, rel=0.1)
    assert not np.array_equal(pools.noisy[0], pools.noisy_second[0])  # Noise2Noise: two realisations


def test_noise_realisations_are_fixed_by_the_seed(folder, pools):
    again = ImagePools.from_folder(folder, NOISE, color=True, validation_images=VALIDATION, seed=0)
    other = ImagePools.from_folder(folder, NOISE, color=True, validation_images=VALIDATION, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(pools.noisy, again.noisy))
    assert not np.array_equal(pools.noisy[0], other.noisy[0])


def stream(pools, method, pairs="original", **kw):
    return ImageCropStream(pools, method, pairs=pairs, crop_size=16, batch_size=8, seed=3, **kw)


def test_noise2grad_crops_are_noisy_from_the_first_half_and_clean_from_the_second(pools):
    noisy, clean = stream(pools, "noise2grad").batch(0)
    assert noisy.shape == clean.shape == (8, 3, 16, 16)
    assert {source(c) for c in noisy} <= set(range(5)) and {source(c) for c in clean} <= set(range(5, 10))
    assert all(float(c.std()) > 0.01 for c in noisy) and all(float(c.std()) < 1e-6 for c in clean)


def test_supervised_pairs_are_aligned_original_or_superposed(pools):
    noisy, clean = stream(pools, "supervised").batch(0)
    assert [source(c) for c in noisy] == [source(c) for c in clean] and {source(c) for c in clean} <= set(range(5))
    fake, target = stream(pools, "supervised", pairs="superposed").batch(0)
    assert {source(c) for c in target} <= set(range(5, 10))  # unrelated clean images ...
    noise = (fake - target) * 255
    assert float(noise.std()) == pytest.approx(5, rel=0.15)  # ... carrying the noisy pool's true noise
    noisy_residuals = np.concatenate([(n - c).ravel() for n, c in zip(pools.noisy, pools.noisy_clean)]) * 255
    assert np.isin(np.round(noise.numpy().ravel(), 3), np.round(noisy_residuals, 3)).mean() > 0.99


def test_noise2noise_pairs_are_two_realisations_of_one_crop(pools):
    first, second = stream(pools, "noise2noise").batch(0)
    assert [source(c) for c in first] == [source(c) for c in second]
    assert float((first - second).std()) * 255 == pytest.approx(5 * np.sqrt(2), rel=0.15)


def test_batches_depend_only_on_seed_and_index(pools):
    a = stream(pools, "noise2grad").batch(5)
    b = stream(pools, "noise2grad", start=5)
    assert all(torch.equal(x, y) for x, y in zip(a, next(iter(b))))
    assert not torch.equal(a[0], stream(pools, "noise2grad").batch(6)[0])


def test_grey_images_are_bt601_luma(folder, tmp_path):
    rgb = np.zeros((8, 8, 3))
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 1.0, 0.5, 0.0
    matplotlib.image.imsave(tmp_path / "c.png", rgb)
    grey = load_image(tmp_path / "c.png", color=False)
    red, green, blue = load_image(tmp_path / "c.png", color=True)
    assert grey.shape == (1, 8, 8) and float(red.mean()) == 1.0 and float(blue.mean()) == 0.0
    assert np.allclose(grey[0], 0.299 * red + 0.587 * green, atol=1e-6)
    assert load_image(image_files(folder)[0], color=True).shape == (3, 40, 48)


def test_bad_inputs_name_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="broken.png"):
        load_image(tmp_path / "broken.png", color=True)
    with pytest.raises(InputError, match="broken.png: not a folder"):
        image_files(tmp_path / "broken.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no images"):
        image_files(empty)


def test_crops_larger_than_an_image_are_refused(pools):
    with pytest.raises(InputError, match="smaller than the crop"):
        ImageCropStream(pools, "noise2grad", crop_size=64, batch_size=1).batch(0)


def test_add_noise_reports_each_images_level():
    images = [np.full((1, 8, 8), 0.5, np.float32)] * 3
    noisy, levels = add_noise(images, NoiseModel("gaussian", level_range=(0, 50)), seed=0)
    assert len(noisy) == 3 and len(set(levels)) == 3 and all(0 < v <= 50 for v in levels)
