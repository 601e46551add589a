"""CT image-quality measures: uniform ROIs, ROI noise, HU bias, the noise power spectrum, the BM3D PSD."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from n2g_ct.evaluation.bm3d import estimate_noise_psd, oracle_noise_psd, psd_for_bm3d
from n2g_ct.quality.ct_measures import (
    bone_mask,
    edge_mask,
    find_uniform_rois,
    gaussian_smooth,
    masked_error,
    noise_power_spectrum,
    radial_nps,
    roi_hu_bias,
    roi_noise_std,
    roi_patches,
)

SPACING = (0.5, 0.8)  # (Δy, Δx) mm


def flat_phantom(size: int = 128, value_hu: float = 40.0) -> np.ndarray:
    """(size, size) HU: a flat soft-tissue disc in air."""
    yy, xx = np.mgrid[:size, :size]
    return np.where(np.hypot(yy - size / 2, xx - size / 2) < 0.45 * size, value_hu, -1000.0)


def plane_free(patches: np.ndarray) -> np.ndarray:
    """Patches minus their least-squares plane (computed independently of the library)."""
    n, ny, nx = patches.shape
    rows, cols = np.mgrid[:ny, :nx]
    design = np.stack([np.ones(ny * nx), rows.ravel(), cols.ravel()], axis=1)
    flat = patches.reshape(n, -1)
    fit = np.linalg.lstsq(design, flat.T, rcond=None)[0]
    return (flat - (design @ fit).T).reshape(patches.shape)


def test_roi_noise_std_of_gaussian_noise_on_a_flat_phantom_is_sigma():
    reference = flat_phantom()
    noisy = reference + np.random.default_rng(0).normal(0, 25.0, reference.shape)
    corners = find_uniform_rois(reference, size_px=16)
    assert len(corners) >= 8
    assert np.all(roi_patches(reference, corners, 16) == 40.0), "the flattest squares lie wholly inside the disc"
    assert roi_noise_std(noisy, corners, 16) == pytest.approx(25.0, rel=0.04)
    assert roi_noise_std(reference, corners, 16) == 0.0


def test_rois_avoid_edges_padding_and_non_soft_tissue():
    rng = np.random.default_rng(1)
    image = np.zeros((96, 96))
    image[:, 44:] = 120.0  # a vertical edge at column 44, inside the middle grid square
    image[:16] = 600.0  # bone band: out of the soft-tissue range
    image += rng.normal(0, 10, image.shape)
    valid = np.ones(image.shape, bool)
    valid[80:] = False  # padding at the bottom
    corners = find_uniform_rois(image, valid, size_px=16, keep_fraction=0.5)
    assert len(corners) > 0
    for row, col in corners:
        assert not col < 44 < col + 16, "no ROI straddles the edge"
        assert row >= 16 and row + 16 <= 80, "none in bone or padding"
    assert len(find_uniform_rois(np.full((64, 64), -800.0), size_px=16)) == 0, "lung/air gives no ROI"


def test_hu_bias_detects_a_20_hu_shift():
    reference = flat_phantom()
    rng = np.random.default_rng(2)
    corners = find_uniform_rois(reference, size_px=16)
    unbiased = reference + rng.normal(0, 30, reference.shape)
    shifted = unbiased + 20.0
    assert abs(roi_hu_bias(unbiased, reference, corners, 16)) < 3.0
    assert roi_hu_bias(shifted, reference, corners, 16) == pytest.approx(roi_hu_bias(unbiased, reference, corners, 16) + 20.0)
    assert np.isnan(roi_hu_bias(shifted, reference, corners[:0], 16)) and np.isnan(roi_noise_std(shifted, corners[:0], 16))


def test_nps_of_white_noise_is_flat_and_integrates_to_the_variance():
    sigma, n = 10.0, 32
    patches = np.random.default_rng(3).normal(0, sigma, (300, n, n))
    nps = noise_power_spectrum(patches, SPACING)  # HU²·mm²
    df_y, df_x = 1 / (n * SPACING[0]), 1 / (n * SPACING[1])  # cycles/mm
    integral = nps.sum() * df_y * df_x  # HU²
    assert integral == pytest.approx(plane_free(patches).var(axis=(1, 2)).mean(), rel=1e-9)  # Parseval, exact
    assert integral == pytest.approx(sigma**2, rel=0.03)
    frequency, radial = radial_nps(nps, SPACING)
    # Flat at σ²·Δy·Δx; the lowest ring loses the plane that detrending removes.
    assert radial[1:] == pytest.approx(np.full(len(radial) - 1, sigma**2 * SPACING[0] * SPACING[1]), rel=0.1)
    assert 0.6 < radial[0] / radial[1:].mean() < 1.0
    assert frequency[-1] <= 0.5 / max(SPACING) + 1e-12 and frequency[0] == pytest.approx(max(df_y, df_x))
    ramp = 3.0 * np.mgrid[:n, :n][0] + 500.0  # anatomy-like offset and gradient are detrended away
    np.testing.assert_allclose(noise_power_spectrum(patches + ramp, SPACING), nps, rtol=1e-6, atol=1e-9)


def test_nps_of_blurred_noise_falls_at_high_frequency():
    noise = gaussian_filter(np.random.default_rng(4).normal(0, 1, (100, 32, 32)), (0, 1.5, 1.5))
    _, radial = radial_nps(noise_power_spectrum(noise, SPACING), SPACING)
    assert radial[-1] < 0.02 * radial[0]
    assert np.all(np.diff(radial) < 0), "monotone fall-off"


def test_bm3d_psd_from_the_low_dose_slice_alone_matches_the_oracle():
    reference = flat_phantom(192) + gaussian_filter(np.random.default_rng(5).normal(0, 1, (192, 192)), 8) * 200
    noise = gaussian_filter(np.random.default_rng(6).normal(0, 1, reference.shape), 1.0)
    noise *= 40.0 / noise.std()
    estimated = estimate_noise_psd(reference + noise)
    oracle = oracle_noise_psd(reference + noise, reference)
    assert estimated is not None and oracle is not None and estimated.shape == reference.shape

    def variance(psd: np.ndarray) -> float:
        return psd.mean() / psd.size  # bm3d's convention: mean(PSD) = variance · M·N

    assert 0.8 * 40.0**2 < variance(oracle) <= 40.0**2  # 16-px ROIs lose the lowest frequencies (plane removed)
    assert variance(estimated) == pytest.approx(variance(oracle), rel=0.2)
    low, high = estimated[1, 1], estimated[96, 96]  # near zero and at the Nyquist frequency
    assert high < 0.1 * low, "the estimate keeps the correlated (low-pass) shape"
    assert estimate_noise_psd(np.full((64, 64), -1000.0)) is None, "no soft tissue: no estimate"


def test_psd_for_bm3d_keeps_the_spectrum_on_a_finer_grid():
    noise = gaussian_filter(np.random.default_rng(7).normal(0, 10, (400, 16, 16)), (0, 1.0, 1.0), mode="wrap")
    nps_px = noise_power_spectrum(noise, (1.0, 1.0))
    psd = psd_for_bm3d(nps_px, (64, 48))
    assert psd.shape == (64, 48) and psd.min() >= 0
    assert psd.mean() / psd.size == pytest.approx(nps_px.mean(), rel=0.01), "variance kept"
    np.testing.assert_allclose(psd[::4, ::3] / psd.size, nps_px, rtol=0.05, atol=0.02 * nps_px.max())


def bone_phantom(size: int = 96) -> np.ndarray:
    """(size, size) HU: a soft-tissue disc holding a dense bone ring, in air."""
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - size / 2, xx - size / 2)
    return np.select([radius < 0.2 * size, radius < 0.28 * size, radius < 0.45 * size], [40.0, 1000.0, 40.0], -1000.0)


def test_bone_and_edge_masks_find_the_dense_ring_and_the_boundaries_not_the_noise():
    reference = bone_phantom()
    noisy = reference + np.random.default_rng(8).normal(0, 10, reference.shape)
    bone = bone_mask(noisy)
    assert bone.sum() == (reference > 300).sum() and np.all(reference[bone] == 1000.0)
    edges = edge_mask(noisy, (0.7, 0.7))
    yy, xx = np.mgrid[:96, :96]
    radius = np.hypot(yy - 48, xx - 48)
    boundaries = np.abs(radius[..., None] - np.array([0.2, 0.28, 0.45]) * 96).min(axis=-1)
    assert edges.any() and boundaries[edges].max() <= 4.0, "edge voxels lie on the three boundaries only"
    assert edges[boundaries <= 0.5].mean() > 0.95, "and cover them"
    valid = np.zeros(reference.shape, bool)
    assert not edge_mask(noisy, (0.7, 0.7), valid).any() and not bone_mask(noisy, valid).any()


def test_blurring_raises_the_edge_and_bone_error_above_the_noisy_inputs_and_a_shift_shows_as_bias():
    reference = bone_phantom()
    noisy = reference + np.random.default_rng(9).normal(0, 15, reference.shape)
    blurred = gaussian_smooth(noisy, 1.5)
    edges, bone = edge_mask(reference, (0.7, 0.7)), bone_mask(reference)
    assert masked_error(blurred, reference, edges)[0] > 3 * masked_error(noisy, reference, edges)[0]
    assert masked_error(blurred, reference, bone)[0] > masked_error(noisy, reference, bone)[0]
    rmse, bias = masked_error(noisy - 30.0, reference, bone)
    assert bias == pytest.approx(masked_error(noisy, reference, bone)[1] - 30.0) and rmse > 30.0
    assert all(np.isnan(masked_error(noisy, reference, np.zeros(reference.shape, bool))))


def test_gaussian_smooth_keeps_the_mean_and_matches_scipy():
    image = np.random.default_rng(10).normal(0, 1, (40, 30))
    np.testing.assert_allclose(gaussian_smooth(image, (2.0, 0.5)), gaussian_filter(image, (2.0, 0.5), mode="reflect",
                                                                                   truncate=3.0), atol=1e-3)
    assert gaussian_smooth(image, 0.0) == pytest.approx(image)
