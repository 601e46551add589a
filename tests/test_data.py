"""Datasets: unpaired and paired crop streams (seeding, workers, ranks), the paired evaluation set."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch
from factories import phantom_hu, write_ct_series
from torch.utils.data import DataLoader

from n2g_ct.datasets.cache import VolumeCache
from n2g_ct.datasets.selection import PairSelection, SliceSelection, Split
from n2g_ct.datasets.slices import PairedCropStream, PairedSliceDataset, UnpairedCropStream
from n2g_ct.datasets.transforms import Keys
from n2g_ct.errors import InputError

CROP = (16, 16)


def constant_slices(values_hu, shape_yx=(24, 28)):
    """Volume whose slice k is the constant values_hu[k]: a crop's value tells its slice."""
    return np.repeat(np.asarray(values_hu, np.float32)[:, None, None], shape_yx[0] * shape_yx[1], axis=1).reshape(
        len(values_hu), *shape_yx
    )


@pytest.fixture
def cache(tmp_path):
    return VolumeCache(tmp_path / "cache")


@pytest.fixture
def pools(tmp_path):
    """(noisy, clean) series folders of 6 textured slices each."""
    noisy, clean = tmp_path / "noisy", tmp_path / "clean"
    write_ct_series(noisy, phantom_hu((6, 32, 32), seed=1))
    write_ct_series(clean, phantom_hu((6, 32, 32), seed=2))
    return noisy, clean


def take(stream_or_loader, n):
    return [tuple(t.clone() for t in item) for item in islice(stream_or_loader, n)]


def same(a, b):
    return all(torch.equal(x, y) for ta, tb in zip(a, b) for x, y in zip(ta, tb))


def test_unpaired_stream_yields_windowed_crop_batches(pools, cache):
    stream = UnpairedCropStream([pools[0]], [str(pools[1])], crop_size=CROP, cache=cache)
    noisy, clean = next(iter(stream))
    assert noisy.shape == clean.shape == (1, 1, *CROP) and noisy.dtype == torch.float32
    assert 0.0 <= float(noisy.min()) and float(noisy.max()) <= 1.0 and not torch.equal(noisy, clean)
    stream = UnpairedCropStream([pools[0]], [str(pools[1])], batch_size=4, crop_size=CROP, cache=cache)
    x, y = next(iter(DataLoader(stream, batch_size=None)))
    assert x.shape == y.shape == (4, 1, *CROP)
    assert not torch.equal(x[0], x[1])  # each sample of a batch is its own draw


def test_each_pool_draws_only_its_selected_slices_uniformly(tmp_path, cache):
    write_ct_series(tmp_path / "a", constant_slices([-1000, -800, -600, -400, -200, 0]))
    noisy = SliceSelection(tmp_path / "a", (1, 4))
    clean = SliceSelection(tmp_path / "a", (0, 2, 5))
    stream = UnpairedCropStream([noisy], [clean], crop_size=CROP, cache=cache)
    values = np.array([[float(x.mean()) * 4096 - 1024, float(y.mean()) * 4096 - 1024] for x, y in take(stream, 300)])
    noisy_hu, counts = np.unique(np.rint(values[:, 0]), return_counts=True)
    assert noisy_hu.tolist() == [-800, -200] and counts.min() > 100
    assert np.unique(np.rint(values[:, 1])).tolist() == [-1000, -600, 0]


def test_same_seed_same_stream_other_seed_another(pools, cache):
    def stream(seed, start=0):
        return UnpairedCropStream([pools[0]], [pools[1]], crop_size=CROP, seed=seed, start=start, cache=cache)

    first = take(stream(3), 5)
    assert same(first, take(stream(3), 5))
    assert not same(first, take(stream(4), 5))
    assert same(first[2:], take(stream(3, start=2), 3))  # a resumed stream continues exactly


def test_any_number_of_workers_gives_the_same_batches(pools, cache):
    stream = UnpairedCropStream([pools[0]], [pools[1]], batch_size=2, crop_size=CROP, seed=5, cache=cache)

    def batches(workers):
        return take(DataLoader(stream, batch_size=None, num_workers=workers), 4)

    in_process = batches(0)
    assert same(in_process, batches(1)) and same(in_process, batches(2))
    assert not same(in_process[0:1], in_process[1:2])


def test_distributed_ranks_draw_different_crops(pools, cache):
    def stream(rank):
        return UnpairedCropStream([pools[0]], [pools[1]], crop_size=CROP, rank=rank, world_size=2, cache=cache)

    assert same(take(stream(1), 4), take(stream(1), 4))
    assert not same(take(stream(0), 4), take(stream(1), 4))
    with pytest.raises(ValueError, match="rank"):
        stream(2)


def test_built_from_a_splits_selections(pools, cache):
    split = Split("demo", noisy=(SliceSelection(pools[0], (0, 1)),), clean=(SliceSelection(pools[1]),), test=())
    stream = UnpairedCropStream(split.noisy, split.clean, crop_size=CROP, cache=cache)
    assert len(stream.draws[0][0]) == 2 and len(stream.draws[1][0]) == 6


def test_air_slices_can_be_skipped(tmp_path, cache):
    write_ct_series(tmp_path / "a", constant_slices([-1000, 40, -1000, 60]))
    stream = UnpairedCropStream(
        [tmp_path / "a"], [tmp_path / "a"], crop_size=CROP, min_tissue_fraction=0.5, cache=cache
    )
    drawn = {round(float(x.mean()) * 4096 - 1024) for x, _ in take(stream, 50)}
    assert drawn == {40, 60}
    with pytest.raises(InputError, match="no slices to draw from"):
        UnpairedCropStream([SliceSelection(tmp_path / "a", (0, 2))], [tmp_path / "a"], crop_size=CROP,
                           min_tissue_fraction=0.5, cache=cache)


