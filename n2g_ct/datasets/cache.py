"""Convert each CT series once to a memory-mapped HU array, shared safely between processes.

A cache holds a copy of the input images (as arrays), so it lives where the user can see it: under
the run's output folder (``RUN/cache``) unless a location is configured (``data.cache_dir``, or
``$N2G_CT_CACHE`` for every run). It is announced once with its size, carries a ``CACHEDIR.TAG``
(backup tools skip it), and ``n2g-ct cache list|clear PATH`` finds and removes caches. Layout::

    CACHEDIR.TAG                   marks the folder as a cache (https://bford.info/cachedir/)
    v2/entries/<key>/hu.npy        HU (z, y, x): int16 when every value is an integer in range, else float32
    v2/entries/<key>/padding.npy   bool (z, y, x), True where the scanner stored PixelPaddingValue (if any)
    v2/entries/<key>/meta.json     geometry, source file list, per-slice tissue fraction
    v2/index/<fingerprint>.json    {"key": <key>}: a shortcut from the source files' stat to <key>

Key: SHA-256 over the cache format, the package version, the reader options and, for every file
below the source (sorted by relative path), its relative path, size and bytes. Identical content
anywhere on disk shares one entry; any change to any byte gives a new key, so a stale array is
never served. Hashing reads every byte (about 50 ms for a 78 MB series from the page cache), so a
second lookup first tries the *stat index*: a fingerprint of the resolved source path and each
file's (size, mtime_ns, ctime_ns, inode) that maps to the key from the last hash. Any write to a
file changes its mtime and ctime (and ``touch -r`` cannot reset ctime), so a changed file misses the
index and is hashed again. The remaining hole is a same-size rewrite within one timestamp tick on a
filesystem with coarse timestamps (FAT, some network mounts): ``VolumeCache(verify_content=True)``
always hashes the bytes and ignores the index.

Atomicity: an entry is written into a hidden temporary folder next to the entries
(``v2/entries/.tmp-…``), its files flushed to disk, then the folder is renamed to ``<key>`` in one
``os.rename``. Readers only open ``<key>`` folders, so they see a whole entry or none; when two
writers race, the first rename wins and the other discards its copy. An entry that fails validation
(unreadable JSON, wrong key or format, array header/size/shape/dtype not as recorded) is moved aside
and rebuilt. Hidden leftovers of crashed writers older than a day are removed on the next build.
Nothing is ever written next to the inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from n2g_ct import __version__
from n2g_ct.errors import InputError
from n2g_ct.io.dicom import visible_files

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
# Voxels above this HU count as tissue (air is -1000, lung about -850, fat about -100).
TISSUE_THRESHOLD_HU = -500.0
_HASH_CHUNK_BYTES = 1 << 20
_STALE_TEMP_AGE_S = 24 * 3600.0
_HIDDEN_PREFIX = "."


CACHE_TAG = "CACHEDIR.TAG"
_TAG_TEXT = ("Signature: 8a477f597d28d172789f06886806bc55\n"
             "# This folder is an n2g-ct HU cache: copies of CT images as arrays, rebuilt when missing.\n"
             "# n2g-ct cache clear FOLDER removes it.\n")


def cache_location(run_folder: Path) -> Path:
    """Where a run's cache goes: ``$N2G_CT_CACHE`` when the user set it, else ``run_folder/cache``."""
    configured = os.environ.get("N2G_CT_CACHE")
    return Path(configured).expanduser() if configured else Path(run_folder) / "cache"


def folder_bytes(folder: Path) -> int:
    """Total size of the files below ``folder`` (files removed meanwhile, by another process, count 0)."""
    total = 0
    for path in Path(folder).rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except OSError:
            continue
    return total


def find_caches(roots: list[Path]) -> list[Path]:
    """The n2g-ct caches (folders with our ``CACHEDIR.TAG``) at or below each of ``roots``."""
    found = []
    for root in roots:
        for tag in ([root / CACHE_TAG] if (root / CACHE_TAG).is_file() else []) + sorted(Path(root).rglob(f"*/{CACHE_TAG}")):
            if tag.is_file() and "n2g-ct" in tag.read_text(errors="replace"):
                found.append(tag.parent)
    return sorted(set(found))


