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

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from n2g_ct.datasets.selection import evenly_spaced
from n2g_ct.errors import ConfigError
from n2g_ct.quality.noise_estimate import NoiseEstimate, estimate_noise_std
from n2g_ct.simulation.projector import MU_WATER_PER_MM, FanBeam, Filter, ParallelBeam, ScanGeometry

log = logging.getLogger(__name__)


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
    picks = measurable[evenly_spaced(len(measurable), _CALIBRATION_SLICES)]
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
