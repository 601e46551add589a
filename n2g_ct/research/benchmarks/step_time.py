"""Training step time of configuration variants, measured side by side in one process.

    python -m n2g_ct.research.benchmarks.step_time CONFIG --variant "" \
        --variant "method.noise2grad.variant=robust" --threads 1

Each ``--variant`` is a ``;``-separated list of ``KEY=VALUE`` overrides of the training
configuration CONFIG (``""``: CONFIG as it is). One trainer per variant is built in this process and
their steps alternate (variant 1, 2, …, 1, 2, …), so a machine whose speed drifts slows every variant
alike. It prints each variant's median seconds per optimiser step (data loading excluded, warm-up
steps dropped) and how many steps fit into the time the first variant takes for the configuration's
``optim.steps``: the step count that gives a variant the same time budget.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from n2g_ct.config import apply_overrides, from_dict, load_yaml, to_dict
from n2g_ct.training import loop as training
from n2g_ct.training.config import TrainConfig
from n2g_ct.training.data import build_training_batches


def step_times(config: TrainConfig, overrides: list[list[str]], steps: int, device: torch.device) -> list[list[float]]:
    """Seconds of each of ``steps`` alternated optimiser steps, one list per override list."""
    base = to_dict(config)
    trainers, batch_streams = [], []
    for variant in overrides:
        variant_config = from_dict(TrainConfig, apply_overrides(base, variant), source="variant " + ";".join(variant))
        trainer = training._build_trainer(variant_config, training.init_processes(device.type), device)
        trainer.method.start(trainer.budget.total)  # as `train` does
        trainers.append(trainer)
        batch_streams.append(build_training_batches(variant_config))
    times: list[list[float]] = [[] for _ in overrides]
    for _ in range(steps):
        for trainer, batches, seconds in zip(trainers, batch_streams, times):
            batch = {key: value.to(device) for key, value in next(batches).items()}
            trainer.step += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            training._train_step(trainer, batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="training configuration (YAML)")
    parser.add_argument("--variant", action="append", required=True,
                        help="';'-separated KEY=VALUE overrides; repeat per variant; '' is CONFIG itself")
    parser.add_argument("--steps", type=int, default=25, help="timed steps per variant, warm-up included")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = [[item for item in variant.split(";") if item] for variant in args.variant]
    with tempfile.TemporaryDirectory() as scratch:
        config = from_dict(TrainConfig, apply_overrides(load_yaml(args.config), [f"run.out_dir={scratch}"]),
                           source=str(args.config))
        times = step_times(config, overrides, args.steps, torch.device(args.device))
    medians = [statistics.median(seconds[args.warmup:]) for seconds in times]
    budget_steps = config.optim.steps
    for variant, median in zip(args.variant, medians):
        print(f"{variant or 'as configured'}: median {median:.3f} s/step; "
              f"{budget_steps * medians[0] / median:.0f} steps in the time of {budget_steps} of the first")


if __name__ == "__main__":
    main()
