"""CT image-quality measures on HU slices: noise in uniform ROIs, mean-HU bias, noise power spectrum.

Pure numpy functions (float64 internally). Conventions:

- An ROI is a ``size × size`` pixel square given by its top-left corner (row, column). ROIs are
  laid on a regular grid of non-overlapping squares centred on the slice (:func:`grid_corners`).
- *Uniform ROIs* (:func:`find_uniform_rois`) are found automatically on one image (for paired
  evaluation: the reference). The square is cut into 4 × 4 blocks; averaging over a block removes
  most of the noise but keeps anatomy. Candidates are grid squares wholly inside the field of view
  whose 16 block means all lie in the soft-tissue range (default [-100, 150] HU: fat, muscle,
  parenchyma, blood; no lung, air, bone or dense contrast anywhere in the square). Their
  *structure score* is the standard deviation of the block means (edges, gradients), which ranks
  squares by anatomy more than by noise.
  The flattest ``keep_fraction`` (default a quarter) of the candidates are kept. Ranking rather
  than an absolute threshold makes the rule independent of the dose and the reconstruction kernel.
- Noise std in ROIs is the pooled sample standard deviation of an image inside the ROIs (what a
  radiologist measures with an ROI tool); the HU bias is the mean of (output − reference) over the
  ROI pixels (a denoiser must not shift CT numbers).
- NPS (ICRU Report 87; Dobbins 2000): each ROI minus its least-squares plane,
  ``NPS(f) = Δy·Δx / (Ny·Nx) · ⟨|DFT(roi)|²⟩`` over ROIs, in HU²·mm² with spatial frequency in
  cycles/mm; ``Σ NPS · Δf_y · Δf_x`` equals the mean variance of the detrended ROIs (Parseval).
- Do-no-harm regions (found on the reference): *bone* is every voxel above
  :data:`BONE_THRESHOLD_HU`; *edges* are voxels where the reference, smoothed by a Gaussian of
  :data:`EDGE_SMOOTHING_MM`, changes by at least :data:`EDGE_GRADIENT_HU_PER_MM` (organ, vessel, fat,
  bone and air boundaries; a 150 HU fat/muscle step blurred by a 1 mm system reaches about
  50 HU/mm). A denoiser that blurs or shifts them shows a larger error there than the input's
  noise alone (:func:`masked_error`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SOFT_TISSUE_HU = (-100.0, 150.0)
"""Mean HU range of candidate uniform ROIs."""
DEFAULT_ROI_SIZE_PX = 16
"""ROI side in pixels (≈ 11 mm at 0.7 mm pixels): small enough to fit between organ boundaries in
patient images (32 px ROIs on a chest series mostly straddle fat/muscle edges); gives 8 NPS rings."""
DEFAULT_KEEP_FRACTION = 0.25
"""Share of the candidate squares (the flattest) kept as uniform ROIs."""
_BLOCKS_PER_SIDE = 4
BONE_THRESHOLD_HU = 300.0
"""Reference voxels above this HU are bone (or dense contrast) for the do-no-harm statistics."""
NOISE_SELECTION_SMOOTHING_PX = 2.0
"""Gaussian σ, pixels, of the copy of a noisy image on which :func:`estimate_noise_nps` chooses its ROIs."""
EDGE_SMOOTHING_MM = 1.0
"""Gaussian σ, mm, applied to the reference before its gradient is taken (keeps its noise out)."""
EDGE_GRADIENT_HU_PER_MM = 50.0
"""Smoothed reference gradients at least this steep mark edge voxels."""


def grid_corners(shape_yx: Sequence[int], size_px: int) -> np.ndarray:
    """Top-left corners of the non-overlapping ``size_px`` squares tiling a slice, grid centred.

    Args:
        shape_yx: (rows, columns) of the slice.
        size_px: square side in pixels.

    Returns:
        (n, 2) int64 (row, column) corners, row-major order.

    >>> grid_corners((10, 9), 4).tolist()
    [[1, 0], [1, 4], [5, 0], [5, 4]]
    """
    if size_px < 1:
        raise ValueError(f"ROI size must be ≥ 1 pixel, got {size_px}")
    starts = [np.arange(n // size_px) * size_px + (n % size_px) // 2 for n in shape_yx]
    rows, cols = np.meshgrid(*starts, indexing="ij")
    return np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.int64)


def roi_patches(image: np.ndarray, corners: np.ndarray, size_px: int) -> np.ndarray:
    """The ROIs of a (y, x) image as a float64 (n, size_px, size_px) stack."""
    corners = np.asarray(corners, dtype=np.int64).reshape(-1, 2)
    offsets = np.arange(size_px)
    rows = corners[:, 0, None, None] + offsets[None, :, None]
    cols = corners[:, 1, None, None] + offsets[None, None, :]
    return np.asarray(image, dtype=np.float64)[rows, cols]


def check_roi_settings(size_px: int, keep_fraction: float) -> None:
    """ValueError unless ``size_px`` is a multiple of 4, ≥ 8, and ``keep_fraction`` is in (0, 1]."""
    if size_px < 2 * _BLOCKS_PER_SIDE or size_px % _BLOCKS_PER_SIDE:
        raise ValueError(f"ROI size must be a multiple of {_BLOCKS_PER_SIDE} and ≥ {2 * _BLOCKS_PER_SIDE} pixels, got {size_px}")
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")


def find_uniform_rois(
    image_hu: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    size_px: int = DEFAULT_ROI_SIZE_PX,
    hu_range: Sequence[float] = SOFT_TISSUE_HU,
    keep_fraction: float = DEFAULT_KEEP_FRACTION,
) -> np.ndarray:
    """Uniform soft-tissue ROIs of one slice (rule in the module docstring).

    Args:
        image_hu: (y, x) HU slice the ROIs are found on (the reference in paired evaluation).
        valid: (y, x) bool, False at padding; ROIs lie wholly where it is True. None: all valid.
        size_px: ROI side in pixels, a multiple of 4 and ≥ 8.
        hu_range: (low, high) HU every block mean of the ROI must lie in.
        keep_fraction: in (0, 1]; the flattest share of the candidates that is kept (at least one).

    Returns:
        (n, 2) int64 top-left corners, n ≥ 0, flattest first.
    """
    check_roi_settings(size_px, keep_fraction)
    corners = grid_corners(image_hu.shape, size_px)
    if valid is not None:
        corners = corners[roi_patches(valid, corners, size_px).all(axis=(1, 2))]
    patches = roi_patches(image_hu, corners, size_px)
    block = size_px // _BLOCKS_PER_SIDE
    block_means = patches.reshape(len(patches), _BLOCKS_PER_SIDE, block, _BLOCKS_PER_SIDE, block).mean(axis=(2, 4))
    candidates = ((block_means >= hu_range[0]) & (block_means <= hu_range[1])).all(axis=(1, 2))
    corners, block_means = corners[candidates], block_means[candidates]
    if len(corners) == 0:
        return corners
    score = block_means.std(axis=(1, 2))
    order = np.argsort(score, kind="stable")
    return corners[order[: max(1, int(np.floor(keep_fraction * len(order))))]]


def estimate_noise_nps(
    image_hu: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    size_px: int = DEFAULT_ROI_SIZE_PX,
    hu_range: Sequence[float] = SOFT_TISSUE_HU,
    keep_fraction: float = DEFAULT_KEEP_FRACTION,
) -> tuple[np.ndarray | None, int]:
    """The noise NPS of one noisy slice from its own uniform soft-tissue ROIs (no reference).

    The ROIs (:func:`find_uniform_rois`) are chosen on a copy smoothed by a Gaussian of
    :data:`NOISE_SELECTION_SMOOTHING_PX` pixels, and the NPS is measured on the slice itself. Chosen
    on the noisy slice, the flattest squares would be those where the noise happens to be weakest,
    which underestimates strong noise (by about a quarter of its std at 100 HU).

    Args:
        image_hu: (y, x) HU of a noisy slice.
        valid: (y, x) bool, False at padding; None: all valid.
        size_px, hu_range, keep_fraction: as for :func:`find_uniform_rois`.

    Returns:
        (NPS (size_px, size_px) in HU² per pixel² (spacing 1, numpy FFT order), number of ROIs);
        (None, 0) when the slice holds no uniform soft-tissue ROI.
    """
    smoothed = gaussian_smooth(image_hu, NOISE_SELECTION_SMOOTHING_PX)
    corners = find_uniform_rois(smoothed, valid, size_px=size_px, hu_range=hu_range, keep_fraction=keep_fraction)
    if len(corners) == 0:
        return None, 0
    return noise_power_spectrum(roi_patches(image_hu, corners, size_px), (1.0, 1.0)), len(corners)


def roi_noise_std(image_hu: np.ndarray, corners: np.ndarray, size_px: int) -> float:
    """Pooled noise standard deviation (HU) of an image inside the ROIs.

    ``sqrt(mean_i var_i)`` with ``var_i`` the sample variance (ddof 1) of ROI ``i``. NaN when there
    is no ROI.
    """
    if len(corners) == 0:
        return float("nan")
    return float(np.sqrt(roi_patches(image_hu, corners, size_px).var(axis=(1, 2), ddof=1).mean()))


def roi_hu_bias(output_hu: np.ndarray, reference_hu: np.ndarray, corners: np.ndarray, size_px: int) -> float:
    """Mean CT-number shift (HU) of an output against the reference over the ROI pixels.

    ``mean(output − reference)`` over all ROI pixels (equal-size ROIs, so the mean of the per-ROI
    mean differences). NaN when there is no ROI.
    """
    if len(corners) == 0:
        return float("nan")
    difference = np.asarray(output_hu, np.float64) - np.asarray(reference_hu, np.float64)
    return float(roi_patches(difference, corners, size_px).mean())


def _detrend_plane(patches: np.ndarray) -> np.ndarray:
    """Each (ny, nx) patch minus its least-squares plane ``a + b·row + c·column``."""
    n, ny, nx = patches.shape
    rows, cols = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64), indexing="ij")
    design = np.stack([np.ones(ny * nx), rows.ravel() - rows.mean(), cols.ravel() - cols.mean()], axis=1)
    flat = patches.reshape(n, ny * nx).T
    coefficients, *_ = np.linalg.lstsq(design, flat, rcond=None)
    return (flat - design @ coefficients).T.reshape(n, ny, nx)


def noise_power_spectrum(patches_hu: np.ndarray, pixel_spacing_mm: Sequence[float]) -> np.ndarray:
    """2-D noise power spectrum of a stack of noise ROIs (plane-detrended), in HU²·mm².

    Args:
        patches_hu: (n, Ny, Nx) HU, n ≥ 1 (e.g. :func:`roi_patches` of output − reference).
        pixel_spacing_mm: (Δy, Δx), row and column spacing in mm.

    Returns:
        (Ny, Nx) NPS in numpy FFT order (zero frequency at [0, 0]); frequencies
        ``np.fft.fftfreq(N, Δ)`` in cycles/mm. ``NPS.sum() / (Ny·Δy·Nx·Δx)`` is the mean variance
        of the detrended patches; white noise of variance σ² gives a flat σ²·Δy·Δx.

    >>> rng = np.random.default_rng(0)
    >>> nps = noise_power_spectrum(rng.normal(0, 10, (200, 16, 16)), (0.5, 0.5))
    >>> round(float(nps[1:, 1:].mean()) / (100 * 0.25), 1)  # flat at σ²·Δy·Δx
    1.0
    """
    patches = np.asarray(patches_hu, dtype=np.float64)
    if patches.ndim != 3 or len(patches) == 0:
        raise ValueError(f"need a (n ≥ 1, Ny, Nx) stack of patches, got shape {patches.shape}")
    dy, dx = (float(v) for v in pixel_spacing_mm)
    _, ny, nx = patches.shape
    spectra = np.abs(np.fft.fft2(_detrend_plane(patches))) ** 2
    return spectra.mean(axis=0) * dy * dx / (ny * nx)


def radial_nps(nps_2d: np.ndarray, pixel_spacing_mm: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged NPS: the mean of the 2-D NPS over rings of radial frequency.

    Rings are centred at ``k·Δf`` (k = 1 … up to the Nyquist frequency of the coarser axis) with
    width ``Δf = max(1/(Ny·Δy), 1/(Nx·Δx))``; the zero-frequency ring (removed by detrending) is left out.

    Args:
        nps_2d: (Ny, Nx) from :func:`noise_power_spectrum`, HU²·mm².
        pixel_spacing_mm: (Δy, Δx) in mm.

    Returns:
        (frequency (k,) in cycles/mm, NPS (k,) in HU²·mm²).
    """
    dy, dx = (float(v) for v in pixel_spacing_mm)
    ny, nx = nps_2d.shape
    fy, fx = np.meshgrid(np.fft.fftfreq(ny, dy), np.fft.fftfreq(nx, dx), indexing="ij")
    step = max(1.0 / (ny * dy), 1.0 / (nx * dx))
    ring = np.rint(np.hypot(fy, fx) / step).astype(np.int64).ravel()
    count = int(min(0.5 / dy, 0.5 / dx) / step)
    sums = np.bincount(ring, weights=nps_2d.ravel(), minlength=count + 1)[1 : count + 1]
    sizes = np.bincount(ring, minlength=count + 1)[1 : count + 1]
    return np.arange(1, count + 1) * step, sums / np.maximum(sizes, 1)


