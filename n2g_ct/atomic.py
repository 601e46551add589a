"""Outputs that appear only when complete: files through a temp file + rename, folders staged aside.

A reader sees the old output or the new one, never a partial one: everything is fsynced before it is
renamed into place, and the parent folder after. An interrupted run leaves at most hidden
``.NAME.partial-PIDhHOST...`` siblings (temp files end in ``.tmp``; ``HOST`` a short hash of the machine's
name), which readers skip (hidden) and the next write of that output, or :func:`remove_stale` over a
run's output folder, removes once process PID of this machine is gone. Partial outputs of other
machines (a folder shared by the parts of a sharded run) are never removed: their PIDs mean nothing here.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL_MARK = ".partial-"
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def process_mark() -> str:
    """``PIDhHOST``: this process on this machine, as partial outputs carry it after :data:`PARTIAL_MARK`."""
    return f"{os.getpid()}h{_HOST}"


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


def _is_stale(name: str) -> bool:
    """True for a ``.NAME.partial-PIDhHOST...`` entry of this machine whose process is no longer running."""
    if not name.startswith(".") or PARTIAL_MARK not in name:
        return False
    pid, _, host = name.rpartition(PARTIAL_MARK)[2].split(".")[0].partition("h")
    if host and host != _HOST:
        return False
    return not pid.isdigit() or not _process_running(int(pid))


def _remove_stale_siblings(output: Path) -> None:
    for stale in output.parent.glob(f".{output.name}{PARTIAL_MARK}*"):
        if _is_stale(stale.name):
            _remove(stale)


def remove_stale(folder: Path) -> list[Path]:
    """Remove the partial outputs and temp files of dead runs anywhere below ``folder``; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.rglob(f".*{PARTIAL_MARK}*") if _is_stale(p.name)]
    stale = [p for p in stale if not any(parent in stale for parent in p.parents)]
    for path in stale:
        _remove(path)
    return stale


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a folder: nothing more to do there
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every file and folder below ``path`` (and ``path``)."""
    if path.is_dir():
        for child in path.rglob("*"):
            _fsync(child)
    _fsync(path)


def check_writable(folder: Path) -> None:
    """Create ``folder`` (and parents) and check that files can be made in it; OSError naming the
    path otherwise. Call it before long work whose results go there."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=f".probe{PARTIAL_MARK}{process_mark()}.", suffix=".tmp", dir=folder)
    os.close(fd)
    os.unlink(probe)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temp file beside ``path`` to write to; fsynced and renamed onto ``path`` on success.

    The file gets the usual permissions (0666 minus the umask); on error it is removed and ``path``
    is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL_MARK}{process_mark()}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(Path(tmp))
        os.replace(tmp, path)
        _fsync(path.parent)
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
    ``output`` is replaced only once the new one is complete and fsynced. Partial outputs of runs
    that are no longer alive are removed first, and the parent is checked to be writable (OSError
    on entry, before any work); on error the staging path is removed.
    """
    output = Path(output)
    prefix = f".{output.name}{PARTIAL_MARK}"
    check_writable(output.parent)
    _remove_stale_siblings(output)
    suffix = "".join(output.suffixes) if output.suffix in (".nii", ".gz") else ""
    staging = output.parent / f"{prefix}{process_mark()}{suffix}"
    _remove(staging)
    try:
        yield staging
        _fsync_tree(staging)
        if output.is_dir():
            old = output.parent / f"{prefix}{process_mark()}.old"
            os.rename(output, old)
            try:
                os.rename(staging, output)
            except BaseException:
                os.rename(old, output)
                raise
            _remove(old)
        else:
            os.replace(staging, output)
        _fsync(output.parent)
    finally:
        _remove(staging)
