"""Reference-free self-checks: a perfect denoiser and the identity pass; a biased, a blurring and a
broken denoiser are caught, each by the check that describes its harm."""

from __future__ import annotations

import math

import numpy as np
import pytest
from factories import correlated_noise, smooth_images

from n2g_ct.quality.ct_measures import gaussian_smooth
from n2g_ct.quality.self_check import SelfCheck, SelfCheckLimits

SIZE, SLICES, SPACING = 128, 3, (0.8, 0.8)


@pytest.fixture(scope="module")
def slices():
    """(clean, noisy) slices: a soft-tissue body with smooth organ texture and a bone ring, in air,
    with 40 HU of correlated noise."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    radius = np.hypot(yy - SIZE / 2, xx - SIZE / 2)
    texture = smooth_images(SLICES, SIZE, seed=3, contrast_hu=25.0)
    clean = np.where(radius < 0.45 * SIZE, 40.0 + texture, -1000.0)
    clean[:, (radius > 0.16 * SIZE) & (radius < 0.22 * SIZE)] = 900.0
    noisy = clean + correlated_noise(clean.shape, 40.0, seed=4)
    return clean, noisy


def check(slices, denoise) -> object:
    clean, noisy = slices
    checker = SelfCheck()
    for c, x in zip(clean, noisy):
        checker.add(x, denoise(c, x), SPACING)
    return checker.result()


def test_a_perfect_denoiser_passes_with_no_shift_and_at_most_the_noise_removed(slices):
    result = check(slices, lambda clean, noisy: clean)
    assert result.passed, result.failures
    assert abs(result.hu_shift_hu) < 2.0 and result.shift_rois > 10
    assert result.removed_noise_ratio < 1.5, "it removes the noise, about as much as the uniform ROIs show"
    assert result.noise_std_hu == pytest.approx(40.0, rel=0.2)
    assert 0.5 < result.edge_ratio < 1.5, "noise removal does not care where edges are"


def test_the_identity_passes_and_removes_nothing(slices):
    result = check(slices, lambda clean, noisy: noisy)
    assert result.passed and result.removed_std_hu == 0.0 and result.removed_noise_ratio == 0.0


def test_a_denoiser_that_shifts_ct_numbers_fails_the_shift_check(slices):
    result = check(slices, lambda clean, noisy: clean - 12.0)
    assert not result.passed and result.hu_shift_hu == pytest.approx(-12.0, abs=2.0)
    assert any("HU shift" in failure for failure in result.failures)
    assert len(result.failures) == 1, "a shift is neither blurring nor removal of anatomy"


def test_a_blurring_denoiser_fails_as_removing_anatomy_at_edges(slices):
    result = check(slices, lambda clean, noisy: gaussian_smooth(noisy, 4.0))
    assert not result.passed
    assert result.removed_noise_ratio > 3.0 and result.edge_ratio > 4.0
    assert any("anatomy" in failure for failure in result.failures)
    assert any("edges" in failure for failure in result.failures)


def test_a_broken_denoiser_cannot_hide_behind_its_own_output(slices):
    result = check(slices, lambda clean, noisy: np.full_like(noisy, -1024.0))
    assert not result.passed and result.removed_noise_ratio > 100


def test_limits_are_validated_and_an_empty_check_has_no_result(slices):
    with pytest.raises(ValueError, match="max_hu_shift must be > 0"):
        SelfCheckLimits(max_hu_shift=0.0)
    with pytest.raises(ValueError, match="no slice"):
        SelfCheck().result()
    strict = SelfCheck(SelfCheckLimits(max_hu_shift=0.5))
    clean, noisy = slices
    strict.add(noisy[0], clean[0] + 1.0, SPACING)
    assert not strict.result().passed, "limits are configurable"


def test_a_slice_without_soft_tissue_gives_no_shift_but_still_a_removal_check():
    rng = np.random.default_rng(0)
    lung = -850.0 + rng.normal(0, 30, (64, 64))
    checker = SelfCheck()
    checker.add(lung, np.full_like(lung, -850.0), SPACING)
    result = checker.result()
    assert math.isnan(result.hu_shift_hu) and math.isnan(result.removed_noise_ratio)
    assert result.passed and "nan" in result.describe()


def test_edges_are_only_judged_where_the_slices_show_their_noise(slices):
    """A disc too small for a noise ROI: what is removed away from its edges is no yardstick."""
    clean, noisy = slices
    small = (slice(None), slice(48, 80), slice(48, 80))  # the bone ring and a little tissue, 32²
    blurring = check((clean[small], noisy[small]), lambda clean, noisy: gaussian_smooth(noisy, 4.0))
    assert math.isnan(blurring.noise_std_hu) and math.isnan(blurring.edge_ratio)
    assert check(slices, lambda clean, noisy: gaussian_smooth(noisy, 4.0)).edge_ratio > 4.0
