"""Measure the low-dose simulator on a real series: speed vs scikit-image, round trip, calibration, dose scaling.

    python -m n2g_ct.research.benchmarks.simulator --data ../shared/data/ct/chest-popi/dicom

Prints:

- speed: a 512² slice projected and reconstructed (parallel beam, 720 views over 180°, ramp FBP)
  by ``skimage.transform.radon`` + ``iradon`` (same views, ``circle=False``) and by n2g-ct, alone
  and in a batch of 4, median of ``--repeats`` runs each;
- round trip: RMSE (HU) of FBP(projection) against the image (HU clipped at −1000, where μ = 0),
  parallel and fan, in the body (HU > −500) and everywhere, on 5 evenly spaced slices;
- calibration at dose 0.25 on the whole series (fan, the default): σ_src, target and achieved
  added noise, the spread over slices of the added-to-source noise ratio, I0 range, the time
  per slice of the whole simulation;
  neighbour correlation of the source's noise and of the added noise in the same windows;
- dose scaling at a fixed I0: the added noise's std ratio between doses 0.5 and 0.125 (expected
  2), without and with electronic noise.

scikit-image is needed for the speed comparison only (``pip install scikit-image``).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from n2g_ct.io import read_volume
from n2g_ct.quality.noise_estimate import NoiseEstimate, estimate_noise_std
from n2g_ct.research.benchmarks import median_seconds
from n2g_ct.simulation.low_dose import LowDoseSimulator, simulate_low_dose
from n2g_ct.simulation.projector import ScanGeometry

VIEWS = 720



def _speed(hu: np.ndarray, spacing_yx: tuple[float, float], repeats: int) -> None:
    """``hu``: (4, y, x); the first slice is timed alone, the four as one batch."""
    from skimage.transform import iradon, radon

    angles = np.arange(VIEWS) * 180.0 / VIEWS
    mu = 0.0192 * np.clip(1 + hu[0] / 1000, 0, None)
    skimage_s = median_seconds(lambda: iradon(radon(mu, angles, circle=False), angles, output_size=len(mu),
                                               filter_name="ramp", circle=False), repeats)
    start = time.perf_counter()
    simulator = LowDoseSimulator(hu.shape[1:], spacing_yx, ScanGeometry("parallel", views=VIEWS, filter="ramp"))
    build_s = time.perf_counter() - start
    batch = torch.from_numpy(hu)
    with torch.inference_mode():
        one_s = median_seconds(lambda: simulator.round_trip(batch[:1]), repeats)
        batch_s = median_seconds(lambda: simulator.round_trip(batch), repeats) / len(hu)
    print(f"speed, {hu.shape[1]}x{hu.shape[2]} slices, {VIEWS} views/180deg, projection + ramp FBP "
          f"(median of {repeats}, {torch.get_num_threads()} threads):")
    print(f"  skimage radon+iradon {skimage_s:.2f} s/slice; n2g-ct {one_s:.3f} s for 1 slice ({skimage_s / one_s:.0f}x "
          f"faster), {batch_s:.3f} s/slice in a batch of {len(hu)} ({skimage_s / batch_s:.0f}x); "
          f"+ {build_s:.2f} s once per geometry")


def _round_trip(hu: np.ndarray, spacing_yx: tuple[float, float]) -> None:
    reference = np.maximum(hu, -1000.0)
    body = hu > -500
    print(f"noiseless round trip (ramp FBP), RMSE in HU vs the image clipped at -1000 HU, {len(hu)} slices:")
    for kind in ("parallel", "fan"):
        simulator = LowDoseSimulator(hu.shape[1:], spacing_yx, ScanGeometry(kind))
        with torch.inference_mode():
            error = simulator.round_trip(torch.from_numpy(hu)).numpy() - reference
        print(f"  {kind:8s} body {np.sqrt(np.mean(error[body] ** 2)):.2f} HU, all {np.sqrt(np.mean(error**2)):.2f} HU")


def _neighbour_correlation(image: np.ndarray, estimate: NoiseEstimate) -> float:
    """Mean correlation of horizontally adjacent pixels within the estimate's windows (plane not removed)."""
    w = estimate.window_px
    z, wy, wx = np.nonzero(estimate.windows)
    tiles = np.stack([image[k, a * w : (a + 1) * w, b * w : (b + 1) * w] for k, a, b in zip(z, wy, wx)]).astype(float)
    tiles -= tiles.mean(axis=(1, 2), keepdims=True)
    return float(np.mean(tiles[:, :, 1:] * tiles[:, :, :-1]) / np.mean(tiles**2))


