"""Noise2Grad's synthesised noise level over training against the true noise level, and learning curves.

    python -m n2g_ct.research.benchmarks.noise_scale --run default=RUN_DIR --run faithful=RUN_DIR \\
        --pair LOW_DOSE_SERIES REFERENCE_SERIES 0:60 [--pair ...] --out FIGURE.png

Reads each run's ``train_log.csv`` (``noise_std``: the std of ``n_tilde`` over the batch, in network
units; ``g_weight``: G's mean weight, for a learned or spectral G) and ``validation.csv``.
The true noise is measured *after* the fact, with references the runs never saw: the std of
(low dose − reference) over random crops of the training crop size, in HU, pooled like the
training log's batch std, over the slices of every ``--pair`` (``START:STOP[:STEP]``, e.g. the
noisy pool's slices). Writes one
figure (synthesised noise std in HU and G's weight against steps, validation PSNR against steps
and minutes; for runs with a ``spectral`` noise scale also the noise power per frequency band that
G synthesises, against the true one and the residual's own) and prints a table of the last logged values.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch

from n2g_ct.evaluation.reports import figure, png
from n2g_ct.io import read_volume
from n2g_ct.methods.noise_scale import BANDS, SpectralNoiseGain, band_centres, band_index
from n2g_ct.models.checkpoint import load_checkpoint, read_checkpoint
from n2g_ct.training.run_folder import RunFolder


def _difference_crops(low_dose: np.ndarray, reference: np.ndarray, crop: int, crops: int, seed: int) -> np.ndarray:
    """(crops, crop, crop) random crops of ``low_dose − reference`` (float64 HU)."""
    difference = low_dose.astype(np.float64) - reference
    rng = np.random.default_rng(seed)
    z = rng.integers(0, difference.shape[0], crops)
    y = rng.integers(0, difference.shape[1] - crop + 1, crops)
    x = rng.integers(0, difference.shape[2] - crop + 1, crops)
    return np.stack([difference[k, i : i + crop, j : j + crop] for k, i, j in zip(z, y, x, strict=True)])


def true_noise_std_hu(low_dose: np.ndarray, reference: np.ndarray, crop: int, crops: int = 256, seed: int = 0) -> float:
    """Std (HU) of ``low_dose − reference`` over ``crops`` random ``crop``² crops, pooled like a batch.

    Args:
        low_dose, reference: (z, y, x) HU, aligned.
    """
    return float(_difference_crops(low_dose, reference, crop, crops, seed).std())


def true_noise_spectrum(low_dose: np.ndarray, reference: np.ndarray, crop: int, crops: int = 256,
                        seed: int = 0) -> np.ndarray:
    """Power of ``low_dose − reference`` per `SpectralNoiseGain` band, (bands,), in HU² per Fourier
    coefficient (``|FFT|²/crop²``, the units of the spectral G's ``cross``), over random ``crop``² crops."""
    patches = torch.from_numpy(_difference_crops(low_dose, reference, crop, crops, seed))
    return band_means(torch.fft.rfft2(patches).abs().square().mean(0) / crop**2)


def band_means(per_coefficient: torch.Tensor) -> np.ndarray:
    """Mean of an (H, W//2+1) ``rfft2``-shaped map over each `SpectralNoiseGain` band, (bands,)."""
    bands = band_index(per_coefficient.shape[0], 2 * (per_coefficient.shape[1] - 1))
    return np.array([float(per_coefficient[bands == b].mean()) for b in range(BANDS)])


def _spectral_gain(run_dir: Path) -> SpectralNoiseGain | None:
    """The run's spectral G at its last checkpoint, or None for any other G."""
    buffers = load_checkpoint(RunFolder(run_dir).last_checkpoint).get("noise_approximator")
    if buffers is None or "cross" not in buffers:
        return None
    gain = SpectralNoiseGain(int(buffers["cross"].shape[0]))
    gain.load_state_dict(buffers)
    return gain


def _rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV log; none when the run did not write it (no validation)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _window_width_hu(run_dir: Path) -> tuple[float, int]:
    info = read_checkpoint(RunFolder(run_dir).last_checkpoint).info
    return info.window.width, int(info.config["data"]["crop_size"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="NAME=DIR", help="a training run folder")
    parser.add_argument("--pair", nargs=3, action="append", required=True, metavar=("LOW_DOSE", "REFERENCE", "SLICES"),
                        help="paired series and their slices as START:STOP[:STEP] (':' for all); repeatable")
    parser.add_argument("--out", type=Path, required=True, help="figure (PNG)")
    args = parser.parse_args(argv)

    runs = {name: Path(folder) for name, _, folder in (item.partition("=") for item in args.run)}
    for name, folder in runs.items():
        if not name or not RunFolder(folder).train_log.is_file() or not RunFolder(folder).last_checkpoint.is_file():
            parser.error(f"--run {name}={folder}: expected NAME=RUN_DIR, a folder written by n2g-ct train")
    width_hu, crop = _window_width_hu(next(iter(runs.values())))
    lows, references = [], []
    for low_path, reference_path, text in args.pair:
        try:
            chosen = slice(*(int(v) if v else None for v in text.split(":")))
        except (TypeError, ValueError):
            parser.error(f"--pair {low_path}: slices {text!r} are not START:STOP[:STEP] (':' for all)")
        low, reference = read_volume(Path(low_path)).hu[chosen], read_volume(Path(reference_path)).hu[chosen]
        if lows and low.shape[1:] != lows[0].shape[1:]:
            parser.error(f"--pair {low_path}: slices of another size than the first pair's; measure them apart")
        lows.append(low)
        references.append(reference)
    low_dose, reference = np.concatenate(lows), np.concatenate(references)
    true_std = true_noise_std_hu(low_dose, reference, crop)
    slices = ", ".join(text for _, _, text in args.pair)

    logs = {name: [r for r in _rows(RunFolder(run_dir).train_log) if r.get("noise_std")] for name, run_dir in runs.items()}
    gains = {name: _spectral_gain(run_dir) for name, run_dir in runs.items()}
    has_weight = any(r.get("g_weight") for log in logs.values() for r in log)
    has_spectrum = any(gain is not None for gain in gains.values())
    panels = 3 + has_weight + has_spectrum  # G's weight and spectrum only where a run has them
    fig = figure(4 * panels, 4)
    axes = list(fig.subplots(1, panels))
    noise_axis, steps_axis, minutes_axis = axes.pop(0), axes.pop(0), axes.pop(0)
    weight_axis = axes.pop(0) if has_weight else None
    spectrum_axis = axes.pop(0) if has_spectrum else None
    centres = band_centres().numpy()
    true_spectrum = true_noise_spectrum(low_dose, reference, crop)
    if spectrum_axis is not None:
        spectrum_axis.plot(centres, true_spectrum, color="black", linestyle="--",
                           label="true (paired slices, after training)")
    spectra: dict[str, dict[str, np.ndarray]] = {}
    print(f"true noise std on slices {slices}: {true_std:.1f} HU ({crop}² crops of low dose − reference)")
    print("| run | steps | G weight | synthesised noise std (HU) | ratio to true | last validation PSNR (dB) |")
    print("|---|---|---|---|---|---|")
    for name, run_dir in runs.items():
        log = logs[name]
        steps = [int(r["step"]) for r in log]
        noise_hu = [float(r["noise_std"]) * width_hu for r in log]
        weights = [float(r["g_weight"]) if r.get("g_weight") else np.nan for r in log]
        minutes = {int(r["step"]): float(r["time_s"]) / 60 for r in _rows(RunFolder(run_dir).train_log)}
        validation = [(int(r["step"]), float(r["psnr_display"])) for r in _rows(RunFolder(run_dir).validation_log)]
        line, = noise_axis.plot(steps, noise_hu, label=f"{name} (per batch)", alpha=0.3)
        window = min(25, len(noise_hu))
        trend = [float(np.median(noise_hu[max(0, k - window + 1): k + 1])) for k in range(len(noise_hu))]
        noise_axis.plot(steps, trend, color=line.get_color(), label=f"{name} (running median of {window})")
        if weight_axis is not None:
            weight_axis.plot(steps, weights, label=name)
        steps_axis.plot([s for s, _ in validation], [p for _, p in validation], marker=".", label=name)
        minutes_axis.plot([minutes.get(s, np.nan) for s, _ in validation], [p for _, p in validation],
                          marker=".", label=name)
        gain = gains[name]
        if gain is not None:  # channel means, HU² per coefficient
            residual = gain.power.mean(0).numpy() * width_hu**2
            synthetic = (gain.weight**2 * gain.power).mean(0).numpy() * width_hu**2
            estimate = gain.cross.mean(0).numpy() * width_hu**2
            line, = spectrum_axis.plot(centres, synthetic, label=f"{name}: synthetic noise (G)")
            spectrum_axis.plot(centres, residual, color=line.get_color(), linestyle=":",
                               label=f"{name}: residual n_hat")
            spectra[name] = {"residual n_hat": residual, "cross-power estimate": estimate, "synthetic noise": synthetic}
        last_noise = float(np.median(noise_hu[-10:]))
        weight = "–" if np.isnan(weights[-1]) else f"{weights[-1]:.3f}"
        last_psnr = f"{validation[-1][1]:.2f}" if validation else "–"
        print(f"| {name} | {steps[-1]} | {weight} | {last_noise:.1f} | {last_noise / true_std:.2f} | {last_psnr} |")
    noise_axis.axhline(true_std, color="black", linestyle="--", label="true (paired slices, measured after training)")
    noise_axis.set(xlabel="optimiser steps", ylabel="std of synthesised noise n_tilde (HU)")
    steps_axis.set(xlabel="optimiser steps", ylabel="validation PSNR (dB), [-160, 240] HU")
    minutes_axis.set(xlabel="training time (min)", ylabel="validation PSNR (dB), [-160, 240] HU")
    if weight_axis is not None:
        weight_axis.set(xlabel="optimiser steps", ylabel="G weight (noise scale; spectral G: mean band gain)")
    if spectrum_axis is not None:
        spectrum_axis.set(xlabel="radial frequency (cycles/pixel)", ylabel="noise power per coefficient (HU²)",
                          yscale="log", title="spectral G, end of training")
    for axis in fig.axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    if spectra:
        print("\nnoise power per coefficient (HU²) by band (cycles/pixel), spectral G at the end of training:")
        print("| | " + " | ".join(f"{c:.2f}" for c in centres) + " |")
        print("|---" * (len(centres) + 1) + "|")
        print("| true | " + " | ".join(f"{v:.0f}" for v in true_spectrum) + " |")
        for name, rows in spectra.items():
            for label, values in rows.items():
                print(f"| {name}: {label} | " + " | ".join(f"{v:.0f}" for v in values) + " |")
    args.out.write_bytes(png(fig))
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
