"""Which frequencies of the noise trained denoisers leave in place, measured on paired slices.

    python -m n2g_ct.research.benchmarks.noise_left --model NAME=CHECKPOINT [--model ...] \\
        --low-dose LOW_DOSE_SERIES --reference REFERENCE_SERIES --slices 110:141:3

For each model and radial frequency band of whole slices, with ``N`` the Fourier transform of
(low dose − reference) and ``E`` that of (output − reference): the share of the noise left,
``Re<E, N> / |N|²`` (1: untouched, 0: removed), and the error power ``|E|²`` per pixel (HU²). The
first row, the noisy input itself, gives the noise power per band (compare slice ranges with it:
e.g. the training pool's slices against the test slices).
A diagnostic for denoisers that lose to supervision: it shows the frequencies where they do.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from n2g_ct.inference.denoiser import denoiser_from_checkpoint
from n2g_ct.io import read_volume
from n2g_ct.models.checkpoint import read_checkpoint

BAND_EDGES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.71)
"""Radial frequency bands, cycles/pixel."""


def noise_left_by_band(low_dose: np.ndarray, reference: np.ndarray, output: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(share of noise left, error power in HU² per pixel) per band of `BAND_EDGES`, from (z, y, x) HU arrays."""
    noise = np.fft.fft2(low_dose.astype(np.float64) - reference)
    error = np.fft.fft2(output.astype(np.float64) - reference)
    fy, fx = np.fft.fftfreq(low_dose.shape[1])[:, None], np.fft.fftfreq(low_dose.shape[2])[None, :]
    radius = np.sqrt(fy**2 + fx**2)
    left, power = [], []
    for low, high in zip(BAND_EDGES[:-1], BAND_EDGES[1:], strict=True):
        inside = (radius >= low) & (radius < high)
        left.append(np.real(error[:, inside] * np.conj(noise[:, inside])).sum() / (np.abs(noise[:, inside]) ** 2).sum())
        power.append((np.abs(error[:, inside]) ** 2).sum() / error.size / radius.size)
    return np.array(left), np.array(power)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], metavar="NAME=CHECKPOINT",
                        help="a trained model (none: only the noise itself, the 'noisy input' row)")
    parser.add_argument("--low-dose", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--slices", default="::", help="START:STOP:STEP (default: all)")
    args = parser.parse_args(argv)
    chosen = slice(*(int(part) if part else None for part in (args.slices.split(":") + ["", ""])[:3]))
    low_dose, reference = read_volume(args.low_dose).hu[chosen], read_volume(args.reference).hu[chosen]
    if low_dose.shape != reference.shape:
        parser.error(f"--low-dose and --reference differ in shape: {low_dose.shape} and {reference.shape}")
    bands = " | ".join(f"{lo:g}–{hi:g}" for lo, hi in zip(BAND_EDGES[:-1], BAND_EDGES[1:], strict=True))
    print(f"{low_dose.shape[0]} slices; bands in cycles/pixel: {bands}")
    print("| model | share of noise left per band | error power per band (HU²) |")
    print("|---|---|---|")
    _print_row("noisy input", *noise_left_by_band(low_dose, reference, low_dose))
    for item in args.model:
        name, _, path = item.partition("=")
        if not name or not path:
            parser.error(f"--model {item}: expected NAME=CHECKPOINT")
        denoiser = denoiser_from_checkpoint(read_checkpoint(Path(path)), device="cpu")
        output = np.concatenate([denoiser(low_dose[i : i + 1]) for i in range(len(low_dose))])
        _print_row(name, *noise_left_by_band(low_dose, reference, output))


def _print_row(name: str, left: np.ndarray, power: np.ndarray) -> None:
    print(f"| {name} | {' / '.join(f'{v:.2f}' for v in left)} | {' / '.join(f'{v:.0f}' for v in power)} |")


if __name__ == "__main__":
    main()
