"""Paired evaluation: the noisy input, denoisers and BM3D side by side on (low-dose, reference) slices.

For every evaluated slice and method: PSNR and SSIM in both windows of :mod:`n2g_ct.quality.metrics`, and the CT measures of :mod:`n2g_ct.quality.ct_measures` in uniform soft-tissue
ROIs found on the *reference* slice: noise std of the output, mean-HU bias (output − reference),
and the NPS of (output − reference), pooled over all slices per method. Do no harm: the RMSE and
mean of (output − reference) in bone (reference above 300 HU) and at edges (steep reference
gradients), which a denoiser that blurs or shifts anatomy raises above the noisy input's. And for
every method that changes the input, the reference-free self-checks of :mod:`n2g_ct.quality.self_check` on
the low-dose slices (what ``n2g-ct denoise`` and training check where no reference exists), so a
report shows whether those checks would have caught a harmful model. Padding (the ``valid``
mask of :class:`~n2g_ct.datasets.slices.PairedSliceDataset`) is kept out of every statistic.

Methods, in this order: ``noisy`` (the low-dose input itself), one per ``--model NAME=CHECKPOINT``
(run through :mod:`n2g_ct.inference.denoiser` in float32), and with ``bm3d=True`` the BM3D baselines of
:mod:`n2g_ct.evaluation.bm3d`: ``bm3d`` (noise PSD estimated from the low-dose slice alone) and
``bm3d-oracle`` (PSD of low-dose − reference, an upper bound).

Outputs in ``out_dir``: ``per_slice.csv``, ``summary.json`` (protocol, methods with checkpoint
SHA-256, mean ± std, NPS curves), ``report.md``, ``report.html`` and ``figures/``. Everything is
written into a hidden sibling ``.<out>.partial-<pid>`` that is renamed to ``out_dir`` only when
complete, so an interrupted run never leaves a complete-looking folder (a killed run's leftover is
removed by the next run).
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from n2g_ct import __version__
from n2g_ct.atomic import PARTIAL_MARK, check_writable, process_mark, staged_output
from n2g_ct.datasets.cache import VolumeCache
from n2g_ct.datasets.manifest import load_split
from n2g_ct.datasets.selection import PairSelection, evenly_spaced
from n2g_ct.datasets.slices import PairedSliceDataset
from n2g_ct.datasets.transforms import Keys
from n2g_ct.errors import ConfigError, InputError, N2GError
from n2g_ct.evaluation.bm3d import (
    bm3d_denoise,
    estimate_noise_psd,
    import_bm3d,
    oracle_noise_psd,
)
from n2g_ct.evaluation.reports import (
    NOISY,
    REFERENCE,
    ExampleSlice,
    render_text,
    write_csv,
    write_json,
    write_report,
)
from n2g_ct.inference.denoiser import denoiser_from_checkpoint
from n2g_ct.models.checkpoint import read_checkpoint
from n2g_ct.quality.ct_measures import (
    BONE_THRESHOLD_HU,
    DEFAULT_KEEP_FRACTION,
    DEFAULT_ROI_SIZE_PX,
    EDGE_GRADIENT_HU_PER_MM,
    EDGE_SMOOTHING_MM,
    SOFT_TISSUE_HU,
    bone_mask,
    check_roi_settings,
    edge_mask,
    find_uniform_rois,
    masked_error,
    noise_power_spectrum,
    nps_mean_frequency,
    radial_nps,
    roi_hu_bias,
    roi_noise_std,
    roi_patches,
)
from n2g_ct.quality.metrics import SSIM_SIGMA, SSIM_WINDOW_SIZE, WINDOWS, windowed_scores
from n2g_ct.quality.self_check import SelfCheck

log = logging.getLogger(__name__)

BM3D = "bm3d"
BM3D_ORACLE = "bm3d-oracle"
_RESERVED_NAMES = {NOISY, BM3D, BM3D_ORACLE, REFERENCE}
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
NPS_ROI_SIZE_PX = 32
"""Side of the ROIs the NPS is estimated in (the noise statistics use :data:`DEFAULT_ROI_SIZE_PX`)."""
PRIMARY_METRIC = "psnr_display"
"""The score that picks the example slices (median and worst) and leads the report's flags."""
SLICE_METRICS = (
    *(f"{kind}_{w.name}" for kind in ("psnr", "ssim") for w in WINDOWS),
    "roi_noise_std_hu",
    "roi_hu_bias_hu",
    "bone_rmse_hu",
    "bone_bias_hu",
    "edge_rmse_hu",
    "edge_bias_hu",
)
PER_SLICE_FIELDS = ("method", "pair", "series", "slice", *SLICE_METRICS, "roi_count", "reference_roi_noise_std_hu",
                    "bone_voxels", "edge_voxels")
