"""Derived DICOM series: the derived-series tags, HU and geometry kept, validators clean, UIDs deterministic."""

from __future__ import annotations

import logging
import shutil
from datetime import datetime

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from denoise_factories import dcentvfy_report, dciodvfy_errors, dcm2niix, write_complete_ct_series
from factories import phantom_hu, write_ct_series
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from n2g_ct import __version__
from n2g_ct.io import read_volume
from n2g_ct.io.dicom_writer import (
    DERIVED_IMAGE_TYPE,
    SERIES_NUMBER_OFFSET,
    Derivation,
    DerivedSeriesWriter,
    write_derived_series,
)

SHA = "ab" * 32
DERIVATION = Derivation("noise2grad", SHA)

# Attributes the writer sets on every slice; everything else must equal the source's.
CHANGED = {
    "SOPInstanceUID", "SeriesInstanceUID", "ImageType", "SeriesNumber", "SeriesDescription",
    "SoftwareVersions", "ContentDate", "ContentTime", "PixelData",
}
ADDED = {"DerivationDescription", "SourceImageSequence", "SeriesDate", "SeriesTime", "ContentDate", "ContentTime",
         "InstanceCreationDate", "InstanceCreationTime",
         "PatientOrientation"}  # type 2C absent in the source: a repair, added empty
DROPPED = {"SmallestImagePixelValue", "LargestImagePixelValue"}
PATIENT_IDENTITY = {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                    "ReferringPhysicianName", "StudyID", "StudyInstanceUID", "StudyDate", "StudyTime"}


def _keywords(ds: pydicom.Dataset) -> set[str]:
    return {e.keyword for e in ds if not e.tag.is_private}


@pytest.fixture(scope="module")
def derived(tmp_path_factory):
    """A source series (passes dciodvfy), its volume, the HU written, and the derived series."""
    root = tmp_path_factory.mktemp("derived")
    hu = phantom_hu((6, 20, 24))
    write_complete_ct_series(root / "source", hu, series_description="chest low dose")
    volume = read_volume(root / "source")
    written = volume.hu + 3.3  # a visible change; rounds back to +3 HU
    writer = write_derived_series(volume, written, root / "out", DERIVATION)
    outputs = sorted((root / "out").glob("*.dcm"))
    return root, volume, written, writer, outputs


def test_derived_slices_carry_new_identity_and_provenance(derived):
    _, volume, _, writer, outputs = derived
    assert len(outputs) == len(volume.datasets) == 6
    sop_uids = set()
    for source, path in zip(volume.datasets, outputs):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID != source.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == source.SOPClassUID
        assert ds.SeriesInstanceUID == writer.series_uid != source.SeriesInstanceUID
        assert list(ds.ImageType) == DERIVED_IMAGE_TYPE
        assert "noise2grad" in ds.DerivationDescription and SHA in ds.DerivationDescription
        assert __version__ in ds.DerivationDescription
        (ref,) = ds.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == source.SOPClassUID
        assert ds.SeriesNumber == source.SeriesNumber + SERIES_NUMBER_OFFSET
        assert ds.SeriesDescription == "chest low dose [n2g-ct noise2grad]"
        assert list(ds.SoftwareVersions) == ["scanner 1.0", f"n2g-ct {__version__}"]
        assert ds.ContentDate == ds.SeriesDate == datetime.now().strftime("%Y%m%d") != source.StudyDate
        assert "SmallestImagePixelValue" not in ds and "LargestImagePixelValue" not in ds
        assert not any(e.tag.is_private for e in ds), "private tags describe the source, not the derived pixels"
        sop_uids.add(ds.SOPInstanceUID)
    assert len(sop_uids) == 6