def _calibration(hu: np.ndarray, spacing_yx: tuple[float, float], padding: np.ndarray | None, dose: float) -> float:
    start = time.perf_counter()
    result = simulate_low_dose(hu, spacing_yx, dose, padding_mask=padding, seed=0)
    seconds = time.perf_counter() - start
    estimate = estimate_noise_std(hu, spacing_yx, padding)
    added = result.hu - hu
    ratio = estimate.measure_slices(added) / estimate.slice_std_hu
    ratio = ratio[~np.isnan(ratio)] / math.sqrt(1 / dose - 1)
    print(f"calibrated simulation, dose {dose:g}, {result.geometry.describe()}, {len(hu)} slices:")
    print(f"  source noise sigma_src {result.source_noise_hu:.1f} HU (median over slices; slices "
          f"{np.nanmin(estimate.slice_std_hu):.1f} to {np.nanmax(estimate.slice_std_hu):.1f} HU)")
    print(f"  added noise {result.added_noise_hu:.1f} HU, target sqrt(1/d - 1)*sigma_src = {result.target_added_noise_hu:.1f} HU")
    print(f"  per slice, added / target: median {np.median(ratio):.2f}, 5-95% {np.percentile(ratio, 5):.2f} to "
          f"{np.percentile(ratio, 95):.2f} ({len(ratio)} slices with a measured noise)")
    print(f"  I0 {result.i0.min():.3g} to {result.i0.max():.3g} photons/ray; {seconds:.0f} s ({seconds / len(hu):.2f} s/slice)")
    print(f"  neighbour-pixel correlation in the soft-tissue windows: source {_neighbour_correlation(hu, estimate):.2f}, "
          f"added noise {_neighbour_correlation(added, estimate):.2f}")
    return float(np.median(result.i0))


def _dose_scaling(hu: np.ndarray, spacing_yx: tuple[float, float], padding: np.ndarray | None, i0: float) -> None:
    body = hu > -500
    print(f"dose scaling at I0 {i0:.3g} (fan), {len(hu)} slices, std of the added noise in the body:")
    for electronic in (0.0, 10.0):
        stds = [np.std((simulate_low_dose(hu, spacing_yx, dose, i0=i0, electronic_noise=electronic,
                                          padding_mask=padding).hu - hu)[body]) for dose in (0.5, 0.125)]
        print(f"  sigma_e {electronic:g}: dose 0.5 {stds[0]:.1f} HU, dose 0.125 {stds[1]:.1f} HU, "
              f"ratio {stds[1] / stds[0]:.2f} (1/sqrt(dose) predicts 2)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="routine-dose DICOM series folder")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (median)")
    parser.add_argument("--dose", type=float, default=0.25, help="dose of the calibrated simulation")
    args = parser.parse_args()
    volume = read_volume(args.data)
    spacing_yx = (volume.spacing_xyz[1], volume.spacing_xyz[0])
    hu, padding = volume.hu, volume.padding_mask
    some = np.linspace(0, len(hu) - 1, 5).round().astype(int)
    print(f"{args.data}: {hu.shape[0]} slices of {hu.shape[1]}x{hu.shape[2]}, pixel {spacing_yx[0]:.3f} mm")
    _speed(hu[len(hu) // 2 : len(hu) // 2 + 4], spacing_yx, args.repeats)
    _round_trip(hu[some], spacing_yx)
    i0 = _calibration(hu, spacing_yx, padding, args.dose)
    subset = np.linspace(0, len(hu) - 1, 8).round().astype(int)
    _dose_scaling(hu[subset], spacing_yx, None if padding is None else padding[subset], i0)


if __name__ == "__main__":
    main()
