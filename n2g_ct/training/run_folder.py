"""The layout of a training run's folder: the one place that names its files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunFolder:
    """A training run's folder (``run.out_dir``)::

        config.yaml  train_log.csv  validation.csv  self_check.csv  train.log
        checkpoints/last.pt  checkpoints/best.pt  tensorboard/  cache/
    """

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        """Written every ``run.checkpoint_every`` steps and at the end; resume reads it."""
        return self.checkpoints / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        """The checkpoint of the best validation PSNR so far."""
        return self.checkpoints / "best.pt"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def train_log(self) -> Path:
        return self.root / "train_log.csv"

    @property
    def validation_log(self) -> Path:
        return self.root / "validation.csv"

    @property
    def self_check_log(self) -> Path:
        return self.root / "self_check.csv"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def cache(self) -> Path:
        """The run's own HU-array cache (unless ``$N2G_CT_CACHE`` or ``data.cache_dir`` says otherwise)."""
        return self.root / "cache"
