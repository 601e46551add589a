"""Training throughput and peak memory of real ``n2g-ct train`` runs on a CT series.

    python -m n2g_ct.research.benchmarks.train_speed --data ../shared/data/ct/chest-popi/dicom --threads 2

For each batch size (and, on CUDA, with mixed precision on and off) a fresh process trains
Noise2Grad with the official U-Net on 128×128 crops of the series (both pools drawn from it; data
loading included), and reports samples/s over the steps after a warm-up, the process's peak resident
memory (CPU) and the peak CUDA memory allocated.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def _child(args: argparse.Namespace) -> None:
    """Run one training in this process and print its figures as JSON."""
    from n2g_ct.config import from_dict
    from n2g_ct.training.config import TrainConfig
    from n2g_ct.training.loop import train

    out = Path(args.out)
    series = {"series": str(args.data)}
    config = from_dict(TrainConfig, {
        "data": {"noisy": [series], "clean": [series], "cache_dir": str(out / "cache"), "crop_size": 128},
        "optim": {"steps": args.warmup + args.steps, "batch_size": args.batch_size},
        "run": {"out_dir": str(out / "run"), "device": args.device, "amp": args.amp, "threads": args.threads,
                "log_every": 1, "checkpoint_every": 10**9, "validate_every": 0},
    })
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train(config, progress=False)
    with open(out / "run" / "train_log.csv", newline="") as f:
        times = [float(r["time_s"]) for r in csv.DictReader(f)]
    seconds = times[-1] - times[args.warmup - 1]
    print(json.dumps({
        "samples_per_s": args.steps * args.batch_size / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/ct/chest-popi/dicom"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--amp", type=lambda v: v == "True", default=True, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    amp_modes = [True, False] if torch.cuda.is_available() and args.device != "cpu" else [False]
    device_name = torch.cuda.get_device_name() if amp_modes == [True, False] else f"CPU, {args.threads or torch.get_num_threads()} threads"
    print(f"device: {device_name}")
    for batch_size in args.batch_sizes:
        for amp in amp_modes:
            with tempfile.TemporaryDirectory() as tmp:
                command = [sys.executable, "-m", "n2g_ct.research.benchmarks.train_speed", "--child", "--data", str(args.data),
                           "--batch-size", str(batch_size), "--amp", str(amp), "--out", tmp,
                           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
                           "--device", args.device]
                result = subprocess.run(command, capture_output=True, text=True, check=True)
                figures = json.loads(result.stdout.strip().splitlines()[-1])
            cuda = f", peak CUDA {figures['peak_cuda_mib']:.0f} MiB" if figures["peak_cuda_mib"] is not None else ""
            print(f"batch {batch_size}, amp {'on' if amp else 'off'}: {figures['samples_per_s']:.2f} samples/s, "
                  f"peak RSS {figures['peak_rss_mib']:.0f} MiB{cuda}")


if __name__ == "__main__":
    main()