def test_everything_else_is_kept_and_no_identity_tag_is_added(derived):
    _, volume, _, _, outputs = derived
    for source_path, path in zip(volume.source_paths, outputs):
        ds, source = pydicom.dcmread(path), pydicom.dcmread(source_path)
        assert _keywords(ds) - _keywords(source) == ADDED - _keywords(source)
        assert _keywords(source) - _keywords(ds) == DROPPED
        for keyword in _keywords(source) - CHANGED - DROPPED:
            assert ds[keyword].value == source[keyword].value, keyword
        for keyword in PATIENT_IDENTITY:
            assert ds[keyword].value == source[keyword].value, keyword


def test_hu_and_geometry_round_trip_within_rounding(derived):
    root, volume, written, _, _ = derived
    back = read_volume(root / "out")
    np.testing.assert_array_equal(back.hu, np.rint(written))
    np.testing.assert_allclose(back.spacing_xyz, volume.spacing_xyz, atol=1e-6)
    np.testing.assert_allclose(back.origin_xyz, volume.origin_xyz, atol=1e-4)
    np.testing.assert_allclose(back.direction, volume.direction, atol=1e-6)


def test_simpleitk_reads_the_same_geometry(derived):
    root, volume, written, _, _ = derived
    reader = sitk.ImageSeriesReader()
    image = sitk.ReadImage(reader.GetGDCMSeriesFileNames(str(root / "out")))
    np.testing.assert_allclose(image.GetSpacing(), volume.spacing_xyz, atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), volume.origin_xyz, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), volume.direction.ravel(), atol=1e-6)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), written, atol=0.5)


def test_dciodvfy_finds_no_error_in_any_slice(derived):
    root, _, _, _, outputs = derived
    assert dciodvfy_errors(next((root / "source").iterdir())) == [], "the source itself must be valid"
    for path in outputs:
        assert dciodvfy_errors(path) == [], path.name


def test_dcentvfy_is_clean_across_the_series_and_with_its_source(derived, tmp_path):
    root, _, _, _, outputs = derived
    sources = sorted((root / "source").iterdir())
    assert dcentvfy_report(outputs) == ""
    # Source and derived share patient and study: dcentvfy checks those entities agree.
    assert dcentvfy_report(sources + outputs) == ""
    broken = tmp_path / "broken.dcm"
    ds = pydicom.dcmread(outputs[0])
    ds.PatientName = "Other^Name"
    ds.save_as(broken)
    assert dcentvfy_report([broken, *outputs[1:]]) != "", "dcentvfy must notice an inconsistent patient"


def test_dcm2niix_makes_one_volume_with_the_source_geometry(derived, tmp_path):
    root, volume, written, _, _ = derived
    (nifti,) = dcm2niix(root / "out", tmp_path)
    # dcm2niix may flip axes; in the closest canonical (RAS) orientation both must coincide.
    theirs = nib.as_closest_canonical(nib.load(nifti))
    ours = nib.as_closest_canonical(nib.Nifti1Image(written.transpose(2, 1, 0), volume.affine_ras()))
    assert theirs.shape == ours.shape == (24, 20, 6)
    np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-3)
    np.testing.assert_allclose(theirs.get_fdata(), ours.get_fdata(), atol=0.5)


def test_padding_stays_padding(tmp_path):
    hu = phantom_hu((3, 16, 16))
    hu[:, :4, :] = -3000  # outside the field of view
    write_complete_ct_series(tmp_path / "source", hu, pixel_padding_value=0, intercept=-2048)
    volume = read_volume(tmp_path / "source")
    write_derived_series(volume, np.full_like(volume.hu, 40.0), tmp_path / "out", DERIVATION)
    back = read_volume(tmp_path / "out")
    np.testing.assert_array_equal(back.padding_mask, volume.padding_mask)
    stored = np.stack([pydicom.dcmread(p).pixel_array for p in sorted((tmp_path / "out").glob("*.dcm"))])
    assert (stored[:, :4] == 0).all() and (back.hu[~back.padding_mask] == 40).all()


