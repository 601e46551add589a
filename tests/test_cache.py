"""HU cache: converts once, serves read-only memmaps, never serves stale or partial entries."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import time

import nibabel as nib
import numpy as np
import pytest
from factories import phantom_hu, write_ct_series

import n2g_ct.io
from n2g_ct.cli import main
from n2g_ct.datasets.cache import CACHE_FORMAT, VolumeCache, cache_location
from n2g_ct.errors import InputError


@pytest.fixture
def series(tmp_path):
    folder = tmp_path / "series"
    write_ct_series(folder, phantom_hu((4, 20, 24)))
    return folder


@pytest.fixture
def cache(tmp_path):
    return VolumeCache(tmp_path / "cache")


@pytest.fixture
def reads(monkeypatch):
    """Count calls of the reader behind the cache."""
    calls = []
    real = n2g_ct.io.read_volume

    def counting(path, **kwargs):
        calls.append(path)
        return real(path, **kwargs)

    monkeypatch.setattr(n2g_ct.io, "read_volume", counting)
    return calls


def entries(cache):
    return sorted(p.name for p in (cache.root / f"v{CACHE_FORMAT}" / "entries").iterdir())


def test_first_get_converts_then_hits(series, cache, reads):
    first = cache.get(series)
    again = cache.get(series)
    assert len(reads) == 1 and again.key == first.key and entries(cache) == [first.key]
    np.testing.assert_array_equal(first.hu, n2g_ct.io.read_volume(series).hu)
    assert first.hu.dtype == np.int16  # integer HU is stored losslessly in half the bytes
    assert first.shape == (4, 20, 24) and first.padding_mask is None
    assert first.tissue_fraction.shape == (4,) and 0 < first.tissue_fraction.min() <= first.tissue_fraction.max() < 1


def test_content_hash_without_stat_index_still_hits(series, tmp_path, reads):
    key = VolumeCache(tmp_path / "c", verify_content=True).get(series).key
    assert VolumeCache(tmp_path / "c", verify_content=True).get(series).key == key and len(reads) == 1


def test_memmap_is_read_only(series, cache):
    hu = cache.get(series).hu
    assert isinstance(hu, np.memmap) and not hu.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        hu[0, 0, 0] = 1


def test_non_integer_hu_is_kept_as_float32(tmp_path, cache):
    hu = phantom_hu((3, 8, 8)) + 0.5
    nib.save(nib.Nifti1Image(hu.T.copy(), np.eye(4)), tmp_path / "vol.nii.gz")
    volume = cache.get(tmp_path / "vol.nii.gz")
    assert volume.hu.dtype == np.float32
    np.testing.assert_array_equal(volume.hu, n2g_ct.io.read_volume(tmp_path / "vol.nii.gz").hu)


def test_padding_mask_is_cached(tmp_path, cache):
    hu = phantom_hu((2, 16, 16))
    hu[:, :3] = -3000  # outside the field of view
    write_ct_series(tmp_path / "s", hu, pixel_padding_value=0, intercept=-3024)
    volume = cache.get(tmp_path / "s")
    assert volume.padding_mask.dtype == bool and not volume.padding_mask.flags.writeable
    assert volume.padding_mask[:, :3].all() and not volume.padding_mask[:, 3:].any()


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_changed_file_is_never_served_stale(series, cache, reads, keep_mtime):
    old = cache.get(series)
    path = sorted(series.iterdir())[2]
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-2:] = (1024 + 555).to_bytes(2, "little")  # the last pixel of slice 2 becomes 555 HU; same size
    time.sleep(0.01)
    path.write_bytes(data)
    if keep_mtime:  # `touch -r`: same size and mtime, only ctime shows the write
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    new = cache.get(series)
    assert new.key != old.key and len(reads) == 2
    assert new.hu[2, -1, -1] == 555 and old.hu[2, -1, -1] != 555
    np.testing.assert_array_equal(new.hu[:2], old.hu[:2])


def test_identical_copy_elsewhere_shares_the_entry(series, tmp_path, cache, reads):
    import shutil

    key = cache.get(series).key
    shutil.copytree(series, tmp_path / "copy")
    assert cache.get(tmp_path / "copy").key == key and len(reads) == 1


def test_partial_temp_folder_of_a_crashed_writer_is_ignored_and_swept(series, cache, reads):
    key = cache.get(series).key
    entries_dir = cache.root / f"v{CACHE_FORMAT}" / "entries"
    crashed = entries_dir / f".tmp-{key}-999-dead"
    crashed.mkdir()
    (crashed / "hu.npy").write_bytes(b"\x93NUMPY partial")
    assert cache.get(series).key == key and len(reads) == 1  # the complete entry is served

    other = series.parent / "other"
    write_ct_series(other, phantom_hu((2, 8, 8)))
    os.utime(crashed, (time.time() - 2 * 86400,) * 2)
    cache.get(other)  # a build sweeps leftovers older than a day
    assert not crashed.exists()


@pytest.mark.parametrize("damage", ["truncate_array", "garble_meta", "drop_meta"])
def test_corrupt_entry_is_rebuilt(series, cache, reads, damage, caplog):
    entry = cache.get(series).entry_dir
    if damage == "truncate_array":
        data = (entry / "hu.npy").read_bytes()
        (entry / "hu.npy").write_bytes(data[: len(data) // 2])
    elif damage == "garble_meta":
        (entry / "meta.json").write_text("{not json")
    else:
        (entry / "meta.json").unlink()
    volume = cache.get(series)
    assert len(reads) == 2 and "corrupt" in caplog.text
    np.testing.assert_array_equal(volume.hu, n2g_ct.io.read_volume(series).hu)


def test_entry_with_wrong_recorded_shape_is_rebuilt(series, cache, reads):
    entry = cache.get(series).entry_dir
    meta = json.loads((entry / "meta.json").read_text())
    meta["shape"] = [4, 20, 23]
    (entry / "meta.json").write_text(json.dumps(meta))
    assert cache.get(series).shape == (4, 20, 24) and len(reads) == 2


def _get_key(args):
    root, source = args
    return VolumeCache(root).get(source).key


def test_concurrent_writers_leave_one_complete_entry(series, cache):
    with multiprocessing.get_context("fork").Pool(3) as pool:
        keys = pool.map(_get_key, [(cache.root, series)] * 3)
    assert len(set(keys)) == 1 and entries(cache) == keys[:1]  # no temp folders left behind
    np.testing.assert_array_equal(cache.get(series).hu, n2g_ct.io.read_volume(series).hu)


def test_writer_that_loses_the_race_uses_the_winners_entry(series, cache, monkeypatch):
    real = n2g_ct.io.read_volume

    def slow_read(path, **kwargs):  # another process finishes the same entry while we read
        monkeypatch.setattr(n2g_ct.io, "read_volume", real)
        winner = VolumeCache(cache.root).get(path)
        (winner.entry_dir / "winner").touch()
        return real(path, **kwargs)

    monkeypatch.setattr(n2g_ct.io, "read_volume", slow_read)
    volume = cache.get(series)
    assert (volume.entry_dir / "winner").exists() and entries(cache) == [volume.key]


def test_pickles_as_a_reference_to_the_entry(series, cache):
    volume = cache.get(series)
    payload = pickle.dumps(volume)
    assert len(payload) < 1000  # not the voxels
    clone = pickle.loads(payload)
    assert isinstance(clone.hu, np.memmap) and clone.key == volume.key
    np.testing.assert_array_equal(clone.hu, volume.hu)


def test_bad_sources_raise_input_error(tmp_path, series):
    with pytest.raises(InputError, match="no such file"):
        VolumeCache(tmp_path / "c").get(tmp_path / "missing")
    with pytest.raises(InputError, match="inside the input folder"):
        VolumeCache(series / "cache").get(series)


def test_a_runs_cache_lives_under_its_output_unless_the_user_configured_one(monkeypatch, tmp_path):
    monkeypatch.delenv("N2G_CT_CACHE", raising=False)
    assert cache_location(tmp_path / "run") == tmp_path / "run" / "cache"
    monkeypatch.setenv("N2G_CT_CACHE", str(tmp_path / "a"))
    assert cache_location(tmp_path / "run") == tmp_path / "a"


def test_a_cache_is_tagged_announced_with_its_size_listed_and_cleared(series, tmp_path, caplog, capsys):
    cache = VolumeCache(tmp_path / "run" / "cache")
    with caplog.at_level(logging.INFO, logger="n2g_ct.datasets.cache"):
        cache.get(series)
        cache.get(series)
    assert caplog.text.count("HU cache") == 1 and " MB " in caplog.text and "n2g-ct cache clear" in caplog.text
    assert (tmp_path / "run" / "cache" / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")
    assert main(["cache", "list", str(tmp_path)]) == 0
    assert str(tmp_path / "run" / "cache") in capsys.readouterr().out
    assert main(["cache", "clear", str(tmp_path)]) == 0
    assert "removed" in capsys.readouterr().out and not (tmp_path / "run" / "cache").exists() and series.exists()


def test_source_changing_during_conversion_is_not_cached(series, cache, monkeypatch):
    real = n2g_ct.io.read_volume

    def read_then_modify(path, **kwargs):
        volume = real(path, **kwargs)
        write_ct_series(series, phantom_hu((4, 20, 24), seed=9), file_names=[p.name for p in sorted(series.iterdir())])
        return volume

    monkeypatch.setattr(n2g_ct.io, "read_volume", read_then_modify)
    with pytest.raises(InputError, match="changed while"):
        cache.get(series)
    assert entries(cache) == []


def test_evaluate_leaves_no_copy_of_the_images_behind(series, tmp_path, monkeypatch):
    from n2g_ct.datasets.selection import PairSelection
    from n2g_ct.evaluation.evaluate import evaluate

    monkeypatch.delenv("N2G_CT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    evaluate([PairSelection(series, series)], tmp_path / "out" / "eval", progress=False, examples=1)
    assert (tmp_path / "out" / "eval" / "summary.json").is_file()
    assert not [p for p in tmp_path.rglob("*.npy")] and not (tmp_path / "home").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval"]
