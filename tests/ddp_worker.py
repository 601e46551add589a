"""Run by ``torchrun`` in the DDP tests: train a config and record, after every step, a digest of each
rank's weights and noise scale, checking that all ranks hold the same.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py CONFIG OUT.json
        [--resume] [--interrupt-after STEP]

Writes ``OUT.json`` (rank 0): ``{"digests": [[step, digest], ...], "ranks_agree": bool, "fits": int}``.
With ``--interrupt-after``, rank 0 sends itself SIGINT after that step (the run saves and stops).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal

import torch
import torch.distributed as dist

from n2g_ct.config import load_config
from n2g_ct.training import loop
from n2g_ct.training.config import TrainConfig


def state_digest(method: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer of the method (F and G), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(method.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--interrupt-after", type=int)
    args = parser.parse_args()
    config = load_config(TrainConfig, args.config)
    digests, agree, fits = [], True, 0
    original = loop._train_step

    def step_and_compare(trainer, batch):
        nonlocal agree, fits
        result = original(trainer, batch)
        fits = int(getattr(trainer.method.noise_scale, "fits", 0))
        mine = state_digest(trainer.method)
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        agree = agree and len(set(every)) == 1
        digests.append([trainer.step, mine])
        if trainer.step == args.interrupt_after and dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    loop._train_step = step_and_compare
    try:
        loop.train(config, resume=args.resume, progress=False)
    except loop.TrainingInterrupted:
        pass
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w") as f:
            json.dump({"digests": digests, "ranks_agree": agree, "fits": fits}, f)


if __name__ == "__main__":
    main()
