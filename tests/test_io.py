"""Reading CT: HU, geometry and slice order match SimpleITK; bad input gets specific errors."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from factories import phantom_hu, write_ct_series
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

from n2g_ct.errors import InputError
from n2g_ct.io import read_volume, scan_dicom


def sitk_series(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def assert_same_as_sitk(volume, image):
    np.testing.assert_array_equal(volume.hu, sitk.GetArrayFromImage(image).astype(np.float32))
    np.testing.assert_allclose(volume.spacing_xyz, image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(volume.origin_xyz, image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(volume.direction.ravel(), image.GetDirection(), atol=1e-6)


def test_series_matches_simpleitk_even_with_shuffled_instance_numbers(tmp_path):
    hu = phantom_hu((7, 24, 20))
    shuffled = [5, 1, 7, 3, 2, 6, 4]
    names = [f"img{n:02d}.dcm" for n in [3, 6, 0, 4, 1, 5, 2]]  # file order unrelated to z too
    write_ct_series(tmp_path, hu, instance_numbers=shuffled, file_names=names)
    volume = read_volume(tmp_path)
    assert volume.hu.dtype == np.float32
    np.testing.assert_array_equal(volume.hu, hu)
    assert_same_as_sitk(volume, sitk_series(tmp_path))
    assert [p.name for p in volume.source_paths] == names
    assert len(volume.datasets) == 7 and "PixelData" not in volume.datasets[0]


def test_oblique_series_geometry_matches_simpleitk(tmp_path):
    angle = np.deg2rad(20)
    row = (np.cos(angle), np.sin(angle), 0.0)
    col = (0.0, 0.0, -1.0)  # coronal-ish stack: the normal is not +z
    write_ct_series(tmp_path, phantom_hu((5, 16, 16)), row_cosines=row, column_cosines=col,
                    spacing_xyz=(0.8, 0.6, 2.5), file_names=[f"{c}.dcm" for c in "edcba"])
    volume = read_volume(tmp_path)
    assert_same_as_sitk(volume, sitk_series(tmp_path))
    np.testing.assert_allclose(volume.direction[:, 2], np.cross(row, col), atol=1e-6)


def test_rescale_slope_and_intercept_give_hu(tmp_path):
    hu = phantom_hu((3, 12, 12))
    write_ct_series(tmp_path, hu, slope=0.5, intercept=-2048.0)
    np.testing.assert_allclose(read_volume(tmp_path).hu, hu, atol=0.25)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless], ids=["jpeg2000", "jpegls"])
def test_compressed_series_decode_to_the_same_hu(tmp_path, syntax):
    hu = phantom_hu((3, 64, 64))  # OpenJPEG's default 6 resolution levels need ≥ 32 pixels
    write_ct_series(tmp_path, hu, transfer_syntax=syntax)
    assert pydicom.dcmread(next(tmp_path.iterdir())).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_volume(tmp_path).hu, hu)


def test_padding_value_is_reported_as_mask(tmp_path):
    hu = phantom_hu((2, 16, 16))
    hu[:, :3, :] = -3000  # outside the field of view
    write_ct_series(tmp_path, hu, pixel_padding_value=0, intercept=-2048)
    volume = read_volume(tmp_path)
    assert volume.padding_mask is not None
    np.testing.assert_array_equal(volume.padding_mask, hu <= -2000)


def test_single_file_reads_one_slice(tmp_path):
    paths = write_ct_series(tmp_path, phantom_hu((3, 8, 8)))
    assert read_volume(paths[1]).shape == (1, 8, 8)


def test_tree_scan_finds_each_series(tmp_path):
    write_ct_series(tmp_path / "a" / "s1", phantom_hu((3, 8, 8)))
    write_ct_series(tmp_path / "b", phantom_hu((4, 8, 8)))
    (tmp_path / "notes.txt").write_text("not dicom")
    found = scan_dicom(tmp_path)
    assert sorted(len(s) for s in found) == [3, 4]
    assert {s.folder.name for s in found} == {"s1", "b"}


def test_nifti_geometry_matches_simpleitk(tmp_path):
    hu = phantom_hu((4, 10, 12))
    affine = np.array([[-0.7, 0, 0, 30.0], [0, -0.8, 0, 20.0], [0, 0, 2.0, -40.0], [0, 0, 0, 1]])
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0), affine), path)
    volume = read_volume(path)
    assert_same_as_sitk(volume, sitk.ReadImage(str(path)))
    np.testing.assert_allclose(volume.affine_ras(), affine)


# --- bad input -----------------------------------------------------------------------------


def test_empty_folder(tmp_path):
    with pytest.raises(InputError, match="empty"):
        read_volume(tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_volume(tmp_path / "nowhere")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.bin").write_bytes(b"\0" * 300)
    with pytest.raises(InputError, match="no DICOM image series found"):
        read_volume(tmp_path)


def _zero_bytes(data: bytes) -> bytes:
    return b""


def _header_cut(data: bytes) -> bytes:
    return data[:400]


def _pixels_cut(data: bytes) -> bytes:
    return data[:-100]


@pytest.mark.parametrize("damage", [_zero_bytes, _header_cut, _pixels_cut])
@pytest.mark.parametrize("index", [0, 2, -1])
def test_a_damaged_file_anywhere_fails_the_series_by_name(tmp_path, damage, index):
    """Never a silent shorter series: first, middle or last file, empty or cut anywhere."""
    paths = write_ct_series(tmp_path, phantom_hu((5, 16, 16)))
    paths[index].write_bytes(damage(paths[index].read_bytes()))
    with pytest.raises(InputError, match=re.escape(paths[index].name)):
        read_volume(tmp_path)


def test_a_lone_file_without_pixel_data_is_named(tmp_path):
    paths = write_ct_series(tmp_path, phantom_hu((1, 8, 8)))
    ds = pydicom.dcmread(paths[0])
    del ds.PixelData
    ds.save_as(paths[0])
    with pytest.raises(InputError, match=f"{paths[0].name}: no standard Pixel Data"):
        read_volume(tmp_path)


def test_several_series_are_listed(tmp_path):
    write_ct_series(tmp_path / "x", phantom_hu((2, 8, 8)), series_uid="1.2.3.4")
    write_ct_series(tmp_path / "y", phantom_hu((3, 8, 8)), series_uid="1.2.3.5")
    with pytest.raises(InputError, match=r"2 series where one was expected(.|\n)*1\.2\.3\.4(.|\n)*1\.2\.3\.5"):
        read_volume(tmp_path)
    assert read_volume(tmp_path, series_uid="1.2.3.5").shape[0] == 3


def test_non_ct_is_refused_unless_allowed(tmp_path):
    write_ct_series(tmp_path, phantom_hu((2, 8, 8)), modality="MR")
    with pytest.raises(InputError, match="modality MR, not CT"):
        read_volume(tmp_path)
    assert read_volume(tmp_path, allow_non_ct=True).shape == (2, 8, 8)


def test_mixed_slice_sizes_are_refused(tmp_path):
    uid = "1.2.826.0.1.99"
    write_ct_series(tmp_path, phantom_hu((2, 8, 8)), series_uid=uid, file_names=["a.dcm", "b.dcm"])
    write_ct_series(tmp_path, phantom_hu((1, 10, 10)), series_uid=uid, file_names=["c.dcm"],
                    origin_xyz=(0, 0, 10))
    with pytest.raises(InputError, match=r"mixes slice sizes.*8x8.*10x10"):
        read_volume(tmp_path)


def test_mixed_orientations_are_read_slice_by_slice(tmp_path):
    uid = "1.2.826.0.1.98"
    write_ct_series(tmp_path, phantom_hu((2, 8, 8)), series_uid=uid, file_names=["a.dcm", "b.dcm"])
    write_ct_series(tmp_path, phantom_hu((1, 8, 8)), series_uid=uid, file_names=["c.dcm"],
                    row_cosines=(0, 1, 0), column_cosines=(1, 0, 0))
    volume = read_volume(tmp_path)
    assert volume.shape[0] == 3 and volume.grid_problem == "mixed slice orientations"


def test_nifti_with_nan_is_refused(tmp_path):
    data = np.zeros((4, 4, 3), np.float32)
    data[1, 2, 0] = np.nan
    path = tmp_path / "bad.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(InputError, match=r"bad.nii: 1 voxel\(s\) are NaN or Inf"):
        read_volume(path)


def test_nifti_4d_is_refused(tmp_path):
    path = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.float32), np.eye(4)), path)
    with pytest.raises(InputError, match=r"series.nii.gz: NIfTI data has shape \(4, 4, 3, 2\)"):
        read_volume(path)


def test_inputs_are_not_modified(tmp_path):
    write_ct_series(tmp_path, phantom_hu((3, 8, 8)))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()}
    read_volume(tmp_path)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()} == before


def test_monai_load_image_uses_the_reader(tmp_path):
    from monai.transforms import LoadImage

    from n2g_ct.io.monai_reader import CTSeriesReader

    hu = phantom_hu((3, 10, 12))
    write_ct_series(tmp_path, hu, file_names=["c.dcm", "a.dcm", "b.dcm"])
    image = LoadImage(reader=CTSeriesReader(), image_only=True)(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(image), hu.transpose(2, 1, 0))
    np.testing.assert_allclose(np.asarray(image.affine), read_volume(tmp_path).affine_ras())


def test_monai_refuses_one_affine_for_an_irregular_series_and_says_what_reads_it(tmp_path):
    from monai.transforms import LoadImage

    from n2g_ct.io.monai_reader import CTSeriesReader

    uid = "1.2.826.0.1.97"
    write_ct_series(tmp_path, phantom_hu((3, 8, 8)), series_uid=uid, spacing_xyz=(0.7, 0.7, 2.0))
    write_ct_series(tmp_path, phantom_hu((2, 8, 8)), series_uid=uid, spacing_xyz=(0.7, 0.7, 5.0),
                    origin_xyz=(0, 0, 10), file_names=["x.dcm", "y.dcm"])
    with pytest.raises(InputError, match="irregular slice spacing.*slice by slice, or resample"):
        LoadImage(reader=CTSeriesReader(), image_only=True)(str(tmp_path))


# --- the CLI --------------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "n2g_ct.cli", *map(str, args)], capture_output=True, text=True)


def test_info_lists_series_without_patient_data(tmp_path):
    write_ct_series(tmp_path / "s", phantom_hu((3, 8, 8)), patient_name="Smith^Alice", patient_id="MRN-777")
    result = run_cli("info", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "3 slice(s)" in result.stdout and "modality CT" in result.stdout and "HU range" in result.stdout
    for secret in ("Smith", "Alice", "MRN-777"):
        assert secret not in result.stdout + result.stderr


def test_cli_errors_are_one_line_without_traceback_or_patient_data(tmp_path):
    write_ct_series(tmp_path / "x", phantom_hu((2, 8, 8)), patient_name="Smith^Bob", patient_id="MRN-1",
                    modality="MR")
    paths = write_ct_series(tmp_path / "y", phantom_hu((4, 8, 8)), patient_name="Smith^Bob", patient_id="MRN-1")
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[:400])
    for target in (tmp_path / "x", tmp_path / "y", tmp_path / "missing"):
        result = run_cli("info", target)
        out = result.stdout + result.stderr
        assert "Traceback" not in out
        assert "Smith" not in out and "MRN-1" not in out
    assert run_cli("info", tmp_path / "missing").returncode == 2
    shutil.rmtree(tmp_path / "y")
    assert "not CT: not read" in run_cli("info", tmp_path / "x").stdout


def test_version_and_help():
    assert run_cli("--version").stdout.startswith("n2g-ct ")
    assert "info" in run_cli("--help").stdout