@dataclass(frozen=True, eq=False)
class CachedVolume:
    """A cached CT volume: read-only memory-mapped HU plus geometry.

    Pickles as its entry folder and re-maps the files when unpickled, so DataLoader workers started
    with ``spawn``/``forkserver`` share the page cache instead of receiving copies.

    Attributes:
        hu: read-only memmap (z, y, x) in HU; int16 when lossless, else float32 (cast before maths).
        padding_mask: read-only bool memmap (z, y, x), True outside the field of view; or None.
        spacing_xyz: voxel size (column, row, slice) in mm.
        origin_xyz: LPS position (mm) of the centre of voxel (0, 0, 0).
        direction: 3×3, columns are the LPS unit vectors of the x, y and z axes.
        tissue_fraction: (z,) share of each slice's in-field voxels above ``TISSUE_THRESHOLD_HU``.
        source: the source path as it was read (series folder or file).
        source_paths: the file per slice (DICOM) or the single file (NIfTI), as read.
        positions_lps: (z, 3) LPS position (mm) of each slice's first voxel (any spacing).
        series_uid: SeriesInstanceUID (DICOM) or None.
        key: the content key (hex SHA-256).
        entry_dir: the entry's folder in the cache.
    """

    hu: np.ndarray
    padding_mask: np.ndarray | None
    spacing_xyz: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    direction: np.ndarray
    tissue_fraction: np.ndarray
    source: Path
    source_paths: tuple[Path, ...]
    positions_lps: np.ndarray
    series_uid: str | None
    key: str
    entry_dir: Path

    @property
    def shape(self) -> tuple[int, int, int]:
        """(z, y, x) voxel counts."""
        return tuple(self.hu.shape)

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return open_entry, (self.entry_dir,)


def open_entry(entry_dir: Path) -> CachedVolume:
    """Map a complete cache entry; raises ValueError/OSError when it is missing or inconsistent."""
    meta = json.loads((entry_dir / "meta.json").read_text())
    if meta.get("format") != CACHE_FORMAT or meta.get("key") != entry_dir.name:
        raise ValueError(f"{entry_dir}: format or key does not match the folder")
    shape = tuple(meta["shape"])
    hu = _open_array(entry_dir / "hu.npy", shape, np.dtype(meta["dtype"]))
    mask = _open_array(entry_dir / "padding.npy", shape, np.dtype(bool)) if meta["has_padding"] else None
    tissue = np.asarray(meta["tissue_fraction"], dtype=np.float32)
    if tissue.shape != shape[:1]:
        raise ValueError(f"{entry_dir}: tissue_fraction has {tissue.size} values for {shape[0]} slices")
    return CachedVolume(
        hu=hu,
        padding_mask=mask,
        spacing_xyz=tuple(meta["spacing_xyz"]),
        origin_xyz=tuple(meta["origin_xyz"]),
        direction=np.asarray(meta["direction"], dtype=np.float64),
        tissue_fraction=tissue,
        source=Path(meta["source"]),
        source_paths=tuple(Path(p) for p in meta["source_paths"]),
        positions_lps=np.asarray(meta["positions_lps"], dtype=float).reshape(-1, 3),
        series_uid=meta["series_uid"],
        key=meta["key"],
        entry_dir=entry_dir,
    )


