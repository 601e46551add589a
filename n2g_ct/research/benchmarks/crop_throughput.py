"""Crop throughput of the unpaired training stream, read from the HU cache.

One series serves as both pools (by default slices 0–59 noisy, 60–109 clean). Reports the
conversion time of the first cache fill (0 when the entry already exists), then (noisy, clean)
crops per second: in process at batch 1, and through a DataLoader with 1 and 2 workers. Each figure
is the median of ``runs`` timed runs of ``batches`` batches, each after a warm-up batch (worker
start-up excluded; the cached array is in the page cache, as in training after the first pass). One
crop = one (1, h, w) tensor, so a (noisy, clean) sample counts as two.

    python -m n2g_ct.research.benchmarks.crop_throughput --data /work/shared/data/ct/chest-popi/dicom
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import DataLoader

from n2g_ct.datasets.cache import VolumeCache
from n2g_ct.datasets.selection import SliceSelection
from n2g_ct.datasets.slices import UnpairedCropStream


def _crops_per_second(loader: DataLoader, batches: int, runs: int) -> float:
    """Median crops/s over ``runs`` fresh iterators of ``batches`` batches each."""
    rates = []
    for _ in range(runs):
        iterator = iter(loader)
        next(iterator)  # warm-up: workers started, first pages mapped
        started = time.perf_counter()
        for _ in range(batches):
            noisy, clean = next(iterator)
        rates.append(batches * (noisy.shape[0] + clean.shape[0]) / (time.perf_counter() - started))
        del iterator  # shuts the workers down before the next run
    return statistics.median(rates)


def measure(
    data: Path,
    *,
    cache: VolumeCache,
    noisy_slices: range = range(0, 60),
    clean_slices: range = range(60, 110),
    crop_size: int = 128,
    batch_size: int = 8,
    batches: int = 200,
    runs: int = 5,
    workers: Sequence[int] = (1, 2),
) -> dict[str, float]:
    """Throughput figures (crops/s; ``cache_fill_s`` in seconds) for ``data`` as both pools."""
    started = time.perf_counter()
    cache.get(data)
    results = {"cache_fill_s": time.perf_counter() - started}
    def stream(size: int) -> UnpairedCropStream:
        return UnpairedCropStream(
            [SliceSelection(data, tuple(noisy_slices))],
            [SliceSelection(data, tuple(clean_slices))],
            batch_size=size,
            crop_size=(crop_size, crop_size),
            cache=cache,
        )

    single = DataLoader(stream(1), batch_size=None)
    results["batch 1, in process"] = _crops_per_second(single, batches * batch_size, runs)
    for count in workers:
        loader = DataLoader(stream(batch_size), batch_size=None, num_workers=count)
        results[f"batch {batch_size}, {count} worker(s)"] = _crops_per_second(loader, batches, runs)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="series folder, DICOM file or NIfTI file")
    parser.add_argument("--cache", type=Path, help="cache folder (default: a fresh temporary one: the fill is timed)")
    parser.add_argument("--crop", type=int, default=128, help="crop side in pixels")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=200, help="timed batches per run")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="n2g-ct-bench-") as scratch:
        cache = VolumeCache(args.cache or Path(scratch))
        results = measure(
            args.data,
            cache=cache,
            crop_size=args.crop,
            batch_size=args.batch_size,
            batches=args.batches,
            runs=args.runs,
        )
    print(f"# crop throughput: {args.data}, crop {args.crop}², median of {args.runs} runs")
    machine = platform.processor() or platform.machine()
    print(f"# {machine}, {os.cpu_count()} CPU(s), python {platform.python_version()}")
    print(f"cache fill: {results.pop('cache_fill_s'):.2f} s")
    for name, rate in results.items():
        print(f"{name}: {rate:,.0f} crops/s")


if __name__ == "__main__":
    main()
