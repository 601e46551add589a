"""Outputs that appear only when complete: files through a temp file + rename, folders staged aside.

A reader sees the old output or the new one, never a partial one. An interrupted run leaves at most a
hidden ``.NAME.partial-PID`` sibling, which the next run removes once that process is gone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL_MARK = ".partial-"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        pass
    return True


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temp file beside ``path`` to write to; fsynced and renamed onto ``path`` on success.

    The file gets the usual permissions (0666 minus the umask); on error it is removed and ``path``
    is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def staged_output(output: Path) -> Iterator[Path]:
    """A hidden sibling path to build ``output`` (a file or a folder) in, renamed onto it on success.

    The staging path is not created (make the folder or write the file); it keeps ``output``'s
    suffixes so that writers choosing a format by name (``.nii.gz``) still do. An existing
    ``output`` is replaced only once the new one is complete. Partial outputs of runs that are no
    longer alive are removed first; on error the staging path is removed.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{output.name}{PARTIAL_MARK}"
    for stale in output.parent.glob(f"{prefix}*"):
        pid = stale.name[len(prefix):].split(".")[0]
        if not pid.isdigit() or not _process_running(int(pid)):
            _remove(stale)
    suffix = "".join(output.suffixes) if output.suffix in (".nii", ".gz") else ""
    staging = output.parent / f"{prefix}{os.getpid()}{suffix}"
    _remove(staging)
    try:
        yield staging
        if output.is_dir():
            old = output.parent / f"{prefix}{os.getpid()}.old"
            os.rename(output, old)
            try:
                os.rename(staging, output)
            except BaseException:
                os.rename(old, output)
                raise
            _remove(old)
        else:
            os.replace(staging, output)
    finally:
        _remove(staging)
