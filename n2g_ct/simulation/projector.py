"""The CT scan geometries and their projector: line integrals of a slice and filtered back-projection
(the Fourier-slice theorem by a non-uniform FFT); see :mod:`n2g_ct.simulation.low_dose` for the model."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from n2g_ct.errors import ConfigError

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
