"""A timestamped log file beside a command's outputs (``OUT/denoise.log``, ``RUN/train.log``, ...).

Records are kept in memory until the output exists, so a command that fails before writing
anything leaves nothing behind; a staged output (renamed into place at the end) logs beside itself,
``OUT.log``, written once OUT is there. Only the outermost command writes one (``demo`` runs a pipeline and a denoise: one
``demo.log``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_active: list[Path] = []


class _FolderLog(logging.Handler):
    """Appends formatted records to ``path`` once ``output`` exists; buffers them until then."""

    def __init__(self, path: Path, output: Path) -> None:
        super().__init__()
        self.path = path
        self.output = output
        self.pending: list[str] = []
        self.stream = None
        self.failed = False
        self.setFormatter(logging.Formatter(FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        try:
            self.pending.append(self.format(record))
            self._flush_pending()
        except OSError as exc:  # a log file must never break the command: say so once, then stop
            self.failed = True
            logging.getLogger(__name__).warning("log file %s not written (%s)", self.path, exc)

    def _flush_pending(self) -> None:
        if self.stream is None:
            if not self.output.exists():
                return
            self.stream = open(self.path, "a", encoding="utf-8")
        self.stream.write("".join(f"{line}\n" for line in self.pending))
        self.stream.flush()
        self.pending.clear()

    def close(self) -> None:
        try:
            if not self.failed:
                self._flush_pending()
        except OSError:
            pass  # the command's own outcome matters more than its log file
        finally:
            if self.stream is not None:
                self.stream.close()
            super().close()


@contextmanager
def command_log(path: Path, output: Path | None = None) -> Iterator[None]:
    """Copy the n2g-ct log records to ``path`` (timestamped) while the block runs, from when
    ``output`` (default: the folder of ``path``) exists."""
    if _active:
        yield
        return
    handler = _FolderLog(Path(path), Path(output) if output is not None else Path(path).parent)
    logger = logging.getLogger("n2g_ct")
    logger.addHandler(handler)
    _active.append(Path(path))
    try:
        yield
    finally:
        _active.pop()
        logger.removeHandler(handler)
        handler.close()
