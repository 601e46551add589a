"""Speed and HU error of each inference precision, ``n2g-ct denoise`` end to end (DICOM in → DICOM out).

    python -m n2g_ct.research.benchmarks.precision --data ../shared/data/ct/chest-popi/dicom --slices 16

Denoises the first ``--slices`` slices of the series with a model (default: the starter model) through
:func:`n2g_ct.inference.denoise.denoise_inputs`, once per path and round, the paths interleaved in one
process: ``fp32-plain`` (float32 in PyTorch's default layout: inference before the CPU fast path),
``fp32`` (channels-last), ``bf16`` and ``fp16`` (levels 1+ in that type, full resolution in float32;
:mod:`n2g_ct.inference.precision`). Prints, per path, the median slices/s over the rounds, its ratio
to ``fp32-plain``, and the HU error of its derived series against ``fp32-plain``'s (mean |ΔHU|,
99.9th percentile, max), with the CPU's instruction flags that decide ``auto``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from n2g_ct.inference import denoiser as denoiser_module
from n2g_ct.inference import precision as precision_module
from n2g_ct.inference.denoise import denoise_inputs
from n2g_ct.io import read_volume, scan_dicom
from n2g_ct.models import STARTER_MODEL

PATHS = ("fp32-plain", "fp32", "bf16", "fp16")


def _subset(source: Path, target: Path, slices: int) -> Path:
    """The first ``slices`` files of the series (in slice order) copied to ``target``."""
    (series,) = scan_dicom(source)
    target.mkdir(parents=True)
    for path in series.paths[:slices]:
        shutil.copy(path, target / path.name)
    return target


def _run(path: str, data: Path, out: Path, model: Path) -> float:
    """Seconds to denoise ``data`` into ``out`` on ``path``."""
    plain = mock.patch.object(denoiser_module, "prepare_network", lambda network, *_: network)
    precision = "fp32" if path == "fp32-plain" else path
    start = time.perf_counter()
    if path == "fp32-plain":
        with plain:
            summary = denoise_inputs([data], out, model, device="cpu", precision=precision, progress=False, force=True)
    else:
        summary = denoise_inputs([data], out, model, device="cpu", precision=precision, progress=False, force=True)
    seconds = time.perf_counter() - start
    (outcome,) = summary.outcomes
    if outcome.status != "done":
        raise SystemExit(f"{path}: denoising failed: {outcome.message}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/ct/chest-popi/dicom"), help="one DICOM series")
    parser.add_argument("--slices", type=int, default=16, help="slices of the series to denoise")
    parser.add_argument("--model", type=Path, default=STARTER_MODEL)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    paths = args.paths.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data = _subset(args.data, tmp_path / "series", args.slices)
        seconds: dict[str, list[float]] = {path: [] for path in paths}
        for round_number in range(args.rounds):
            for path in paths:
                out = tmp_path / f"{path}-{round_number}"
                seconds[path].append(_run(path, data, out, args.model))
        outputs = {path: read_volume(next(p for p in (tmp_path / f"{path}-0").rglob("*") if p.is_dir())).hu
                   for path in paths}
    flags = sorted(precision_module.cpu_flags() & {"avx2", "avx512f", "avx512_vnni", *precision_module.BF16_FLAGS,
                                                     *precision_module.FP16_FLAGS})
    base = statistics.median(seconds[paths[0]])
    figures = {"machine": f"CPU flags {', '.join(flags)}; {torch.get_num_threads()} torch threads",
               "auto": precision_module.resolve_precision("auto", torch.device("cpu"))[1],
               "slices": args.slices, "rounds": args.rounds, "paths": {}}
    for path in paths:
        median = statistics.median(seconds[path])
        error = np.abs(outputs[path] - outputs[paths[0]])
        figures["paths"][path] = {"slices_per_s": round(args.slices / median, 3), "speedup": round(base / median, 2),
                                  "mean_abs_hu": round(float(error.mean()), 3),
                                  "p99_9_abs_hu": round(float(np.percentile(error, 99.9)), 2),
                                  "max_abs_hu": round(float(error.max()), 1)}
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