def nps_mean_frequency(frequency_per_mm: np.ndarray, nps: np.ndarray) -> float:
    """NPS-weighted mean frequency of a radial NPS (cycles/mm): lower means blotchier noise texture."""
    total = float(np.sum(nps))
    return float(np.sum(frequency_per_mm * nps) / total) if total > 0 else float("nan")


def gaussian_smooth(image: np.ndarray, sigma_px: Sequence[float] | float) -> np.ndarray:
    """A (y, x) image convolved with a Gaussian of ``sigma_px`` pixels (per axis), borders mirrored.

    Separable, truncated at 3 σ; float64. ``sigma_px`` 0 on an axis leaves that axis alone.

    >>> smoothed = gaussian_smooth(np.eye(9) * 9.0, 1.0)
    >>> round(float(smoothed.sum()), 6), bool(smoothed.max() < 9.0)
    (81.0, True)
    """
    out = np.asarray(image, dtype=np.float64)
    sigmas = (float(sigma_px),) * 2 if np.isscalar(sigma_px) else tuple(float(v) for v in sigma_px)
    for axis, sigma in enumerate(sigmas):
        if sigma <= 0:
            continue
        radius = max(1, int(np.ceil(3 * sigma)))
        offsets = np.arange(-radius, radius + 1)
        kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="symmetric")
        windows = np.lib.stride_tricks.sliding_window_view(padded, len(kernel), axis=axis)
        out = windows @ (kernel / kernel.sum())
    return out


