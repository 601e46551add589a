"""The paper's synthetic noise models: levels, statistics, clipping, seeding."""

import numpy as np
import pytest

from n2g_ct.datasets.noise_models import NoiseModel


def flat(value: float, shape=(3, 128, 128)) -> np.ndarray:
    return np.full(shape, value, np.float32)


def test_gaussian_noise_has_the_std_sigma_over_255():
    noisy, level = NoiseModel("gaussian", level=25).apply(flat(0.5), np.random.default_rng(0))
    assert level == 25
    assert np.std(noisy - 0.5) == pytest.approx(25 / 255, rel=0.02)
    assert abs(np.mean(noisy - 0.5)) < 0.002


def test_speckle_noise_is_multiplicative_with_variance_v():
    clean = flat(0.3)
    noisy, _ = NoiseModel("speckle", level=0.1).apply(clean, np.random.default_rng(0))
    relative = (noisy - clean) / clean
    assert np.var(relative) == pytest.approx(0.1, rel=0.03)
    assert np.abs(relative).max() <= np.sqrt(0.3) + 1e-5  # uniform on [-sqrt(3v), sqrt(3v)]
    dark, _ = NoiseModel("speckle", level=0.1).apply(flat(0.0), np.random.default_rng(0))
    assert np.all(dark == 0)  # no signal, no speckle


def test_poisson_noise_is_unbiased_with_variance_y_over_lambda():
    noisy, _ = NoiseModel("poisson", level=30).apply(flat(0.4), np.random.default_rng(0))
    assert np.mean(noisy) == pytest.approx(0.4, rel=0.01)
    assert np.var(noisy) == pytest.approx(0.4 / 30, rel=0.03)
    assert np.allclose(noisy * 30, np.round(noisy * 30), atol=1e-4)  # counts / λ


@pytest.mark.parametrize("model", [NoiseModel("gaussian", level=50), NoiseModel("speckle", level=0.2),
                                   NoiseModel("poisson", level=5)])
def test_noisy_images_are_clipped_to_the_unit_range_and_seeded(model):
    clean = np.random.default_rng(1).uniform(0, 1, (1, 64, 64)).astype(np.float32)
    first, _ = model.apply(clean, np.random.default_rng(7))
    again, _ = model.apply(clean, np.random.default_rng(7))
    other, _ = model.apply(clean, np.random.default_rng(8))
    assert first.dtype == np.float32 and first.shape == clean.shape
    assert first.min() >= 0 and first.max() <= 1
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_a_level_range_draws_one_level_per_image_within_it():
    model = NoiseModel("gaussian", level_range=(0, 50))
    draws = [model.apply(flat(0.5, (1, 64, 64)), np.random.default_rng(i)) for i in range(40)]
    levels = np.array([level for _, level in draws])
    assert levels.min() > 0 and levels.max() <= 50 and levels.std() > 8
    stds = np.array([np.std(noisy - 0.5) * 255 for noisy, _ in draws])
    assert np.allclose(stds, levels, rtol=0.1, atol=0.5)  # each image carries its own level


@pytest.mark.parametrize("kwargs", [{"kind": "salt"}, {"kind": "gaussian"}, {"kind": "gaussian", "level": -1},
                                    {"kind": "poisson", "level": 5, "level_range": (5, 50)},
                                    {"kind": "speckle", "level_range": (0.2, 0.1)}])
def test_bad_noise_models_are_refused(kwargs):
    with pytest.raises(ValueError):
        NoiseModel(**kwargs)


def test_names_state_the_level():
    assert NoiseModel("gaussian", level=25).name == "gaussian σ=25"
    assert NoiseModel("poisson", level_range=(5, 50)).name == "poisson λ∈[5, 50]"
