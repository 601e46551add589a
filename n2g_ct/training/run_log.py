"""Run logs: ``train_log.csv``, ``validation.csv``, ``config.yaml`` and optional TensorBoard events.

Rows are appended and flushed as they come, so a crashed run keeps its log. On resume, rows after
the checkpoint's step are dropped first: the resumed run writes them again.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import yaml

from n2g_ct.atomic import atomic_file, write_text_atomic
from n2g_ct.training.run_folder import RunFolder

log = logging.getLogger(__name__)



def _truncate_rows_after(path: Path, step: int) -> None:
    """Drop rows whose ``step`` is greater than ``step`` (rows of a run later resumed from ``step``)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    kept = [r for r in rows if int(r["step"]) <= step]
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)


class _CsvLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = None
        self._writer: csv.DictWriter | None = None

    def write(self, row: dict[str, Any]) -> None:
        if self._writer is None:
            existing = self.path.exists() and self.path.stat().st_size > 0
            if existing:
                with open(self.path, newline="") as f:
                    fields = next(csv.reader(f))
            else:
                fields = list(row)
            self._file = open(self.path, "a", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=fields, extrasaction="ignore", restval="")
            if not existing:
                self._writer.writeheader()
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class RunLog:
    """Where a training run's numbers go.

    Args:
        folder: the run folder.
        config: plain config mapping, stored as ``config.yaml``.
        enabled: False on ranks other than 0 (nothing is written).
        tensorboard: also write TensorBoard scalars to ``folder.tensorboard``.
        truncate_after: the step a resumed run starts after (0 for a new run).
    """

    def __init__(self, folder: RunFolder, config: dict, *, enabled: bool = True, tensorboard: bool = False,
                 truncate_after: int = 0) -> None:
        self.enabled = enabled
        self._tensorboard = None
        if not enabled:
            return
        folder.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder.config, yaml.safe_dump(config, sort_keys=False))
        for path in (folder.train_log, folder.validation_log, folder.self_check_log):
            _truncate_rows_after(path, truncate_after)
        self._train = _CsvLog(folder.train_log)
        self._validation = _CsvLog(folder.validation_log)
        self._self_check = _CsvLog(folder.self_check_log)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("TensorBoard is not installed (pip install 'n2g-ct[tensorboard]'); CSV logs only")
            else:
                self._tensorboard = SummaryWriter(str(folder.tensorboard), purge_step=truncate_after + 1)

    def _scalars(self, prefix: str, row: dict[str, Any]) -> None:
        if self._tensorboard is None:
            return
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tensorboard.add_scalar(f"{prefix}/{key}", value, row["step"])

    def train_row(self, row: dict[str, Any]) -> None:
        """Append one training row (must hold ``step``)."""
        if self.enabled:
            self._train.write(row)
            self._scalars("train", row)

    def validation_row(self, row: dict[str, Any]) -> None:
        """Append one validation row (must hold ``step``)."""
        if self.enabled:
            self._validation.write(row)
            self._scalars("validation", row)
            log.info("step %d validation: %s", row["step"],
                     ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step"))

    def self_check_row(self, row: dict[str, Any]) -> None:
        """Append one self-check row (must hold ``step``; see :mod:`n2g_ct.quality.self_check`)."""
        if self.enabled:
            self._self_check.write(row)
            self._scalars("self_check", row)

    def close(self) -> None:
        if self.enabled:
            self._train.close()
            self._validation.close()
            self._self_check.close()
            if self._tensorboard is not None:
                self._tensorboard.close()