def test_bad_selections_raise_input_errors_naming_the_series(pools, cache):
    with pytest.raises(InputError, match=f"{pools[0]}.*slice index 6 out of range"):
        UnpairedCropStream([SliceSelection(pools[0], (0, 6))], [pools[1]], crop_size=CROP, cache=cache)
    with pytest.raises(InputError, match=f"{pools[0]}.*smaller than the crop"):
        UnpairedCropStream([pools[0]], [pools[1]], crop_size=(64, 16), cache=cache)
    with pytest.raises(InputError, match="noisy pool: no series"):
        UnpairedCropStream([], [pools[1]], cache=cache)


def test_a_pool_with_a_damaged_file_is_refused_by_name(tmp_path, cache):
    paths = write_ct_series(tmp_path / "s", phantom_hu((5, 32, 32)))
    paths[0].write_bytes(paths[0].read_bytes()[:-200])  # a shorter series would shift the slice indices
    with pytest.raises(InputError, match="slice000.dcm"):
        UnpairedCropStream([SliceSelection(tmp_path / "s", (1, 2))], [tmp_path / "s"], crop_size=CROP, cache=cache)


@pytest.fixture
def pair(tmp_path):
    """Low-dose = reference + 50 HU, same geometry."""
    reference = phantom_hu((5, 32, 32), seed=3)
    write_ct_series(tmp_path / "ref", reference)
    write_ct_series(tmp_path / "low", reference + 50)
    return PairSelection(tmp_path / "low", tmp_path / "ref"), reference


def test_paired_crops_share_position_and_flips(pair, cache):
    stream = PairedCropStream([pair[0]], batch_size=4, crop_size=CROP, cache=cache)
    for low, ref in take(DataLoader(stream, batch_size=None), 5):
        assert low.shape == ref.shape == (4, 1, *CROP)
        torch.testing.assert_close(low - ref, torch.full_like(low, 50 / 4096), rtol=0, atol=1e-6)


def test_paired_slice_set_gives_windowed_slices_hu_and_mask(pair, cache):
    selection, reference = pair
    dataset = PairedSliceDataset([PairSelection(selection.low_dose, selection.reference, (1, 3))], cache=cache)
    assert len(dataset) == 2
    item = dataset[1]
    assert item[Keys.PAIR] == 0 and item[Keys.SLICE] == 3
    torch.testing.assert_close(item[Keys.REFERENCE_HU][0], torch.from_numpy(reference[3]))
    torch.testing.assert_close(item[Keys.LOW_DOSE_HU][0], torch.from_numpy(reference[3] + 50))
    torch.testing.assert_close(item[Keys.REFERENCE], ((item[Keys.REFERENCE_HU] + 1024) / 4096).clamp(0, 1))
    assert item[Keys.VALID].all()
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert batch[Keys.LOW_DOSE].shape == (2, 1, 32, 32) and batch[Keys.SLICE].tolist() == [1, 3]


def test_padding_in_either_series_is_masked(tmp_path, cache):
    hu = phantom_hu((2, 16, 16))
    padded = hu.copy()
    padded[:, :, :4] = -3000
    write_ct_series(tmp_path / "low", padded, pixel_padding_value=0, intercept=-3024)
    write_ct_series(tmp_path / "ref", hu)
    valid = PairedSliceDataset([PairSelection(tmp_path / "low", tmp_path / "ref")], cache=cache)[0][Keys.VALID][0]
    assert not valid[:, :4].any() and valid[:, 4:].all()


def test_reference_slices_map_positions(tmp_path, cache):
    hu = phantom_hu((6, 16, 16))
    write_ct_series(tmp_path / "low", hu[1:4], origin_xyz=(-11.2, -11.2, -49.0))
    write_ct_series(tmp_path / "ref", hu)
    dataset = PairedSliceDataset([PairSelection(tmp_path / "low", tmp_path / "ref", (0, 2), (1, 3))], cache=cache)
    torch.testing.assert_close(dataset[1][Keys.LOW_DOSE_HU], dataset[1][Keys.REFERENCE_HU])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hu": phantom_hu((4, 32, 32))}, "slice count"),
        ({"hu": phantom_hu((5, 32, 24))}, "slice size"),
        ({"spacing_xyz": (0.8, 0.8, 1.0)}, "pixel spacing"),
        ({"origin_xyz": (-11.2, -11.2, -47.5)}, "slice position"),
        ({"row_cosines": (0.0, 1.0, 0.0), "column_cosines": (1.0, 0.0, 0.0)}, "orientation"),
    ],
)
def test_mismatched_pair_names_both_series(tmp_path, cache, changes, message):
    write_ct_series(tmp_path / "ref", phantom_hu((5, 32, 32)))
    options = {"hu": phantom_hu((5, 32, 32))} | changes
    write_ct_series(tmp_path / "low", options.pop("hu"), **options)
    with pytest.raises(InputError, match=message) as error:
        PairedSliceDataset([PairSelection(tmp_path / "low", tmp_path / "ref")], cache=cache)
    assert str(tmp_path / "low") in str(error.value) and str(tmp_path / "ref") in str(error.value)
