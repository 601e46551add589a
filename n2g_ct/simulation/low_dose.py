"""Low-dose CT simulation in the projection domain, from a routine-dose series (torch, CPU or CUDA).

Model, per axial slice (after Yu et al., Med. Phys. 39:2012, "Development and validation of a
practical lower-dose simulation tool", with the noise added to the image as a difference):

1. HU → linear attenuation ``μ = μ_water·(1 + HU/1000)``, negatives clipped to 0, with
   :data:`MU_WATER_PER_MM` = 0.0192 /mm (water at an effective energy of about 70 keV). Padding
   voxels (outside the reconstructed field of view) count as air.
2. Noiseless line integrals ``p`` (dimensionless: μ in /mm times path length in mm; the pixel size
   comes from the series spacing) over the rays of the scan geometry (:class:`ScanGeometry`):

   - ``fan`` (default): third-generation geometry with an equi-angular (arc) detector,
     source-to-isocentre 595 mm and source-to-detector 1085.6 mm (Siemens SOMATOM Definition
     values), 1152 views over 360°; channels every ``Δγ = Δu/R`` (ray spacing ``Δu`` at the
     isocentre), the fan covering the circle around the image diagonal. No bowtie filter, flying
     focal spot or quarter-detector offset.
   - ``parallel``: 720 views over 180°, bins of ``Δu`` covering the image diagonal.

   ``Δu`` = pixel size / (2√2): the rays sample the pixel grid's whole band (its frequency
   square, corners included) twice over, so resampling between fan and parallel rays is accurate.
   The projector is the Fourier-slice theorem evaluated by a non-uniform FFT (Kaiser–Bessel kernel
   of width 4, 2× oversampling, relative error ~1e-3) on the band-limited image; fan rays are read
   from the parallel sinogram by bilinear interpolation in (angle, offset).
3. Counts ``N = Poisson(I0·dose·e^−p) + N(0, σ_e²)``, electronic noise ``σ_e`` = 10 counts by
   default, clamped to at least :data:`MIN_COUNTS` (1 count); ``p̃ = ln(I0·dose / N)``.
4. Filtered back-projection of ``p̃ − p`` (FBP is linear: this is FBP(noisy) − FBP(noiseless)):
   Kak & Slaney's discrete ramp (2× zero padding) times a Hann window reaching 0 at
   :data:`HANN_CUTOFF` = 0.75 cycles/pixel (default; its noise power spectrum matches the chest
   series' own, see ``n2g_ct.research.benchmarks.simulator``) or no window (``ramp``), then exact
   (trigonometric) interpolation back-projection by the adjoint non-uniform FFT. Fan data are
   first rebinned to parallel rays (bilinear in view and channel, as rebinning scanners do), the
   two conjugate measurements of each line averaged.
5. Back to HU (``1000·Δμ/μ_water``) and **added** to the source image: the projector's own
   discretisation error never enters the output, and the source's own noise is kept.

Calibration in HU (when no ``I0`` is given): the source is taken as full dose with its own noise
``σ_src(z)`` per slice (:func:`estimate_noise_std`: uniform soft-tissue windows, median), and I0
is chosen per slice so that the added noise at dose ``d`` measures ``σ_src(z)·√(1/d − 1)`` in the
same windows, which makes the output's noise ``σ_src(z)/√d``: in effect a tube current modulated
along z, so every slice keeps its own noise ratio (with one I0 for all slices, slices through
the abdomen or shoulders would get several times the ratio of thorax slices: photon counts
there are far lower). Up to 24 evenly spaced slices are calibrated, log I0 interpolated along z
between them. I0 is thus the effective incident count per ray of the *added* noise at dose 1;
the source's implied full-dose count is ``I0·(1 − d)``. An explicit ``I0`` applies to every
slice, with no calibration.

Randomness: each slice draws its noise from its own ``torch.Generator`` seeded from
``(seed, slice index)``: a seed gives the same noise draws whatever the batch size (outputs equal
to float rounding, ~1e-4 HU), on one device type (CPU and CUDA generators differ).
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from n2g_ct.errors import ConfigError, InputError
from n2g_ct.io.dicom_writer import Derivation

log = logging.getLogger(__name__)

MU_WATER_PER_MM = 0.0192
"""Linear attenuation of water at an effective energy of about 70 keV, per mm."""

Geometry = Literal["fan", "parallel"]
Filter = Literal["hann", "ramp"]

DEFAULT_VIEWS: dict[str, int] = {"fan": 1152, "parallel": 720}
"""Views per scan: fan over 360°, parallel over 180°."""
MIN_VIEWS = 720

_KERNEL_WIDTH = 4
_OVERSAMPLING = 2
_DETECTOR_MARGIN_BINS = 8
HANN_CUTOFF = 0.75
"""Frequency (cycles per pixel) where the Hann window reaches 0: 1.5× the pixel Nyquist frequency."""


@dataclass(frozen=True)
class ScanGeometry:
    """Scan geometry and reconstruction filter of the simulation (see the module docstring).

    Attributes:
        kind: ``fan`` (equi-angular detector, views over 360°) or ``parallel`` (views over 180°).
        views: projections per scan; default 1152 (fan) or 720 (parallel); at least 720.
        source_to_isocentre_mm: fan only.
        source_to_detector_mm: fan only; sets the physical channel pitch ``D·Δγ`` (documentation).
        filter: ``hann`` (ramp × Hann window, 0 at :data:`HANN_CUTOFF`) or ``ramp``.
    """

    kind: Geometry = "fan"
    views: int | None = None
    source_to_isocentre_mm: float = 595.0
    source_to_detector_mm: float = 1085.6
    filter: Filter = "hann"

    def __post_init__(self) -> None:
        if self.kind not in DEFAULT_VIEWS:
            raise ConfigError(f"geometry must be fan or parallel, got {self.kind!r}")
        if self.filter not in ("hann", "ramp"):
            raise ConfigError(f"filter must be hann or ramp, got {self.filter!r}")
        if self.views is not None and (self.views < MIN_VIEWS or (self.kind == "fan" and self.views % 2)):
            raise ConfigError(f"views must be ≥ {MIN_VIEWS} (and even for fan), got {self.views}")
        if not 0 < self.source_to_isocentre_mm < self.source_to_detector_mm:
            raise ConfigError("need 0 < source-to-isocentre < source-to-detector distance")

    @property
    def n_views(self) -> int:
        """Views per scan (the default of the kind when ``views`` is None)."""
        return self.views or DEFAULT_VIEWS[self.kind]

    def describe(self) -> str:
        """One line: kind, views, distances (fan), filter."""
        if self.kind == "fan":
            return (
                f"fan beam, equi-angular detector, {self.n_views} views/360deg, source-isocentre "
                f"{self.source_to_isocentre_mm:g} mm, source-detector {self.source_to_detector_mm:g} mm, "
                f"{self.filter} FBP"
            )
        return f"parallel beam, {self.n_views} views/180deg, {self.filter} FBP"


# ---------------------------------------------------------------------------------------------
# Non-uniform FFT between an image grid and arbitrary frequencies


def _kaiser_bessel_beta(width: int, oversampling: float) -> float:
    """Beatty et al. (IEEE TMI 2005) optimal Kaiser–Bessel shape for a kernel width and oversampling."""
    return math.pi * math.sqrt((width / oversampling) ** 2 * (oversampling - 0.5) ** 2 - 0.8)


def _kaiser_bessel(x: torch.Tensor, width: int, beta: float) -> torch.Tensor:
    """Kernel ``I0(β√(1 − (2x/W)²))`` on |x| ≤ W/2, 0 outside (x in grid units)."""
    arg = (1 - (2 * x / width) ** 2).clamp(min=0)
    return torch.where(arg > 0, torch.special.i0(beta * arg.sqrt()), torch.zeros_like(x))


def _kaiser_bessel_ft(xi: torch.Tensor, width: int, beta: float) -> torch.Tensor:
    """Continuous Fourier transform of :func:`_kaiser_bessel` at ``xi`` cycles per grid unit (|πWξ| < β)."""
    z = (beta**2 - (math.pi * width * xi) ** 2).sqrt()
    return width * torch.sinh(z) / z


class _NonUniformFFT:
    """2-D NUFFT between an (ny, nx) image and P frequencies ``k`` = (ky, kx) in cycles per pixel.

    ``forward``: ``F(k) = Σ_n f[n] e^{−2πi k·n}``; ``adjoint``: ``g[n] = Σ_p c_p e^{+2πi k_p·n}``,
    with ``n`` the pixel index minus ``(ny//2, nx//2)``. Gridding on a 2× oversampled grid with a
    Kaiser–Bessel kernel (Fessler & Sutton 2003; Beatty et al. 2005): relative error ~1e-3.
    The interpolation matrix is a sparse CSR matrix built once.
    """

    def __init__(self, shape: tuple[int, int], k: torch.Tensor) -> None:
        self.shape = shape
        self.grid = (_OVERSAMPLING * shape[0], _OVERSAMPLING * shape[1])
        device = k.device
        beta = _kaiser_bessel_beta(_KERNEL_WIDTH, _OVERSAMPLING)
        offsets = torch.arange(_KERNEL_WIDTH, device=device)
        index, weight = [], []
        for axis in range(2):  # per axis: the W grid points around each frequency and their weights
            t = k[:, axis].double() * self.grid[axis]
            j = torch.floor(t - _KERNEL_WIDTH / 2).long()[:, None] + 1 + offsets
            weight.append(_kaiser_bessel(t[:, None] - j, _KERNEL_WIDTH, beta).float())
            index.append(j % self.grid[axis])
        cols = (index[0][:, :, None] * self.grid[1] + index[1][:, None, :]).reshape(len(k), -1)
        values = (weight[0][:, :, None] * weight[1][:, None, :]).reshape(len(k), -1)
        self._matrix = _csr(cols, values, self.grid[0] * self.grid[1])
        self._adjoint_matrix = _csr_transpose(cols, values, self.grid[0] * self.grid[1])
        deapodization = [
            _kaiser_bessel_ft((torch.arange(n, device=device) - n // 2) / g, _KERNEL_WIDTH, beta)
            for n, g in zip(shape, self.grid)
        ]
        self._deapodization = (deapodization[0][:, None] * deapodization[1][None, :]).float()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, ny, nx) real → (B, P) complex."""
        ny, nx = self.shape
        padded = F.pad(image / self._deapodization, (0, self.grid[1] - nx, 0, self.grid[0] - ny))
        spectrum = torch.fft.fft2(torch.roll(padded, (-(ny // 2), -(nx // 2)), (-2, -1)))
        flat = torch.view_as_real(spectrum.reshape(len(image), -1).T.contiguous())  # (K, B, 2)
        values = self._matrix @ flat.reshape(flat.shape[0], -1)
        return torch.view_as_complex(values.reshape(-1, len(image), 2).contiguous()).T

    def adjoint(self, values: torch.Tensor) -> torch.Tensor:
        """(B, P) complex → (B, ny, nx) complex."""
        ny, nx = self.shape
        flat = torch.view_as_real(values.T.contiguous())  # (P, B, 2)
        grid = self._adjoint_matrix @ flat.reshape(flat.shape[0], -1)
        grid = torch.view_as_complex(grid.reshape(-1, len(values), 2).contiguous()).T
        image = torch.fft.ifft2(grid.reshape(len(values), *self.grid), norm="forward")
        image = torch.roll(image, (ny // 2, nx // 2), (-2, -1))[:, :ny, :nx]
        return image / self._deapodization


def _csr(cols: torch.Tensor, values: torch.Tensor, n_cols: int) -> torch.Tensor:
    """CSR matrix with row p holding ``values[p]`` at columns ``cols[p]`` (P, W², distinct per row)."""
    rows, width = cols.shape
    cols, order = cols.sort(dim=1)  # CSR wants sorted columns within a row (the grid wraps around)
    values = values.gather(1, order)
    crow = torch.arange(0, rows * width + 1, width, device=cols.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(
            crow, cols.reshape(-1), values.reshape(-1), (rows, n_cols), check_invariants=False
        )


def _csr_transpose(cols: torch.Tensor, values: torch.Tensor, n_cols: int) -> torch.Tensor:
    """The transpose of :func:`_csr` ``(cols, values)``, as a CSR matrix (n_cols, P)."""
    rows, width = cols.shape
    flat_cols = cols.reshape(-1)
    order = torch.argsort(flat_cols, stable=True)
    counts = torch.bincount(flat_cols, minlength=n_cols)
    crow = torch.zeros(n_cols + 1, dtype=torch.long, device=cols.device)
    crow[1:] = torch.cumsum(counts, 0)
    row_of = torch.div(order, width, rounding_mode="floor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow, row_of, values.reshape(-1)[order], (n_cols, rows), check_invariants=False
        )


# ---------------------------------------------------------------------------------------------
# Projectors


class ParallelBeam:
    """Parallel-beam projector and FBP for (ny, nx) slices, by the Fourier-slice theorem.

    Views ``θ_v = v·π/views`` (v < views), over 180°; detector offsets ``u_m = (m − M/2)·Δu``
    (m < M, M even) with ``Δu`` = min(pixel size)/(2√2) and ``M·Δu`` ≥ the image diagonal. A ray
    (θ, u) is the line ``x·cos θ + y·sin θ = u`` through the image centred at the isocentre
    (x along columns, y along rows, mm). All tensors live on ``device``.

    Args:
        shape: (ny, nx) pixels.
        spacing_yx: (row, column) pixel size in mm.
        views: views over 180°.
        device: torch device.
    """

    def __init__(self, shape: tuple[int, int], spacing_yx: tuple[float, float], views: int,
                 device: torch.device | str = "cpu") -> None:
        self.shape = shape
        self.spacing_yx = spacing_yx
        self.views = views
        self.device = torch.device(device)
        self.bin_mm = min(spacing_yx) / (2 * math.sqrt(2))
        diagonal_mm = math.hypot(shape[0] * spacing_yx[0], shape[1] * spacing_yx[1])
        self.channels = 2 * math.ceil((diagonal_mm / self.bin_mm + _DETECTOR_MARGIN_BINS) / 2)
        self.angles = torch.arange(views, dtype=torch.float64, device=self.device) * math.pi / views
        # Polar frequencies ν_l = l/(M·Δu), l = 0..M/2 (the other half by Hermitian symmetry), as
        # (ky, kx) in cycles per pixel; those outside the pixel grid's band are dropped.
        nu = torch.arange(self.channels // 2 + 1, dtype=torch.float64, device=self.device) / self.channels
        ky = nu[None, :] * torch.sin(self.angles)[:, None] * (spacing_yx[0] / self.bin_mm)
        kx = nu[None, :] * torch.cos(self.angles)[:, None] * (spacing_yx[1] / self.bin_mm)
        self._inside = (ky.abs() < 0.5) & (kx.abs() < 0.5)
        self._inside[:, -1] = False  # the Nyquist bin of the detector
        k = torch.stack([ky[self._inside], kx[self._inside]], dim=1)
        # Pixel centres sit at (n − N//2 + s)·spacing, s = N//2 − (N − 1)/2 ∈ {0, ½}.
        shift = torch.tensor([n // 2 - (n - 1) / 2 for n in shape], dtype=torch.float64, device=self.device)
        self._phase = torch.exp(-2j * math.pi * (k @ shift)).to(torch.complex64)
        sign = 1 - 2 * (torch.arange(nu.numel(), device=self.device) % 2)  # (−1)^l: detector centre at M/2
        self._sign = sign.to(torch.float32)
        self._nufft = _NonUniformFFT(shape, k)

    def project(self, mu: torch.Tensor) -> torch.Tensor:
        """Line integrals: μ (B, ny, nx) in /mm → (B, views, M), dimensionless."""
        values = self._nufft.forward(mu.to(torch.float32)) * self._phase
        spectrum = torch.zeros(len(mu), *self._inside.shape, dtype=torch.complex64, device=self.device)
        spectrum[:, self._inside] = values
        scale = self.spacing_yx[0] * self.spacing_yx[1] / self.bin_mm
        return torch.fft.irfft(spectrum * self._sign, n=self.channels, dim=-1) * scale

    def fbp(self, sinogram: torch.Tensor, filter: Filter = "hann") -> torch.Tensor:
        """Filtered back-projection: (B, views, M) line integrals → (B, ny, nx) μ in /mm."""
        filtered = self._ramp_filter(sinogram.to(torch.float32), filter)
        spectrum = torch.fft.rfft(filtered, dim=-1) * self._sign
        spectrum[..., 1:] *= 2  # Hermitian half: the negative frequencies' share
        values = spectrum[:, self._inside] * self._phase.conj() * (math.pi / (self.views * self.channels))
        return self._nufft.adjoint(values).real

    def _ramp_filter(self, sinogram: torch.Tensor, filter: Filter) -> torch.Tensor:
        """Ramp (× Hann) filtering along the detector, linear convolution (2× zero padding)."""
        length = 2 * self.channels
        n = torch.arange(length, device=self.device)
        n = torch.where(n < self.channels, n, n - length).to(torch.float64)
        kernel = torch.where(n % 2 == 1, -1 / (math.pi * n * self.bin_mm) ** 2, torch.zeros_like(n))
        kernel[0] = 1 / (4 * self.bin_mm**2)
        response = torch.fft.rfft(kernel).real * self.bin_mm  # Kak & Slaney's discrete ramp
        if filter == "hann":
            nu = torch.fft.rfftfreq(length, d=self.bin_mm, device=self.device)  # cycles/mm
            cutoff = HANN_CUTOFF / max(self.spacing_yx)
            response = response * torch.where(nu < cutoff, 0.5 * (1 + torch.cos(math.pi * nu / cutoff)), 0.0)
        padded = torch.fft.rfft(sinogram, n=length, dim=-1) * response.to(torch.float32)
        return torch.fft.irfft(padded, n=length, dim=-1)[..., : self.channels]


class FanBeam:
    """Fan-beam rays (equi-angular detector, views over 360°) read from and rebinned to parallel rays.

    Source at ``R·(cos β, sin β)`` for views ``β_k = k·2π/views``; channel ``j`` at fan angle
    ``γ_j = (j − (C − 1)/2)·Δγ`` with ``Δγ = Δu/R``; its ray is the parallel ray
    ``θ = β + γ + π/2``, ``u = −R·sin γ``. The fan covers the parallel detector (the image
    diagonal). The matching :class:`ParallelBeam` has ``views/2`` views over 180°, the same
    angular step.

    Args:
        parallel: projector of the slices (its views are half of the fan's).
        source_to_isocentre_mm: ``R``.
    """

    def __init__(self, parallel: ParallelBeam, source_to_isocentre_mm: float) -> None:
        self.parallel = parallel
        self.radius = source_to_isocentre_mm
        self.views = 2 * parallel.views
        device = parallel.device
        half_width = parallel.channels / 2 * parallel.bin_mm
        if half_width >= 0.95 * self.radius:
            raise ConfigError(
                f"the image diagonal ({2 * half_width:.0f} mm with margin) does not fit in the fan of a "
                f"{self.radius:g} mm source-to-isocentre distance"
            )
        self.fan_step = parallel.bin_mm / self.radius
        self.channels = 2 * math.ceil(math.asin(half_width / self.radius) / self.fan_step) + 1
        step = 2 * math.pi / self.views
        beta = torch.arange(self.views, dtype=torch.float64, device=device) * step
        gamma = (torch.arange(self.channels, dtype=torch.float64, device=device) - (self.channels - 1) / 2)
        gamma = gamma * self.fan_step
        # Fan ray (k, j) → fractional (view, channel) of the parallel sinogram extended to 360°.
        theta = torch.remainder(beta[:, None] + gamma[None, :] + math.pi / 2, 2 * math.pi)
        u = (-self.radius * torch.sin(gamma)).expand_as(theta)
        self._fan_from_parallel = _sampling_grid(theta / step, u / parallel.bin_mm + parallel.channels / 2,
                                                 (self.views + 1, parallel.channels))
        # Parallel ray (v, m) over 360° → fractional (view, channel) of the fan sinogram.
        u = (torch.arange(parallel.channels, dtype=torch.float64, device=device) - parallel.channels / 2)
        gamma = -torch.asin(u * parallel.bin_mm / self.radius)
        theta = torch.arange(self.views, dtype=torch.float64, device=device) * step
        beta = torch.remainder(theta[:, None] - gamma[None, :] - math.pi / 2, 2 * math.pi)
        self._parallel_from_fan = _sampling_grid(
            beta / step, (gamma / self.fan_step + (self.channels - 1) / 2).expand_as(beta),
            (self.views + 1, self.channels),
        )

    def from_parallel(self, sinogram: torch.Tensor) -> torch.Tensor:
        """Parallel sinogram (B, views/2, M) over 180° → fan sinogram (B, views, C)."""
        full = torch.cat([sinogram, _mirror(sinogram), sinogram[:, :1]], dim=1)  # 360° + wrap row
        return _sample(full, self._fan_from_parallel)

    def to_parallel(self, sinogram: torch.Tensor) -> torch.Tensor:
        """Fan sinogram (B, views, C) → parallel (B, views/2, M) over 180°, conjugate rays averaged."""
        full = _sample(torch.cat([sinogram, sinogram[:, :1]], dim=1), self._parallel_from_fan)
        half = self.views // 2
        return 0.5 * (full[:, :half] + _mirror(full[:, half:]))


def _mirror(sinogram: torch.Tensor) -> torch.Tensor:
    """u → −u on a detector with u_m = (m − M/2)·Δu: index m → M − m (m = 0 maps to itself)."""
    return torch.roll(torch.flip(sinogram, [-1]), 1, -1)


def _sampling_grid(rows: torch.Tensor, cols: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``grid_sample`` grid (1, H, W, 2) reading fractional (row, column) indices of a (size) array."""
    x = 2 * cols / (size[1] - 1) - 1
    y = 2 * rows / (size[0] - 1) - 1
    return torch.stack([x, y], dim=-1)[None].to(torch.float32)


def _sample(array: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``array`` (B, H, W) at ``grid`` (1, h, w, 2) → (B, h, w); 0 outside."""
    return F.grid_sample(array[:, None], grid.expand(len(array), -1, -1, -1), mode="bilinear",
                         padding_mode="zeros", align_corners=True)[:, 0]


# ---------------------------------------------------------------------------------------------
# Source noise: σ_src from uniform soft-tissue windows

SOFT_TISSUE_MEAN_HU = (-100.0, 150.0)
"""A window's mean HU must lie in this range."""
SOFT_TISSUE_VOXEL_HU = (-400.0, 500.0)
"""Every voxel of a window must lie in this range (no air, lung or bone edge)."""
NOISE_WINDOW_MM = 8.0
"""Side of the noise windows in mm (at least 5 pixels)."""
MIN_SLICE_WINDOWS = 20
"""A slice's own noise is measured when it holds at least this many windows."""


@dataclass(frozen=True)
class NoiseEstimate:
    """Image noise measured in uniform soft-tissue windows, per slice.

    The slices are tiled into square windows of ``window_px`` pixels (about 8 mm). A window is
    kept when its mean HU is in :data:`SOFT_TISSUE_MEAN_HU`, all its voxels are in
    :data:`SOFT_TISSUE_VOXEL_HU` and none is padding, and its fitted plane's gradient is at or
    below the median of those windows (the flatter half: organs, muscle, vessels' lumen). A
    window's noise is the standard deviation of its residual from that plane (3 degrees of
    freedom removed). A slice's noise is the median over its windows, which the minority of
    windows holding structure barely moves (measured only in slices with at least
    :data:`MIN_SLICE_WINDOWS` windows); the volume's is the median over those slices.

    Attributes:
        std_hu: the volume's noise, HU.
        slice_std_hu: (z,) each slice's noise, HU; NaN where too few windows.
        windows: bool (z, ny // window_px, nx // window_px), the windows used.
        window_px: window side in pixels.
    """

    std_hu: float
    slice_std_hu: np.ndarray
    windows: np.ndarray
    window_px: int

    def relative(self, image: np.ndarray) -> float:
        """Median over the measured slices of the noise of another (z, y, x) image (e.g. added noise),
        in the same windows, divided by the slice's own noise."""
        return float(np.nanmedian(self.measure_slices(image) / self.slice_std_hu))

    def measure_slices(self, image: np.ndarray) -> np.ndarray:
        """The per-slice statistic (z,) in the same windows of another (z, y, x) image, HU."""
        return _slice_medians(_window_statistics(image, self.window_px, (1.0, 1.0))["noise"], self.windows)

    def subset(self, slices: Sequence[int]) -> NoiseEstimate:
        """The estimate restricted to some slices (their windows and noise)."""
        index = list(slices)
        return NoiseEstimate(self.std_hu, self.slice_std_hu[index], self.windows[index], self.window_px)


def estimate_noise_std(
    hu: np.ndarray, spacing_yx: tuple[float, float], padding_mask: np.ndarray | None = None
) -> NoiseEstimate:
    """Noise standard deviation (HU) of a (z, y, x) volume and of its slices, from uniform soft-tissue windows.

    Raises:
        InputError: no slice holds :data:`MIN_SLICE_WINDOWS` such windows (give ``I0`` explicitly).
    """
    window = max(5, round(NOISE_WINDOW_MM / min(spacing_yx)))
    stats = _window_statistics(hu, window, spacing_yx)
    windows = (
        (stats["mean"] >= SOFT_TISSUE_MEAN_HU[0]) & (stats["mean"] <= SOFT_TISSUE_MEAN_HU[1])
        & (stats["min"] >= SOFT_TISSUE_VOXEL_HU[0]) & (stats["max"] <= SOFT_TISSUE_VOXEL_HU[1])
    )
    if padding_mask is not None:
        windows &= _window_statistics(padding_mask.astype(np.float32), window, spacing_yx)["max"] == 0
    if windows.any():
        windows &= stats["gradient"] <= np.median(stats["gradient"][windows])
    slice_std = _slice_medians(stats["noise"], windows)
    if np.isnan(slice_std).all():
        raise InputError(
            f"cannot measure the source's noise: no slice holds {MIN_SLICE_WINDOWS} uniform soft-tissue "
            f"windows of {window} px ({int(windows.sum())} in all); give I0 explicitly (--i0)"
        )
    std = float(np.nanmedian(slice_std))
    log.info(
        "source noise %.1f HU (slices %.1f to %.1f HU), from %d soft-tissue windows of %d px",
        std, np.nanmin(slice_std), np.nanmax(slice_std), int(windows.sum()), window,
    )
    return NoiseEstimate(std, slice_std, windows, window)


def _window_statistics(volume: np.ndarray, window: int, spacing_yx: tuple[float, float]) -> dict[str, np.ndarray]:
    """Per non-overlapping window of (z, y, x): mean, min, max, plane gradient (per mm) and residual std."""
    z, ny, nx = volume.shape
    wy, wx = ny // window, nx // window
    offsets = np.arange(window) - (window - 1) / 2
    plane_norm = window * float(offsets @ offsets)
    out: dict[str, list[np.ndarray]] = {key: [] for key in ("mean", "min", "max", "gradient", "noise")}
    for start in range(0, z, 16):  # bounded memory
        tiles = volume[start : start + 16, : wy * window, : wx * window].astype(np.float64)
        tiles = tiles.reshape(-1, wy, window, wx, window)
        mean = tiles.mean(axis=(2, 4))
        centred = tiles - mean[:, :, None, :, None]
        slope_y = np.einsum("zaibj,i->zab", centred, offsets) / plane_norm
        slope_x = np.einsum("zaibj,j->zab", centred, offsets) / plane_norm
        residual = (centred**2).sum(axis=(2, 4)) - (slope_y**2 + slope_x**2) * plane_norm
        out["mean"].append(mean)
        out["min"].append(tiles.min(axis=(2, 4)))
        out["max"].append(tiles.max(axis=(2, 4)))
        out["gradient"].append(np.hypot(slope_y / spacing_yx[0], slope_x / spacing_yx[1]))
        out["noise"].append(np.sqrt(np.clip(residual, 0, None) / (window * window - 3)))
    return {key: np.concatenate(value) for key, value in out.items()}


def _slice_medians(noise: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """(z,) median window noise per slice; NaN for slices with fewer than :data:`MIN_SLICE_WINDOWS` windows."""
    return np.array([np.median(n[w]) if w.sum() >= MIN_SLICE_WINDOWS else np.nan for n, w in zip(noise, windows)])


# ---------------------------------------------------------------------------------------------
# Simulation

DEFAULT_ELECTRONIC_NOISE = 10.0
"""Standard deviation of the electronic (detector read-out) noise, in counts."""
MIN_COUNTS = 1.0
"""Counts are clamped to at least this before the log."""
_TRIAL_I0 = 2e5
_CALIBRATION_SLICES = 24
_CALIBRATION_STEPS = 5
_CALIBRATION_TOLERANCE = 0.03


class LowDoseSimulator:
    """Projector, noise model and reconstruction of one slice size and geometry (reused across slices).

    Args:
        shape: (ny, nx) pixels of the slices.
        spacing_yx: (row, column) pixel size in mm.
        geometry: scan geometry and filter.
        device: where everything runs.
    """

    def __init__(self, shape: tuple[int, int], spacing_yx: tuple[float, float],
                 geometry: ScanGeometry = ScanGeometry(), device: torch.device | str = "cpu") -> None:
        self.geometry = geometry
        self.device = torch.device(device)
        fan = geometry.kind == "fan"
        views = geometry.n_views // 2 if fan else geometry.n_views
        self.parallel = ParallelBeam(shape, spacing_yx, views, self.device)
        self.fan = FanBeam(self.parallel, geometry.source_to_isocentre_mm) if fan else None

    def line_integrals(self, hu: torch.Tensor) -> torch.Tensor:
        """HU (B, ny, nx) → noiseless line integrals on the scan's rays (B, views, channels)."""
        sinogram = self.parallel.project(hu_to_mu(hu))
        return self.fan.from_parallel(sinogram) if self.fan else sinogram

    def reconstruct(self, sinogram: torch.Tensor, filter: Filter | None = None) -> torch.Tensor:
        """Line integrals on the scan's rays (B, views, channels) → FBP image ``1000·μ/μ_water`` (B, ny, nx).

        That is HU + 1000, so a difference of two such images is in HU. ``filter`` defaults to the geometry's.
        """
        parallel = self.fan.to_parallel(sinogram) if self.fan else sinogram
        return self.parallel.fbp(parallel, filter or self.geometry.filter) * (1000 / MU_WATER_PER_MM)

    def round_trip(self, hu: torch.Tensor, filter: Filter = "ramp") -> torch.Tensor:
        """FBP of the noiseless projections of ``hu`` (B, ny, nx), in HU: the projector's discretisation check.

        HU below −1000 come back as −1000 (μ is clipped at 0).
        """
        return self.reconstruct(self.line_integrals(hu), filter) - 1000

    def added_noise(
        self, hu: torch.Tensor, dose: float, i0: float | Sequence[float] | np.ndarray,
        generators: Sequence[torch.Generator],
        electronic_noise: float = DEFAULT_ELECTRONIC_NOISE, gaussian: bool = False,
    ) -> torch.Tensor:
        """FBP(noisy) − FBP(noiseless) in HU (B, ny, nx) for HU slices (B, ny, nx), one generator per slice.

        Counts ``Poisson(i0·dose·e^−p) + N(0, electronic_noise²)`` clamped to :data:`MIN_COUNTS`;
        ``i0`` is one value or one per slice. ``gaussian``: counts ``λ + √(λ + σ_e²)·z`` instead, one
        standard normal ``z`` per ray, so that a generator in the same state gives noise that
        changes smoothly with ``i0`` (calibration).
        """
        p = self.line_integrals(hu)
        incident = torch.as_tensor(i0, dtype=torch.float32, device=p.device).reshape(-1, 1, 1) * dose
        expected = incident * torch.exp(-p)
        counts = torch.empty_like(p)
        for b, generator in enumerate(generators):
            normal = torch.randn(p.shape[1:], generator=generator, device=p.device)
            if gaussian:
                counts[b] = expected[b] + torch.sqrt(expected[b] + electronic_noise**2) * normal
            else:
                counts[b] = torch.poisson(expected[b], generator=generator) + electronic_noise * normal
        return self.reconstruct(torch.log(expected / counts.clamp_(min=MIN_COUNTS)))


def hu_to_mu(hu: torch.Tensor) -> torch.Tensor:
    """Linear attenuation in /mm: ``μ_water·(1 + HU/1000)``, negatives clipped to 0."""
    return (MU_WATER_PER_MM * (1 + hu / 1000)).clamp(min=0)


def slice_generator(seed: int, index: int, device: torch.device | str = "cpu", stream: int = 0) -> torch.Generator:
    """The generator of slice ``index``: seeded from (seed, stream, index) by a NumPy ``SeedSequence``."""
    state = np.random.SeedSequence([seed, stream, index]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


@dataclass(frozen=True)
class SimulationResult:
    """A simulated lower-dose volume and how it was made.

    Attributes:
        hu: float32 (z, y, x) HU: the source plus the added noise (padding voxels unchanged).
        dose: fraction of the source's dose.
        i0: (z,) incident counts per ray at dose 1 of the added noise, per slice (calibrated or given).
        geometry: the scan geometry.
        electronic_noise: σ_e in counts.
        seed: the seed.
        source_noise_hu: σ_src of the volume (calibrated runs), else None.
        target_added_noise_hu: ``σ_src·√(1/d − 1)`` (calibrated runs), else None.
        added_noise_hu: σ_src × the median over slices of (added noise / source noise), both measured
            in the same windows (calibrated runs).
    """

    hu: np.ndarray
    dose: float
    i0: np.ndarray
    geometry: ScanGeometry
    electronic_noise: float
    seed: int
    source_noise_hu: float | None = None
    target_added_noise_hu: float | None = None
    added_noise_hu: float | None = None

    def describe(self) -> str:
        """The model and its parameters in one line (DICOM DerivationDescription)."""
        low, high = float(self.i0.min()), float(self.i0.max())
        i0 = f"I0 {low:.4g}" if low == high else f"I0 {low:.4g} to {high:.4g} (per slice)"
        text = (
            f"dose {self.dose:g} of the source, {i0} photons/ray, electronic noise {self.electronic_noise:g} "
            f"counts, {self.geometry.describe()}, mu_water {MU_WATER_PER_MM} /mm, seed {self.seed}, "
            f"noise added as FBP(noisy) - FBP(noiseless)"
        )
        if self.source_noise_hu is not None:
            text += (
                f"; I0 calibrated per slice to the source noise ({self.source_noise_hu:.1f} HU): added noise "
                f"{self.added_noise_hu:.1f} HU (target {self.target_added_noise_hu:.1f} HU)"
            )
        return text


def simulate_low_dose(
    hu: np.ndarray,
    spacing_yx: tuple[float, float],
    dose: float,
    *,
    geometry: ScanGeometry = ScanGeometry(),
    i0: float | None = None,
    electronic_noise: float = DEFAULT_ELECTRONIC_NOISE,
    seed: int = 0,
    padding_mask: np.ndarray | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    on_slices: Callable[[int], None] | None = None,
) -> SimulationResult:
    """Simulate ``dose`` × the source's dose from a (z, y, x) HU volume (see the module docstring).

    Args:
        hu: float (z, y, x) HU of the routine-dose source.
        spacing_yx: (row, column) pixel size in mm.
        dose: fraction of the source dose, in (0, 1) when calibrating, (0, 1] with ``i0``.
        geometry: scan geometry and FBP filter.
        i0: incident counts per ray at dose 1, for every slice; None: calibrate per slice from the
            source's noise.
        electronic_noise: σ_e in counts (≥ 0).
        seed: seed of the noise.
        padding_mask: bool (z, y, x), True outside the field of view (treated as air, returned unchanged).
        device: torch device.
        batch_size: slices per batch.
        on_slices: called with the number of slices after each batch of the final pass (progress).

    Raises:
        ConfigError: a parameter is out of range.
        InputError: calibration finds no slice with enough soft-tissue windows to measure the source noise.
    """
    if not 0 < dose <= 1 or (i0 is None and dose == 1):
        raise ConfigError(f"dose must be in (0, 1) (or (0, 1] with an explicit I0), got {dose}")
    if i0 is not None and not i0 > 0:
        raise ConfigError(f"I0 must be > 0, got {i0}")
    if electronic_noise < 0 or batch_size < 1:
        raise ConfigError("electronic noise must be ≥ 0 and the batch size ≥ 1")
    device = torch.device(device)
    simulator = LowDoseSimulator(hu.shape[1:], spacing_yx, geometry, device)
    source = hu if padding_mask is None else np.where(padding_mask, -1000.0, hu)

    def noise(indices: Sequence[int], i0s: np.ndarray, calibrating: bool = False) -> np.ndarray:
        out = np.empty((len(indices), *hu.shape[1:]), np.float32)
        for start in range(0, len(indices), batch_size):
            chunk = list(indices[start : start + batch_size])
            batch = torch.from_numpy(np.ascontiguousarray(source[chunk], dtype=np.float32)).to(device)
            generators = [slice_generator(seed, k, device, stream=int(calibrating)) for k in chunk]
            with torch.inference_mode():
                added = simulator.added_noise(
                    batch, dose, i0s[start : start + len(chunk)], generators, electronic_noise, gaussian=calibrating
                )
            out[start : start + len(chunk)] = added.cpu().numpy()
            if on_slices is not None and not calibrating:
                on_slices(len(chunk))
        return out

    estimate = target = None
    if i0 is None:
        estimate = estimate_noise_std(hu, spacing_yx, padding_mask)
        target = estimate.std_hu * math.sqrt(1 / dose - 1)
        i0s = _calibrate_i0(estimate, dose, noise)
    else:
        i0s = np.full(len(hu), float(i0))
    added = noise(range(len(hu)), i0s)
    result = hu + added
    if padding_mask is not None:
        result = np.where(padding_mask, hu, result)
    measured = estimate.std_hu * estimate.relative(added) if estimate else None
    if estimate:
        log.info("added noise %.1f HU (target %.1f HU); I0 %.4g to %.4g photons/ray", measured, target, i0s.min(), i0s.max())
    return SimulationResult(
        result.astype(np.float32), dose, i0s, geometry, electronic_noise, seed,
        source_noise_hu=estimate.std_hu if estimate else None, target_added_noise_hu=target, added_noise_hu=measured,
    )


def _calibrate_i0(
    estimate: NoiseEstimate, dose: float, noise: Callable[[Sequence[int], np.ndarray, bool], np.ndarray]
) -> np.ndarray:
    """Per-slice I0 (z,) whose added noise measures ``σ_slice·√(1/d − 1)`` on each slice.

    Up to :data:`_CALIBRATION_SLICES` evenly spaced slices with a measured noise are calibrated,
    all at once; log I0 is interpolated linearly along z in between (constant beyond): a tube
    current modulated along z, so every slice keeps its own noise ratio. Calibration runs use
    Gaussian counts with the same normal draws at every step (``gaussian`` in
    :meth:`LowDoseSimulator.added_noise`), so the measured noise is a smooth function of I0. It falls
    monotonically with I0 (∝ I0^−½ for quantum noise, steeper where electronic noise and photon
    starvation weigh): steps of slope −½ in log σ vs log I0 until the target is bracketed, then
    secant steps kept inside the bracket (else regula falsi); a slice stops within
    :data:`_CALIBRATION_TOLERANCE`.
    """
    measurable = np.flatnonzero(~np.isnan(estimate.slice_std_hu))
    picks = np.unique(measurable[np.linspace(0, len(measurable) - 1, _CALIBRATION_SLICES).round().astype(int)])
    windows = estimate.subset(picks.tolist())
    targets = windows.slice_std_hu * math.sqrt(1 / dose - 1)
    x = np.full(len(picks), math.log(_TRIAL_I0))
    points: list[list[tuple[float, float]]] = [[] for _ in picks]  # per slice: (log I0, log(measured / target))
    todo = np.arange(len(picks))
    for step in range(_CALIBRATION_STEPS):
        measured = windows.subset(todo.tolist()).measure_slices(noise(picks[todo].tolist(), np.exp(x[todo]), True))
        errors = measured / targets[todo] - 1
        log.info("calibration %d: %d slice(s), added noise %+.0f%% to %+.0f%% of the target", step + 1, len(todo),
                 100 * errors.min(), 100 * errors.max())
        for i, m in zip(todo, measured):
            points[i].append((x[i], math.log(m / targets[i])))
            x[i] = _next_log_i0(points[i])
        todo = todo[np.abs(errors) > _CALIBRATION_TOLERANCE]
        if not len(todo):
            break
    return np.exp(np.interp(np.arange(len(estimate.windows)), picks, x))


def _next_log_i0(points: Sequence[tuple[float, float]]) -> float:
    """Next log I0 from the (log I0, log(measured/target)) points of one slice; the last point's if it hit."""
    x, f = points[-1]
    if abs(f) <= math.log(1 + _CALIBRATION_TOLERANCE):
        return x
    noisier = [p for p in points if p[1] > 0]
    quieter = [p for p in points if p[1] < 0]
    if not (noisier and quieter):
        return x + 2 * f
    (xa, fa), (xb, fb) = max(noisier), min(quieter)
    (x1, f1) = points[-2]
    guess = x - f * (x - x1) / (f - f1) if f != f1 else xa
    return guess if xa < guess < xb else xa + fa * (xb - xa) / (fa - fb)


# ---------------------------------------------------------------------------------------------
# Series in, series out


def simulate_series(
    source: Path,
    out: Path,
    dose: float,
    *,
    geometry: ScanGeometry = ScanGeometry(),
    i0: float | None = None,
    electronic_noise: float = DEFAULT_ELECTRONIC_NOISE,
    seed: int = 0,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
) -> tuple[SimulationResult, Path]:
    """Read a routine-dose series, simulate ``dose``, write it as a derived series (DICOM) or NIfTI file.

    A DICOM series becomes a derived series in the folder ``out`` (DESIGN.md §6: new UIDs,
    ``DERIVED\\SECONDARY\\AXIAL``, a DerivationDescription naming the simulation and its
    parameters); a NIfTI file becomes ``out/<its name>`` with its header. The output is written
    to a hidden sibling and renamed into place when complete.

    Args:
        source: DICOM series folder or file, or NIfTI file.
        out: output folder; must not exist (or be empty) and must not lie inside ``source``.
        dose, geometry, i0, electronic_noise, seed: see :func:`simulate_low_dose`.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: slices per batch (default 4 on CPU, 16 on CUDA).
        progress: a progress bar over the slices (after the I0 calibration, which logs each step).

    Returns:
        The simulation and the path written (the series folder or the NIfTI file).

    Raises:
        InputError: unreadable source, or ``out`` not usable.
        ConfigError: a parameter is out of range.
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from n2g_ct.atomic import check_writable, staged_output
    from n2g_ct.devices import Processes, select_device
    from n2g_ct.io import read_volume
    from n2g_ct.io.dicom_writer import write_derived_series
    from n2g_ct.io.nifti import is_nifti, write_nifti

    source, out = Path(source), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"output {out} exists and is not an empty folder")
    if source.is_dir() and out.resolve().is_relative_to(source.resolve()):
        raise InputError(f"output {out} lies inside the input {source}")
    check_writable(out.resolve().parent)
    volume = read_volume(source)
    torch_device = select_device(device, Processes())
    batch_size = batch_size or (16 if torch_device.type == "cuda" else 4)
    spacing_yx = (volume.spacing_xyz[1], volume.spacing_xyz[0])
    log.info("simulating dose %g of %s (%d slices, %s) on %s", dose, source, len(volume.hu), geometry.describe(), torch_device)
    with logging_redirect_tqdm(), tqdm(total=len(volume.hu), unit="slice", desc=f"simulate dose {dose:g}",
                                       disable=not progress, dynamic_ncols=True) as bar:
        result = simulate_low_dose(
            volume.hu, spacing_yx, dose, geometry=geometry, i0=i0, electronic_noise=electronic_noise, seed=seed,
            padding_mask=volume.padding_mask, device=torch_device, batch_size=batch_size, on_slices=bar.update,
        )
    with staged_output(out) as staging:
        if source.is_file() and is_nifti(source):
            staging.mkdir()
            written = out / source.name
            clipping = write_nifti(staging / source.name, result.hu, volume)
            log.info("NIfTI data type's range: %d voxel(s) clipped below it, %d above it", clipping.below, clipping.above)
        else:
            written = out
            write_derived_series(volume, result.hu, staging, SimulationDerivation.of(result))
    return result, written


@dataclass(frozen=True)
class SimulationDerivation(Derivation):
    """Provenance of a simulated series: the DerivationDescription names the simulation and its parameters."""

    parameters: str = ""

    @classmethod
    def of(cls, result: SimulationResult) -> SimulationDerivation:
        """The derivation of a simulation; its UIDs follow from the parameters (seed included)."""
        parameters = result.describe()
        digest = hashlib.sha256(parameters.encode()).hexdigest()
        return cls(method=f"sim dose {result.dose:g}", checkpoint_sha256=digest, parameters=parameters)

    @property
    def description(self) -> str:
        """DerivationDescription text (ST)."""
        return f"Simulated lower dose by {self.software}: {self.parameters}"