def test_clipping_is_counted_and_logged(tmp_path, caplog):
    write_ct_series(tmp_path / "source", phantom_hu((2, 8, 8)), intercept=-1024)  # uint16: [-1024, 64511] HU
    volume = read_volume(tmp_path / "source")
    hu = np.zeros_like(volume.hu)
    hu[0, 0, :3] = -1100  # below the unsigned range
    hu[1, 2, :2] = 70000  # above it
    with caplog.at_level(logging.INFO, logger="n2g_ct.io.dicom_writer"):
        writer = write_derived_series(volume, hu, tmp_path / "out", DERIVATION)
    assert (writer.clipping.below, writer.clipping.above, writer.clipping.voxels) == (3, 2, 128)
    back = read_volume(tmp_path / "out").hu
    assert back[0, 0, 0] == -1024 and back[1, 2, 0] == 64511 and back[0, 1, 1] == 0
    assert "stored = HU + 1024 (rounded), [-1024, 64511] HU" in caplog.text
    assert "3 (2.34%) voxel(s) below -1024 HU (air" in caplog.text and "2 (1.56%) above 64511 HU (values lost)" in caplog.text


def test_series_description_is_cut_without_breaking_brackets_and_software_is_not_repeated():
    from n2g_ct.io.dicom_writer import _series_description, _software_versions

    source = pydicom.Dataset()
    source.SeriesDescription = "chest routine dose reconstructed with kernel B30f [n2g-ct sim dose 0.25]"
    source.SoftwareVersions = ["scanner 1.0", f"n2g-ct {__version__}"]
    text = _series_description(source, "noise2grad")
    assert len(text) <= 64 and text.count("[") == text.count("]") == 1 and text.endswith(" [n2g-ct noise2grad]")
    assert _software_versions(source, f"n2g-ct {__version__}") == ["scanner 1.0", f"n2g-ct {__version__}"]


def test_compressed_source_gives_uncompressed_output(tmp_path):
    hu = phantom_hu((2, 32, 32))
    write_ct_series(tmp_path / "source", hu, transfer_syntax=JPEGLSLossless)
    volume = read_volume(tmp_path / "source")
    write_derived_series(volume, volume.hu, tmp_path / "out", DERIVATION)
    for path in (tmp_path / "out").glob("*.dcm"):
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    np.testing.assert_array_equal(read_volume(tmp_path / "out").hu, hu)


def test_uids_are_deterministic_per_source_checkpoint_and_version(tmp_path):
    write_ct_series(tmp_path / "source", phantom_hu((2, 8, 8)))
    volume = read_volume(tmp_path / "source")

    def uids(derivation, name):
        writer = DerivedSeriesWriter(tmp_path / name, derivation, volume.series_uid, created=datetime(2001, 1, 1))
        writer.write(volume.datasets, volume.hu)
        return [pydicom.dcmread(p).SOPInstanceUID for p in sorted((tmp_path / name).glob("*.dcm"))], writer.series_uid

    first = uids(DERIVATION, "a")
    assert uids(Derivation("noise2grad", SHA), "b") == first
    for other in (Derivation("noise2grad", "cd" * 32), Derivation("supervised", SHA),
                  Derivation("noise2grad", SHA, precision="fp16"), Derivation("noise2grad", SHA, software="n2g-ct 9")):
        sops, series = uids(other, "c")
        assert series != first[1] and not set(sops) & set(first[0])
        shutil.rmtree(tmp_path / "c")
    assert all(pydicom.uid.UID(u).is_valid for u in [*first[0], first[1]])


def test_negative_spacing_between_slices_is_written_as_its_magnitude(tmp_path):
    write_complete_ct_series(tmp_path / "source", phantom_hu((2, 8, 8)))
    volume = read_volume(tmp_path / "source")
    for ds in volume.datasets:
        ds.SpacingBetweenSlices = "-1.0"  # as some scanners write it (dciodvfy: an error)
    write_derived_series(volume, volume.hu, tmp_path / "out", DERIVATION)
    for path in sorted((tmp_path / "out").glob("*.dcm")):
        assert float(pydicom.dcmread(path).SpacingBetweenSlices) == 1.0
        assert dciodvfy_errors(path) == []
