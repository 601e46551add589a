"""End-to-end speed and peak memory of ``n2g-ct denoise`` on one DICOM series (DICOM in → DICOM out).

    python -m n2g_ct.research.benchmarks.denoise_speed --data ../shared/data/ct/chest-popi/dicom
    python -m n2g_ct.research.benchmarks.denoise_speed --data ../shared/data/ct/chest-popi/dicom --slices 1000

Denoises the series with an untrained U-Net of ``--base-width`` (default 32, the official F) through
:func:`n2g_ct.inference.denoise.denoise_inputs`, the function behind the CLI, and prints: slices/s, the time
inside the U-Net's forward passes and the share spent outside them (reading, decoding, windowing,
writing, bookkeeping), and the process's peak resident memory (``ru_maxrss``) before and after the run.
``--slices N`` first writes an N-slice series built from the source slices (cycled, restacked at the
source spacing, with new UIDs) to a temporary folder, to show how memory grows with series length.
Run each case in its own process: ``ru_maxrss`` is a high-water mark.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.uid import generate_uid

from n2g_ct.inference.denoise import denoise_inputs
from n2g_ct.io import scan_dicom
from n2g_ct.models import UNet, build_denoiser
from n2g_ct.models.checkpoint import save_checkpoint


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _write_checkpoint(path: Path, base_width: int) -> Path:
    torch.manual_seed(0)
    config = {
        "data": {"window_hu": [-1024.0, 3072.0]},
        "model": {"channels": 1, "base_width": base_width, "depth": 3},
        "method": {"name": "noise2grad"},
    }
    save_checkpoint(path, config=config, denoiser=build_denoiser(1, 1, base_width, 3).state_dict(), step=0,
                    total_steps=None, self_check=None)
    return path


def _long_series(source: Path, target: Path, n_slices: int) -> Path:
    """An ``n_slices`` series in ``target``: the source slices cycled and restacked along the normal."""
    (series,) = scan_dicom(source)
    spacing = float(np.median(np.diff(series.positions_mm)))
    first = pydicom.dcmread(series.paths[0], stop_before_pixels=True)
    orientation = np.asarray([float(v) for v in first.ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    origin = np.asarray([float(v) for v in first.ImagePositionPatient])
    series_uid = generate_uid()
    target.mkdir(parents=True)
    for k in range(n_slices):
        ds = pydicom.dcmread(series.paths[k % len(series)])
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.3f}" for v in origin + k * spacing * normal]
        ds.save_as(target / f"slice{k:05d}.dcm")
    return target


class _ForwardTimer:
    """Sums the wall time of every U-Net forward pass (global module hooks; CUDA synchronised)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._start = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def before(self, module: torch.nn.Module, _inputs: object) -> None:
        if isinstance(module, UNet):
            self._sync()
            self._start = time.perf_counter()

    def after(self, module: torch.nn.Module, _inputs: object, _output: object) -> None:
        if isinstance(module, UNet):
            self._sync()
            self.seconds += time.perf_counter() - self._start
            self.calls += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/ct/chest-popi/dicom"), help="one DICOM series")
    parser.add_argument("--slices", type=int, help="generate a series of this many slices from --data first")
    parser.add_argument("--base-width", type=int, default=32, help="U-Net width (32: the official F)")
    parser.add_argument("--batch-size", type=int, help="slices per forward pass (default: the CLI's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()

    timer = _ForwardTimer()
    torch.nn.modules.module.register_module_forward_pre_hook(timer.before)
    torch.nn.modules.module.register_module_forward_hook(timer.after)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data = _long_series(args.data, tmp_path / "series", args.slices) if args.slices else args.data
        model = _write_checkpoint(tmp_path / "model.pt", args.base_width)
        first = pydicom.dcmread(next(Path(data).iterdir()), stop_before_pixels=True)
        rss_before = _peak_rss_mib()
        start = time.perf_counter()
        summary = denoise_inputs([data], tmp_path / "out", model, device=args.device, batch_size=args.batch_size,
                                 progress=False, force=True)  # an untrained U-Net: speed, not quality
        total = time.perf_counter() - start
    (outcome,) = summary.outcomes
    if outcome.status != "done":
        raise SystemExit(f"denoising failed: {outcome.message}")
    figures = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                   + (torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"),
        "slices": outcome.slices,
        "size": f"{first.Rows}x{first.Columns}",
        "base_width": args.base_width,
        "forward_calls": timer.calls,
        "total_s": round(total, 2),
        "slices_per_s": round(outcome.slices / total, 3),
        "forward_s": round(timer.seconds, 2),
        "outside_forward_share": round(1 - timer.seconds / total, 4),
        "peak_rss_before_run_mib": round(rss_before),
        "peak_rss_mib": round(_peak_rss_mib()),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
