"""Transforms: the HU window's values, crops from read-only memmaps, aligned random crops and flips."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from monai.data.meta_obj import get_track_meta

from n2g_ct.datasets.transforms import (
    CropSlice,
    HUWindowd,
    RandCropSlice,
    RandCropSliced,
    apply_plain,
    crop_transforms,
)
from n2g_ct.io.hu_window import HUWindow


def test_default_window_maps_minus_1024_to_0_and_3072_to_1_and_clips():
    hu = np.array([-3000.0, -1024.0, 0.0, 1024.0, 3072.0, 5000.0], np.float32)
    out = np.asarray(HUWindowd("img")({"img": hu})["img"])
    np.testing.assert_allclose(out, [0.0, 0.0, 0.25, 0.5, 1.0, 1.0])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, HUWindow().to_unit(hu))  # the training transform is the window's mapping
    torch.testing.assert_close(HUWindow().to_unit(torch.from_numpy(hu)), torch.from_numpy(out))


def test_window_is_configurable_validated_and_inverted():
    window = HUWindow(-160, 240)
    out = HUWindowd("img", window)({"img": np.array([-500.0, -160.0, 40.0, 240.0, 900.0])})
    np.testing.assert_allclose(np.asarray(out["img"]), [0.0, 0.0, 0.5, 1.0, 1.0])
    inside = np.array([-160.0, -3.5, 240.0], np.float32)
    np.testing.assert_allclose(window.to_hu(window.to_unit(inside)), inside, atol=1e-4)
    assert window.width == 400.0 and HUWindow.of([-160, 240]) == window and window.as_list() == [-160.0, 240.0]
    with pytest.raises(ValueError, match="low < high"):
        HUWindow(100, -100)


def test_crop_slice_copies_the_window_channel_first():
    img = np.arange(60, dtype=np.int16).reshape(6, 10)
    img.flags.writeable = False
    out = CropSlice((1, 2), (3, 4))(img)
    assert out.shape == (1, 3, 4) and out.dtype == np.float32 and out.flags.writeable
    np.testing.assert_array_equal(out[0], img[1:4, 2:6])
    with pytest.raises(ValueError, match="does not fit"):
        CropSlice((4, 0), (3, 4))(img)


def test_random_crop_stays_inside_reaches_every_corner_and_is_seedable():
    img = np.arange(8 * 9, dtype=np.float32).reshape(8, 9)
    crop = RandCropSlice((3, 3)).set_random_state(1)
    corners = {tuple(crop(img)[0, 0, :1].astype(int)) for _ in range(300)}
    starts = {(v // 9, v % 9) for (v,) in corners}
    assert min(starts) == (0, 0) and max(starts) == (5, 6)
    first = [RandCropSlice((3, 3)).set_random_state(7)(img) for _ in range(2)]
    np.testing.assert_array_equal(*first)
    with pytest.raises(ValueError, match="larger than the slice"):
        RandCropSlice((9, 3))(img)


def test_dict_crop_uses_one_window_for_all_keys():
    a = np.random.default_rng(0).normal(size=(20, 30)).astype(np.float32)
    out = RandCropSliced(("a", "b"), (5, 6)).set_random_state(3)({"a": a, "b": a + 1})
    np.testing.assert_allclose(out["b"] - out["a"], 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        RandCropSliced(("a", "b"), (5, 6))({"a": a, "b": a[:10]})


def test_crop_chain_flips_pairs_identically_and_returns_plain_tensors_in_range():
    yy, xx = np.mgrid[:40, :50]
    ref = (yy * 50 + xx - 1000).astype(np.float32)  # every value unique: a crop gives its position
    chain = crop_transforms(("low", "ref"), crop_size=(16, 12)).set_random_state(0)
    flips = set()
    for _ in range(40):
        out = apply_plain(chain, {"low": ref + 40.0, "ref": ref})
        low, ref_crop = out["low"], out["ref"]
        assert type(low) is torch.Tensor and low.shape == (1, 16, 12) and low.dtype == torch.float32
        assert 0.0 <= float(ref_crop.min()) and float(ref_crop.max()) <= 1.0
        torch.testing.assert_close(low - ref_crop, torch.full_like(low, 40.0 / 4096), rtol=0, atol=1e-6)
        crop = np.rint(ref_crop[0].numpy() * 4096 - 1024)
        flip_y, flip_x = bool(crop[0, 0] > crop[-1, 0]), bool(crop[0, 0] > crop[0, -1])
        unflipped = crop[::-1 if flip_y else 1, ::-1 if flip_x else 1]
        y0, x0 = divmod(int(unflipped[0, 0]) + 1000, 50)
        np.testing.assert_array_equal(unflipped, ref[y0:y0 + 16, x0:x0 + 12])
        flips.add((flip_y, flip_x))
    assert flips == {(False, False), (False, True), (True, False), (True, True)}
    assert get_track_meta()  # apply_plain restores MONAI's global flag


def test_crop_chain_reads_read_only_memmaps_without_warnings(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros((3, 32, 32), np.int16))
    volume = np.load(tmp_path / "v.npy", mmap_mode="r")
    chain = crop_transforms(("img",), crop_size=(8, 8)).set_random_state(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = apply_plain(chain, {"img": volume[1]})["img"]
    torch.testing.assert_close(out, torch.full((1, 8, 8), 0.25))


def test_bad_chain_options_raise():
    with pytest.raises(ValueError, match="flip_prob"):
        crop_transforms(("img",), flip_prob=1.5)
    with pytest.raises(ValueError, match="crop size"):
        crop_transforms(("img",), crop_size=(0, 8))