"""Columns of ``per_slice.csv``: one row per evaluated slice and method."""


@dataclass(frozen=True)
class ModelSpec:
    """A denoiser to evaluate: its name in the report and its checkpoint file."""

    name: str
    checkpoint: Path

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``NAME=CHECKPOINT`` (the CLI's ``--model``) → ModelSpec; CHECKPOINT may be a named model
        (``starter=starter``).

        Raises:
            ConfigError: no ``=``, or an empty name or path.
        """
        from n2g_ct.models import NAMED_MODELS

        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--model {text!r}: expected NAME=CHECKPOINT, e.g. n2g=runs/n2g/checkpoint.pt")
        return cls(name, NAMED_MODELS[path][0] if path in NAMED_MODELS else Path(path))


@dataclass(frozen=True)
class RoiSettings:
    """How uniform ROIs are found (see :func:`n2g_ct.quality.ct_measures.find_uniform_rois`).

    Attributes:
        size_px: ROI side in pixels (multiple of 4, ≥ 8).
        hu_range: (low, high) HU the ROI mean must lie in.
        keep_fraction: flattest share of the candidate squares kept.
        nps_size_px: side of the (larger) ROIs the NPS is estimated in (TG-233 asks for large ROIs:
            fine frequency sampling, less variance); 0: ``size_px``.
    """

    size_px: int = DEFAULT_ROI_SIZE_PX
    hu_range: tuple[float, float] = SOFT_TISSUE_HU
    keep_fraction: float = DEFAULT_KEEP_FRACTION
    nps_size_px: int = NPS_ROI_SIZE_PX

    def __post_init__(self) -> None:
        try:
            check_roi_settings(self.size_px, self.keep_fraction)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def find(self, image_hu: np.ndarray, valid: np.ndarray, size_px: int | None = None) -> np.ndarray:
        """(n, 2) corners of uniform ROIs of ``size_px`` (default ``size_px``) on ``image_hu``."""
        return find_uniform_rois(image_hu, valid, size_px=size_px or self.size_px, hu_range=self.hu_range,
                                 keep_fraction=self.keep_fraction)


@dataclass(frozen=True)
class EvaluationResult:
    """Where the outputs are and what the summary says."""

    out_dir: Path
    summary: dict[str, Any]

    def render(self) -> str:
        """Mean ± std table and the output paths, for the terminal."""
        files = ", ".join(str(self.out_dir / name) for name in ("report.html", "report.md", "summary.json", "per_slice.csv"))
        return f"{render_text(self.summary)}\n\nwritten: {files}"


@dataclass(frozen=True)
class _Slice:
    """One evaluated slice: (y, x) HU arrays, the field of view, the pixel spacing (Δy, Δx) in mm."""

    low_dose: np.ndarray
    reference: np.ndarray
    valid: np.ndarray
    spacing_mm: tuple[float, float]
    pair: int
    index: int


@dataclass
class _Method:
    """A method: ``apply`` maps a slice to its (y, x) HU output, or None where it cannot run."""

    name: str
    apply: Callable[[_Slice], np.ndarray | None]
    info: dict[str, Any]
    seconds: float = 0.0
    missed: int = 0


@dataclass
class _NPSPool:
    """Radial NPS curves of many slices, averaged on the first slice's frequency grid, ROI-weighted."""

    frequency: np.ndarray | None = None
    total: np.ndarray | None = None
    squares: np.ndarray | None = None
    rois: int = 0
    slices: int = 0

    def add(self, patches: np.ndarray, spacing_mm: tuple[float, float]) -> None:
        if len(patches) == 0:
            return
        frequency, nps = radial_nps(noise_power_spectrum(patches, spacing_mm), spacing_mm)
        if self.frequency is None:
            self.frequency, self.total, self.squares = frequency, np.zeros_like(nps), np.zeros_like(nps)
        nps = np.interp(self.frequency, frequency, nps)
        self.total += len(patches) * nps
        self.squares += len(patches) * nps**2
        self.rois += len(patches)
        self.slices += 1

    def curve(self) -> dict[str, Any] | None:
        """Mean NPS and its standard error (spread of the per-slice curves, ROI-weighted, / √slices)."""
        if self.frequency is None or self.total is None or self.squares is None:
            return None
        nps = self.total / self.rois
        spread = np.sqrt(np.maximum(self.squares / self.rois - nps**2, 0.0))
        return {"frequency_per_mm": self.frequency.tolist(), "nps_hu2_mm2": nps.tolist(),
                "stderr_hu2_mm2": (spread / np.sqrt(self.slices)).tolist(), "rois": self.rois, "slices": self.slices,
                "mean_frequency_per_mm": nps_mean_frequency(self.frequency, nps)}


@dataclass
class _Accumulator:
    """Everything collected while iterating over the slices."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    reference_noise: list[float] = field(default_factory=list)
    nps: dict[str, _NPSPool] = field(default_factory=dict)
    self_checks: dict[str, SelfCheck] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------


def _check_names(models: Sequence[ModelSpec]) -> None:
    names = [m.name for m in models]
    for name in names:
        if name in _RESERVED_NAMES or not _NAME_PATTERN.fullmatch(name):
            raise ConfigError(f"model name {name!r}: use letters, digits and _.+- and none of "
                              f"{', '.join(sorted(_RESERVED_NAMES))}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"model name(s) {', '.join(duplicates)} given twice")


def _denoiser_method(spec: ModelSpec, device: str) -> _Method:
    """A checkpoint's denoiser F as a method (float32; raises InputError for a bad checkpoint)."""
    checkpoint = read_checkpoint(spec.checkpoint)
    denoiser = denoiser_from_checkpoint(checkpoint, device=device, precision="fp32")
    info = {"kind": "denoiser", "description": f"{checkpoint.info.method} denoiser, step {checkpoint.info.step}",
            "checkpoint": str(spec.checkpoint), "sha256": checkpoint.sha256, "training_method": checkpoint.info.method,
            "window_hu": checkpoint.info.window.as_list(), "device": str(denoiser.device),
            "precision": denoiser.precision}
    return _Method(spec.name, lambda s: denoiser(s.low_dose[None])[0], info)


def _bm3d_methods(roi: RoiSettings) -> list[_Method]:
    """BM3D with the estimated and with the oracle PSD (raises N2GError when bm3d is missing)."""
    import_bm3d()

    def estimated(s: _Slice) -> np.ndarray | None:
        psd = estimate_noise_psd(s.low_dose, s.valid, size_px=roi.size_px, hu_range=roi.hu_range,
                                 keep_fraction=roi.keep_fraction)
        return None if psd is None else bm3d_denoise(s.low_dose, psd)

    def oracle(s: _Slice) -> np.ndarray | None:
        psd = oracle_noise_psd(s.low_dose, s.reference, s.valid, size_px=roi.size_px)
        return None if psd is None else bm3d_denoise(s.low_dose, psd)

    return [
        _Method(BM3D, estimated, {"kind": "bm3d", "description": "BM3D, noise PSD estimated from the low-dose "
                                  "slice alone (its own uniform ROIs; no reference used)"}),
        _Method(BM3D_ORACLE, oracle, {"kind": "bm3d-oracle", "description": "BM3D, oracle noise PSD of "
                                      "(low-dose − reference): an upper bound, not a fair baseline"}),
    ]


# --------------------------------------------------------------------------------------------------
# Per slice
# --------------------------------------------------------------------------------------------------


def _load_slice(dataset: PairedSliceDataset, index: int) -> _Slice:
    item = dataset[index]
    (low_volume, _), _ = dataset.table.row(index)
    dx, dy, _ = low_volume.spacing_xyz
    return _Slice(item[Keys.LOW_DOSE_HU][0].numpy(), item[Keys.REFERENCE_HU][0].numpy(), item[Keys.VALID][0].numpy(),
                  (float(dy), float(dx)), int(item[Keys.PAIR]), int(item[Keys.SLICE]))


def _image_metrics(output: np.ndarray, reference: torch.Tensor, valid: torch.Tensor) -> dict[str, float]:
    out = torch.from_numpy(np.ascontiguousarray(output, dtype=np.float32))[None, None]
    return {name: float(values[0]) for name, values in windowed_scores(out, reference, valid).items()}


def _evaluate_slice(s: _Slice, methods: Sequence[_Method], roi: RoiSettings, series: str,
                    acc: _Accumulator) -> dict[str, np.ndarray]:
    """Score every method on one slice into ``acc``; returns the outputs (method name → HU)."""
    corners = roi.find(s.reference, s.valid)
    nps_size = roi.nps_size_px or roi.size_px
    nps_corners = roi.find(s.reference, s.valid, nps_size)
    if len(nps_corners) == 0:  # small or busy slices: the noise-statistics ROIs rather than none
        nps_size, nps_corners = roi.size_px, corners
    bone, edges = bone_mask(s.reference, s.valid), edge_mask(s.reference, s.spacing_mm, s.valid)
    reference_noise = roi_noise_std(s.reference, corners, roi.size_px)
    acc.reference_noise.append(reference_noise)
    acc.nps.setdefault(REFERENCE, _NPSPool()).add(roi_patches(s.reference, nps_corners, nps_size), s.spacing_mm)
    reference_t = torch.from_numpy(s.reference)[None, None]
    valid_t = torch.from_numpy(s.valid)[None, None]
    outputs = {}
    for method in methods:
        start = time.perf_counter()
        output = method.apply(s)
        method.seconds += time.perf_counter() - start
        row: dict[str, Any] = {"method": method.name, "pair": s.pair, "series": series, "slice": s.index,
                               "roi_count": len(corners), "reference_roi_noise_std_hu": reference_noise,
                               "bone_voxels": int(bone.sum()), "edge_voxels": int(edges.sum())}
        if output is None:
            method.missed += 1
            row.update(dict.fromkeys(SLICE_METRICS, float("nan")))
        else:
            outputs[method.name] = output
            row.update(_image_metrics(output, reference_t, valid_t))
            row["roi_noise_std_hu"] = roi_noise_std(output, corners, roi.size_px)
            row["roi_hu_bias_hu"] = roi_hu_bias(output, s.reference, corners, roi.size_px)
            row["bone_rmse_hu"], row["bone_bias_hu"] = masked_error(output, s.reference, bone)
            row["edge_rmse_hu"], row["edge_bias_hu"] = masked_error(output, s.reference, edges)
            acc.nps.setdefault(method.name, _NPSPool()).add(roi_patches(np.asarray(output, np.float64), nps_corners,
                                                                        nps_size), s.spacing_mm)
            if method.name != NOISY:
                acc.self_checks.setdefault(method.name, SelfCheck()).add(s.low_dose, output, s.spacing_mm, s.valid)
        acc.rows.append(row)
    return outputs


def _examples(dataset: PairedSliceDataset, indices: np.ndarray, methods: Sequence[_Method],
              rows: Sequence[dict[str, Any]], roi: RoiSettings, count: int) -> list[ExampleSlice]:
    """The report's example slices: median, then worst by the primary metric of the lead method,
    then evenly spaced; each re-run through the methods (a few slices: cheaper than keeping all)."""
    if count < 1:
        return []
    lead = next((m.name for m in methods if m.name != NOISY), NOISY)
    scored = sorted((float(r[PRIMARY_METRIC]), i) for i, r in zip(indices, (r for r in rows if r["method"] == lead))
                    if np.isfinite(float(r[PRIMARY_METRIC])))
    chosen: dict[int, str] = {}
    if scored:
        chosen[int(scored[(len(scored) - 1) // 2][1])] = f"median {PRIMARY_METRIC} of {lead}"
        chosen.setdefault(int(scored[0][1]), f"worst {PRIMARY_METRIC} of {lead}")
    for index in indices[evenly_spaced(len(indices), count)]:
        chosen.setdefault(int(index), "evenly spaced")
    examples = []
    for index, why in list(chosen.items())[:count]:
        s = _load_slice(dataset, index)
        outputs = {m.name: out for m in methods if (out := m.apply(s)) is not None}
        examples.append(ExampleSlice(f"pair {s.pair}, slice {s.index} ({why})", outputs, s.reference,
                                     roi.find(s.reference, s.valid), roi.size_px))
    return examples


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------


def _stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std and count of the finite values (a PSNR of identical images is +inf)."""
    finite = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(finite.mean()), "std": float(finite.std(ddof=1)) if finite.size > 1 else None,
            "n": int(finite.size)}


def _protocol(roi: RoiSettings, device: str, bm3d: bool) -> dict[str, Any]:
    protocol: dict[str, Any] = {
        "windows": [{"name": w.name, "low_hu": w.low, "high_hu": w.high, "data_range_hu": w.data_range,
                     "clipped": True} for w in WINDOWS],
        "psnr": "10·log10(R²/MSE), R = the window's data range, MSE over the field of view, both images "
                "clipped to the window",
        "ssim": {"window": "gaussian", "window_size": SSIM_WINDOW_SIZE, "sigma": SSIM_SIGMA,
                 "covariance": "population", "use_sample_covariance": False, "data_range": "the window's",
                 "region": "whole slice: mean of the SSIM map over the field of view, 5-pixel border left out",
                 "implementation": "MONAI compute_ssim_and_cs (equals skimage structural_similarity with "
                                   "gaussian_weights=True, sigma=1.5, use_sample_covariance=False)"},
        "rois": {"found_on": "reference", "size_px": roi.size_px, "hu_range": list(roi.hu_range),
                 "keep_fraction": roi.keep_fraction,
                 "rule": f"squares of {roi.size_px} px on a grid, wholly in the field of view, with each of their 4×4 "
                         f"block means of the reference in [{roi.hu_range[0]:g}, {roi.hu_range[1]:g}] HU; the "
                         f"flattest {roi.keep_fraction:g} of them by the std of those block means (anatomy, not "
                         "noise) are kept."},
        "noise_std": "pooled sample std of the output inside the ROIs, sqrt(mean of per-ROI variances), HU",
        "hu_bias": "mean of (output − reference) over the ROI pixels, HU",
        "bone": f"RMSE and mean of (output − reference) over the voxels where the reference is above "
                f"{BONE_THRESHOLD_HU:g} HU, per slice, HU",
        "edges": f"RMSE and mean of (output − reference) over the voxels where the reference, smoothed by a "
                 f"Gaussian of σ {EDGE_SMOOTHING_MM:g} mm, has a gradient of at least "
                 f"{EDGE_GRADIENT_HU_PER_MM:g} HU/mm, per slice, HU",
        "nps": f"of each image itself (every method's output, the reference alike) in uniform ROIs of "
               f"{roi.nps_size_px or roi.size_px} px found on the reference ({roi.size_px} px on slices without "
               "any), each minus its least-squares plane; "
               "NPS = Δy·Δx/(Ny·Nx)·⟨|DFT|²⟩ in HU²·mm², radially averaged, frequency in cycles/mm "
               "from the pixel spacing; pooled over all slices weighted by ROI count; error band: the "
               "standard error of the mean over slices",
        "inference": {"precision": "fp32", "device": device},
        "self_checks": ("reference-free, on the low-dose slices only (n2g_ct.quality.self_check): the HU shift "
                        "mean(output − input) in uniform soft-tissue ROIs found on the output; the largest ratio, "
                        "over rings of radial frequency, of the NPS of (input − output) in every tissue tile to "
                        "the input's own noise NPS in its uniform ROIs; the mean (input − output)² at edges of "
                        "the output over that elsewhere in the body"),
    }
    if bm3d:
        protocol["bm3d"] = ("bm3d package, profile 'np', both stages, one PSD per slice. Estimated PSD: NPS of the "
                            "low-dose slice in its own uniform ROIs (same rule, found on the low-dose slice, "
                            "plane-detrended), mapped to the slice size through its autocovariance; no reference "
                            "used. Oracle PSD: NPS of (low-dose − reference) in all grid squares inside the body.")
    return protocol


def _summary(methods: Sequence[_Method], acc: _Accumulator, data: dict[str, Any], protocol: dict[str, Any],
             skipped: list[str], seconds: float) -> dict[str, Any]:
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        rows = [r for r in acc.rows if r["method"] == method.name]
        results[method.name] = {key: _stats([r[key] for r in rows]) for key in SLICE_METRICS}
        results[method.name]["seconds_per_slice"] = method.seconds / max(len(rows), 1)
    pools = [(name, acc.nps.get(name)) for name in (*(m.name for m in methods), REFERENCE)]
    nps = {name: curve for name, pool in pools if pool is not None and (curve := pool.curve()) is not None}
    return {
        "n2g_ct_version": __version__,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": data,
        "protocol": protocol,
        "methods": [{"name": m.name, **m.info, "slices_without_output": m.missed} for m in methods],
        "skipped": skipped,
        "results": results,
        "reference": {"roi_noise_std_hu": _stats(acc.reference_noise)},
        "nps": nps,
        "self_checks": {name: check.result().as_dict() for name, check in acc.self_checks.items()},
        "seconds": seconds,
    }


# --------------------------------------------------------------------------------------------------
# Staged output folder
# --------------------------------------------------------------------------------------------------


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"{out_dir}: exists and is not empty; pass --overwrite to replace it")
    check_writable(out_dir.resolve().parent)


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def evaluate(
    pairs: Sequence[PairSelection],
    out_dir: Path,
    *,
    models: Sequence[ModelSpec] = (),
    bm3d: bool = False,
    split: str | None = None,
    max_slices: int | None = None,
    examples: int = 2,
    roi: RoiSettings = RoiSettings(),
    device: str = "auto",
    cache: VolumeCache | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate the noisy input, ``models`` and optionally BM3D on paired slices; write the outputs.

    Args:
        pairs: (low-dose, reference) series with optional slice selections.
        out_dir: output folder (see the module docstring); created.
        models: denoisers by name and checkpoint.
        bm3d: add the BM3D baselines; skipped with a warning (and a note in the report) when the
            optional bm3d package is not installed.
        split: name of the manifest split the pairs come from (recorded in the protocol).
        max_slices: evaluate this many slices evenly spaced over all paired slices (quick runs).
        examples: slices shown side by side in the report: the median and the worst slice by
            :data:`PRIMARY_METRIC` of the first denoiser (the noisy input without one), then
            evenly spaced others.
        roi: uniform-ROI settings.
        device: where denoisers run: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        cache: volume cache; default: a temporary one beside ``out_dir``, removed at the end.
        overwrite: replace a non-empty ``out_dir``.
        progress: progress bar over slices (rate and ETA) on stderr.

    Raises:
        ConfigError: bad model names, a non-empty ``out_dir`` without ``overwrite``, bad ``max_slices``.
        InputError: missing or unreadable series or checkpoints, pairs that do not match, no pairs.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    _check_names(models)
    if max_slices is not None and max_slices < 1:
        raise ConfigError(f"--max-slices must be ≥ 1, got {max_slices}")
    if not pairs:
        raise InputError("no (low-dose, reference) pairs to evaluate")
    methods = [_Method(NOISY, lambda s: s.low_dose, {"kind": "input", "description": "the low-dose input itself"})]
    methods += [_denoiser_method(spec, device) for spec in models]
    skipped = []
    if bm3d:
        try:
            methods += _bm3d_methods(roi)
        except N2GError as exc:
            log.warning("BM3D skipped: %s", exc)
            skipped.append(f"BM3D: {exc}")
    with contextlib.ExitStack() as stack:
        if cache is None:  # a temporary cache beside the output, removed at the end: no lasting copy of the images
            cache = VolumeCache(Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix=f".{out_dir.name}{PARTIAL_MARK}{process_mark()}.cache-", dir=out_dir.resolve().parent))))
        return _evaluate(pairs, out_dir, methods, skipped, cache, split=split, max_slices=max_slices,
                         examples=examples, roi=roi, progress=progress)


def _evaluate(pairs: Sequence[PairSelection], out_dir: Path, methods: list[_Method], skipped: list[str],
              cache: VolumeCache, *, split: str | None, max_slices: int | None, examples: int, roi: RoiSettings,
              progress: bool) -> EvaluationResult:
    """Score ``methods`` on the pairs and write the outputs (see :func:`evaluate`)."""
    dataset = PairedSliceDataset(pairs, cache=cache)
    indices = evenly_spaced(len(dataset), max_slices)
    acc = _Accumulator()
    start = time.perf_counter()
    log.info("evaluating %d of %d paired slices with %s", len(indices), len(dataset), ", ".join(m.name for m in methods))
    with staged_output(out_dir) as staging:
        staging.mkdir()
        with logging_redirect_tqdm(), tqdm(total=len(indices), unit="slice", desc="evaluate", disable=not progress,
                                           dynamic_ncols=True) as bar:
            for index in indices:
                s = _load_slice(dataset, int(index))
                _evaluate_slice(s, methods, roi, pairs[s.pair].low_dose.name, acc)
                bar.update(1)
        data = {"split": split, "pairs": len(pairs), "slices": len(indices), "slices_available": len(dataset),
                "slice_selection": "all" if len(indices) == len(dataset)
                else f"{len(indices)} evenly spaced of {len(dataset)}"}
        device_name = next((m.info["device"] for m in methods if "device" in m.info), "(no denoiser)")
        with_bm3d = any(m.name == BM3D for m in methods)
        summary = _summary(methods, acc, data, _protocol(roi, device_name, with_bm3d), skipped,
                           time.perf_counter() - start)
        write_csv(staging / "per_slice.csv", acc.rows, PER_SLICE_FIELDS)
        write_report(staging, summary, acc.rows, _examples(dataset, indices, methods, acc.rows, roi, examples))
        write_json(staging / "summary.json", summary)
    log.info("evaluation written to %s", out_dir)
    return EvaluationResult(out_dir, summary)


def evaluate_split(manifest: Path, split: str | None, out_dir: Path, *, data_root: Path | None = None,
                   **options: Any) -> EvaluationResult:
    """:func:`evaluate` over the test pairs of a manifest split; ``options`` as for :func:`evaluate`.

    Raises:
        ConfigError: unknown split (the message lists the manifest's splits).
        InputError: missing/invalid manifest, or a split without test pairs.
    """
    selection = load_split(manifest, split, data_root)
    if not selection.test:
        raise InputError(f"{manifest}: split {selection.name!r} has no test pairs")
    return evaluate(selection.test, out_dir, split=selection.name, **options)