def gradient_magnitude(image_hu: np.ndarray, spacing_mm: Sequence[float],
                       smoothing_mm: float = EDGE_SMOOTHING_MM) -> np.ndarray:
    """|∇| of a (y, x) HU image smoothed by a Gaussian of ``smoothing_mm``, in HU/mm (central differences).

    >>> ramp = np.tile(np.arange(32.0) * 10, (32, 1))  # 10 HU per column
    >>> round(float(gradient_magnitude(ramp, (1.0, 0.5))[16, 16]), 3)  # columns 0.5 mm apart
    20.0
    """
    dy, dx = (float(v) for v in spacing_mm)
    smoothed = gaussian_smooth(image_hu, (smoothing_mm / dy, smoothing_mm / dx))
    grad_y, grad_x = np.gradient(smoothed, dy, dx)
    return np.hypot(grad_y, grad_x)


def bone_mask(reference_hu: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(y, x) bool: reference voxels above :data:`BONE_THRESHOLD_HU` (inside ``valid``)."""
    mask = np.asarray(reference_hu) > BONE_THRESHOLD_HU
    return mask if valid is None else mask & valid


def edge_mask(reference_hu: np.ndarray, spacing_mm: Sequence[float], valid: np.ndarray | None = None) -> np.ndarray:
    """(y, x) bool: voxels whose smoothed reference gradient is at least :data:`EDGE_GRADIENT_HU_PER_MM`."""
    mask = gradient_magnitude(reference_hu, spacing_mm) >= EDGE_GRADIENT_HU_PER_MM
    return mask if valid is None else mask & valid


def masked_error(output_hu: np.ndarray, reference_hu: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(RMSE, mean) of (output − reference) over the ``mask`` voxels, HU; (NaN, NaN) for an empty mask.

    >>> masked_error(np.array([1.0, 3.0, 9.0]), np.zeros(3), np.array([True, True, False]))
    (2.23606797749979, 2.0)
    """
    difference = (np.asarray(output_hu, np.float64) - np.asarray(reference_hu, np.float64))[mask]
    if difference.size == 0:
        return float("nan"), float("nan")
    return float(np.sqrt(np.mean(difference**2))), float(np.mean(difference))