def _open_array(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Read-only memmap of ``path``; np.load checks the header against the file size."""
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if array.shape != shape or array.dtype != dtype:
        raise ValueError(f"{path}: {array.dtype}{array.shape} instead of {dtype}{shape}")
    return array


class VolumeCache:
    """Content-keyed cache of HU volumes (see the module docstring for the design).

    Args:
        root: cache folder (:func:`cache_location` gives a run's).
        verify_content: always hash the source bytes, ignoring the stat index.
    """

    def __init__(self, root: Path, *, verify_content: bool = False) -> None:
        self.root = Path(root).expanduser()
        self.verify_content = verify_content
        self._announced = False
        self._entries = self.root / f"v{CACHE_FORMAT}" / "entries"
        self._index = self.root / f"v{CACHE_FORMAT}" / "index"

    def get(self, source: Path, *, allow_non_ct: bool = False) -> CachedVolume:
        """The cached volume of ``source`` (series folder, DICOM file or NIfTI), converting it once.

        Raises:
            InputError: the source is missing or unreadable (from :func:`n2g_ct.io.read_volume`), or
                the cache folder lies inside the source folder.
        """
        source = Path(source)
        files = self._source_files(source)
        options = {"allow_non_ct": allow_non_ct}
        fingerprint = _stat_fingerprint(source, files, options)
        if not self.verify_content:
            key = self._indexed_key(fingerprint)
            volume = self._open_valid(key) if key else None
            if volume is not None:
                return volume
        key = _content_key(source, files, options)
        volume = self._open_valid(key)
        if volume is None:
            volume = self._build(source, key, allow_non_ct)
            if _stat_fingerprint(source, self._source_files(source), options) != fingerprint:
                _remove_dir(volume.entry_dir, self._entries)
                raise InputError(f"{source}: files changed while they were being cached; try again")
        self._write_index(fingerprint, key)
        self._announce()
        return volume

    def _announce(self) -> None:
        """Say once per cache object where the copies of the input images are, and how big they are."""
        if not self._announced:
            self._announced = True
            log.info("HU cache %s: %.1f MB (arrays copied from the input images; n2g-ct cache clear %s removes it)",
                     self.root, folder_bytes(self.root) / 1e6, self.root)

    def _source_files(self, source: Path) -> list[Path]:
        if not source.exists():
            raise InputError(f"{source}: no such file or folder")
        if source.is_file():
            return [source]
        if self.root.resolve().is_relative_to(source.resolve()):
            raise InputError(f"cache folder {self.root} lies inside the input folder {source}; choose another")
        return visible_files(source)

    def _indexed_key(self, fingerprint: str) -> str | None:
        try:
            return str(json.loads((self._index / f"{fingerprint}.json").read_text())["key"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_index(self, fingerprint: str, key: str) -> None:
        self._index.mkdir(parents=True, exist_ok=True)
        tmp = self._index / f"{_HIDDEN_PREFIX}{fingerprint}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps({"key": key}))
        os.replace(tmp, self._index / f"{fingerprint}.json")

    def _open_valid(self, key: str) -> CachedVolume | None:
        """The entry ``key`` if complete and consistent; a broken one is moved aside (None)."""
        entry = self._entries / key
        if not entry.exists():
            return None
        try:
            return open_entry(entry)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("cache entry %s is corrupt (%s); rebuilding it", entry, exc)
            _remove_dir(entry, self._entries)
            return None

    def _build(self, source: Path, key: str, allow_non_ct: bool) -> CachedVolume:
        from n2g_ct.io import read_volume

        started = time.perf_counter()
        volume = read_volume(source, allow_non_ct=allow_non_ct)
        hu = volume.hu
        lossless = bool(hu.size) and hu.min() >= -32768 and hu.max() <= 32767 and np.array_equal(hu, np.rint(hu))
        stored = hu.astype(np.int16) if lossless else hu.astype(np.float32, copy=False)
        in_field = np.ones(hu.shape, bool) if volume.padding_mask is None else ~volume.padding_mask
        tissue = ((hu > TISSUE_THRESHOLD_HU) & in_field).sum(axis=(1, 2)) / np.maximum(in_field.sum(axis=(1, 2)), 1)
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "n2g_ct_version": __version__,
            "shape": list(hu.shape),
            "dtype": stored.dtype.name,
            "has_padding": volume.padding_mask is not None,
            "spacing_xyz": [float(v) for v in volume.spacing_xyz],
            "origin_xyz": [float(v) for v in volume.origin_xyz],
            "direction": np.asarray(volume.direction, dtype=float).tolist(),
            "tissue_fraction": [round(float(v), 4) for v in tissue],
            "source": str(source),
            "source_paths": [str(p) for p in volume.source_paths],
            "positions_lps": np.round(volume.positions_lps(), 4).tolist(),
            "series_uid": volume.series_uid,
        }
        self._entries.mkdir(parents=True, exist_ok=True)
        if not (self.root / CACHE_TAG).is_file():
            (self.root / CACHE_TAG).write_text(_TAG_TEXT)
        self._remove_stale_temps()
        tmp = self._entries / f"{_HIDDEN_PREFIX}tmp-{key}-{os.getpid()}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            _save_synced(tmp / "hu.npy", stored)
            if volume.padding_mask is not None:
                _save_synced(tmp / "padding.npy", volume.padding_mask.astype(bool, copy=False))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            os.rename(tmp, self._entries / key)
        except OSError:
            if not (self._entries / key).exists():
                raise
            log.debug("another process cached %s first; using its entry", source)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("cached %s (%s %s) in %.1f s as %s", source, stored.dtype.name, hu.shape,
                 time.perf_counter() - started, key[:12])
        built = self._open_valid(key)
        if built is None:
            raise InputError(f"cache entry for {source} in {self._entries} could not be read back")
        return built

    def _remove_stale_temps(self) -> None:
        """Delete hidden leftovers (crashed writers, moved-aside entries) older than a day."""
        now = time.time()
        for path in self._entries.glob(f"{_HIDDEN_PREFIX}*"):
            try:
                if now - path.stat().st_mtime > _STALE_TEMP_AGE_S:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                continue


def _stat_fingerprint(source: Path, files: list[Path], options: dict[str, Any]) -> str:
    digest = hashlib.sha256(f"{CACHE_FORMAT}|{__version__}|{sorted(options.items())}|{source.resolve()}".encode())
    for path in files:
        st = path.stat()
        stat = f"{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}|{st.st_dev}"
        digest.update(f"|{_relative_name(path, source)}|{stat}".encode())
    return digest.hexdigest()


def _content_key(source: Path, files: list[Path], options: dict[str, Any]) -> str:
    digest = hashlib.sha256(f"{CACHE_FORMAT}|{__version__}|{sorted(options.items())}".encode())
    buffer = bytearray(_HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    for path in files:
        digest.update(f"|{_relative_name(path, source)}|{path.stat().st_size}|".encode())
        with open(path, "rb") as handle:
            while n := handle.readinto(buffer):
                digest.update(view[:n])
    return digest.hexdigest()


def _relative_name(path: Path, source: Path) -> str:
    return path.name if path == source else path.relative_to(source).as_posix()


def _save_synced(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())


def _remove_dir(entry: Path, parent: Path) -> None:
    """Move ``entry`` aside atomically (readers stop finding it), then delete it."""
    aside = parent / f"{_HIDDEN_PREFIX}trash-{entry.name}-{uuid.uuid4().hex}"
    try:
        os.rename(entry, aside)
    except OSError:
        return  # another process moved it first
    shutil.rmtree(aside, ignore_errors=True)
