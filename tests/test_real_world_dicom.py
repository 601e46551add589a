"""Real-world DICOM failure classes, each on generated data: encodings, anonymised headers, geometry,
objects that are not CT slices, HU safety, failing before compute and in one line, nothing partial
read as data. (The real files behind these classes: tests/test_corpus.py.)"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from denoise_factories import dciodvfy_errors, tiny_checkpoint
from factories import phantom_hu, write_ct_series
from pydicom.uid import CTImageStorage, ExplicitVRBigEndian

from n2g_ct import atomic
from n2g_ct.cli import main
from n2g_ct.config import from_dict
from n2g_ct.errors import ConfigError, InputError
from n2g_ct.inference.denoise import SUMMARY_NAME
from n2g_ct.io import read_volume
from n2g_ct.io.summary import describe_path
from n2g_ct.models import STARTER_MODEL
from n2g_ct.training.config import TrainConfig


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


def denoise(*args) -> int:
    return main(["denoise", "--no-progress", "--force", *map(str, args)])


def rows(out):
    with open(out / SUMMARY_NAME, newline="") as f:
        return list(csv.DictReader(f))


def derived(out):
    return sorted(p for p in out.rglob("*.dcm") if not any(part.startswith(".") for part in p.parts))


def rewrite(path, change):
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=False)


# --- encodings ------------------------------------------------------------------------------------


def test_a_bare_dataset_without_preamble_or_file_meta_is_read(tmp_path, model):
    paths = write_ct_series(tmp_path / "s", phantom_hu((3, 16, 16)))
    want = read_volume(tmp_path / "s").hu
    for path in paths:
        ds = pydicom.dcmread(path)
        del ds.file_meta
        ds.preamble = None
        pydicom.dcmwrite(path, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
        assert path.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(read_volume(tmp_path / "s").hu, want)
    assert denoise(tmp_path / "s", "--out", tmp_path / "out", "--model", model) == 0
    assert len(derived(tmp_path / "out")) == 3


def test_big_endian_is_read_and_written_back_little_endian(tmp_path, model):
    paths = write_ct_series(tmp_path / "s", phantom_hu((2, 16, 16)))
    want = read_volume(tmp_path / "s").hu
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PixelData = ds.pixel_array.astype(">u2").tobytes()  # pydicom writes OW bytes as given
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        pydicom.dcmwrite(path, ds, little_endian=False, implicit_vr=False)
    np.testing.assert_array_equal(read_volume(tmp_path / "s").hu, want)
    assert denoise(tmp_path / "s", "--out", tmp_path / "out", "--model", model) == 0
    for path in derived(tmp_path / "out"):
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"


def test_a_padding_value_written_unsigned_for_signed_pixels_is_read_signed(tmp_path):
    (path,) = write_ct_series(tmp_path, phantom_hu((1, 16, 16)))

    def signed_with_us_padding(ds):
        stored = ds.pixel_array.astype(np.int16) - 1024
        stored[0, :4] = -2000
        ds.PixelData, ds.PixelRepresentation, ds.RescaleIntercept = stored.tobytes(), 1, 0
        ds.add_new("PixelPaddingValue", "US", 63536)  # = -2000 as int16

    rewrite(path, signed_with_us_padding)
    volume = read_volume(tmp_path)
    assert volume.padding_mask is not None and volume.padding_mask[0, 0, :4].all() and volume.padding_mask.sum() == 4


# --- anonymised headers ---------------------------------------------------------------------------


def test_empty_sop_class_and_missing_type_1_and_2_elements_are_repaired_and_named(tmp_path, model):
    paths = write_ct_series(tmp_path / "s", phantom_hu((2, 16, 16)))

    def anonymise(ds):
        ds.SOPClassUID = ""
        for keyword in ("FrameOfReferenceUID", "SeriesNumber", "PatientID", "StudyDate"):
            if keyword in ds:
                delattr(ds, keyword)

    for path in paths:
        rewrite(path, anonymise)
    assert denoise(tmp_path / "s", "--out", tmp_path / "out", "--model", model) == 0
    for path in derived(tmp_path / "out"):
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
        assert ds.FrameOfReferenceUID and ds.PatientID == "" and ds.StudyDate == "" and ds.SeriesNumber == 1000
        for repair in ("SOPClassUID restored", "FrameOfReferenceUID added", "SeriesNumber added", "PatientID"):
            assert repair in ds.DerivationDescription
        assert not [e for e in dciodvfy_errors(path) if "FrameOfReferenceUID" in e or "Type 2 " in e]
    assert len({pydicom.dcmread(p).FrameOfReferenceUID for p in derived(tmp_path / "out")}) == 1


# --- geometry -------------------------------------------------------------------------------------


def test_two_stacks_of_different_spacing_with_tilt_are_denoised_slice_by_slice(tmp_path, model):
    """As a GE head protocol writes it: 4.2 mm then 7.4 mm, 18.5° gantry tilt, one series."""
    tilt = np.radians(18.5)
    column = (0.0, np.cos(tilt), -np.sin(tilt))
    uid = pydicom.uid.generate_uid()
    hu = phantom_hu((6, 16, 16))
    write_ct_series(tmp_path / "s", hu[:3], series_uid=uid, spacing_xyz=(0.5, 0.5, 4.2), column_cosines=column,
                    file_names=["a0.dcm", "a1.dcm", "a2.dcm"])
    write_ct_series(tmp_path / "s", hu[3:], series_uid=uid, spacing_xyz=(0.5, 0.5, 7.4), column_cosines=column,
                    origin_xyz=(0, 0, 30), file_names=["b0.dcm", "b1.dcm", "b2.dcm"])
    assert "irregular slice spacing" in describe_path(tmp_path / "s")
    assert denoise(tmp_path / "s", "--out", tmp_path / "out", "--model", model) == 0
    sources = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in (tmp_path / "s").iterdir()}
    outputs = derived(tmp_path / "out")
    assert len(outputs) == 6
    for path in outputs:
        ds = pydicom.dcmread(path)
        source = sources[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert ds.ImagePositionPatient == source.ImagePositionPatient
        assert ds.ImageOrientationPatient == source.ImageOrientationPatient


def test_two_images_at_one_position_stay_two_derived_images(tmp_path, model):
    uid = pydicom.uid.generate_uid()
    write_ct_series(tmp_path / "s", phantom_hu((3, 16, 16)), series_uid=uid)
    write_ct_series(tmp_path / "s", phantom_hu((1, 16, 16), seed=3), series_uid=uid, file_names=["twin.dcm"])
    volume = read_volume(tmp_path / "s")
    assert volume.shape[0] == 4 and "duplicated position" in volume.grid_problem
    assert denoise(tmp_path / "s", "--out", tmp_path / "out", "--model", model) == 0
    assert len(derived(tmp_path / "out")) == 4


def test_a_second_copy_of_one_instance_is_set_aside_not_written_twice(tmp_path, model):
    """The same SOP instance in two folders (e.g. two transfer syntaxes): one derived image, one note."""
    paths = write_ct_series(tmp_path / "in" / "a", phantom_hu((2, 16, 16)))
    (tmp_path / "in" / "b").mkdir()
    (tmp_path / "in" / "b" / "copy.dcm").write_bytes(paths[0].read_bytes())
    assert denoise(tmp_path / "in", "--out", tmp_path / "out", "--model", model) == 0
    assert len(derived(tmp_path / "out")) == 2
    (skipped,) = [r for r in rows(tmp_path / "out") if r["status"] == "skipped"]
    assert "copy.dcm" in skipped["input"] and "another copy of SOP instance" in skipped["message"]


# --- objects that are not CT slices ----------------------------------------------------------------


def test_a_mixed_folder_denoises_its_ct_series_and_lists_the_rest_with_reasons(tmp_path, model):
    write_ct_series(tmp_path / "in" / "ct", phantom_hu((3, 16, 16)))
    write_ct_series(tmp_path / "in" / "mr", phantom_hu((2, 16, 16)), modality="MR")
    (scout,) = write_ct_series(tmp_path / "in" / "scout", phantom_hu((1, 16, 16)))
    rewrite(scout, lambda ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    (capture,) = write_ct_series(tmp_path / "in" / "sc", phantom_hu((1, 16, 16)))

    def secondary_capture(ds):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        del ds.ImagePositionPatient, ds.ImageOrientationPatient

    rewrite(capture, secondary_capture)
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    assert denoise(tmp_path / "in", "--out", tmp_path / "out", "--model", model) == 0
    by_status = {}
    for row in rows(tmp_path / "out"):
        by_status.setdefault(row["status"], []).append(row["message"])
    assert len(by_status["done"]) == 1
    skipped = "\n".join(by_status["skipped"])
    assert "modality MR, not CT" in skipped and "localizer" in skipped and "Secondary Capture" in skipped
    assert "notes.txt" not in skipped
    assert denoise(tmp_path / "in" / "scout", "--out", tmp_path / "o2", "--model", model, "--include-localizers") == 0
    assert len(derived(tmp_path / "o2")) == 1


# --- HU safety ------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (lambda ds: (delattr(ds, "RescaleSlope"), delattr(ds, "RescaleIntercept")), "without RescaleSlope"),
    (lambda ds: setattr(ds, "RescaleSlope", "0"), "RescaleSlope 0"),
    (lambda ds: setattr(ds, "RescaleIntercept", "nan"), "HU cannot be computed"),
])
def test_a_ct_slice_without_a_usable_rescale_fails_its_series_by_name_before_compute(tmp_path, model, change, message,
                                                                                    monkeypatch):
    paths = write_ct_series(tmp_path / "s", phantom_hu((4, 16, 16)))
    rewrite(paths[2], change)
    with pytest.raises(InputError, match=f"{paths[2].name}.*{message}"):
        read_volume(tmp_path / "s")
    monkeypatch.setattr("n2g_ct.inference.denoise.denoise_volume", lambda *a, **k: pytest.fail("the model ran"))
    assert denoise(tmp_path / "s", "--out", tmp_path / "out", "--model", model) == 1
    (row,) = rows(tmp_path / "out")
    assert row["status"] == "failed" and paths[2].name in row["message"] and message in row["message"]


def test_identity_rescale_is_assumed_only_when_asked(tmp_path, model):
    paths = write_ct_series(tmp_path / "s", phantom_hu((2, 16, 16)), intercept=0)
    for path in paths:
        rewrite(path, lambda ds: (delattr(ds, "RescaleSlope"), delattr(ds, "RescaleIntercept")))
    assert main(["info", str(tmp_path / "s")]) == 0  # describes, and says why it cannot read HU
    assert denoise(tmp_path / "s", "--out", tmp_path / "out", "--model", model, "--assume-identity-rescale") == 0


@pytest.mark.parametrize("index", [0, -1])
def test_a_damaged_file_at_an_end_of_a_series_fails_it_by_name(tmp_path, model, index):
    paths = write_ct_series(tmp_path / "s", phantom_hu((4, 16, 16)))
    paths[index].write_bytes(paths[index].read_bytes()[:300])
    assert denoise(tmp_path / "s", "--out", tmp_path / "out", "--model", model) == 1
    (row,) = rows(tmp_path / "out")
    assert row["status"] == "failed" and paths[index].name in row["message"]
    assert not derived(tmp_path / "out")


# --- one line, exit 2 -----------------------------------------------------------------------------


def test_an_output_under_a_file_is_one_line_with_status_2(tmp_path, model, capsys):
    write_ct_series(tmp_path / "s", phantom_hu((2, 16, 16)))
    (tmp_path / "file").write_text("x")
    assert denoise(tmp_path / "s", "--out", tmp_path / "file" / "out", "--model", model) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and str(tmp_path / "file") in err


@pytest.mark.parametrize("command", ["export", "simulate", "evaluate"])
def test_other_commands_check_their_output_location_before_working(tmp_path, model, command, capsys, monkeypatch):
    write_ct_series(tmp_path / "s", phantom_hu((2, 16, 16)))
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"
    monkeypatch.setattr("n2g_ct.simulation.low_dose.simulate_low_dose", lambda *a, **k: pytest.fail("simulated before checking"))
    argv = {"export": ["export", STARTER_MODEL, "--out", out],
            "simulate": ["simulate", tmp_path / "s", "--dose", "0.25", "--out", out],
            "evaluate": ["evaluate", "--pair", tmp_path / "s", tmp_path / "s", "--out", out, "--no-progress"]}[command]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file where a folder is needed" in err[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes regardless of permissions")
def test_an_unreadable_input_folder_and_a_read_only_output_are_one_line(tmp_path, model, capsys):
    write_ct_series(tmp_path / "s" / "a", phantom_hu((2, 16, 16)))
    (tmp_path / "s" / "a").chmod(0)
    try:
        assert main(["info", str(tmp_path / "s")]) == 2
        assert "cannot be listed" in capsys.readouterr().err
    finally:
        (tmp_path / "s" / "a").chmod(0o755)
    (tmp_path / "ro").mkdir(mode=0o555)
    assert denoise(tmp_path / "s", "--out", tmp_path / "ro" / "out", "--model", model) == 2
    assert "Permission denied" in capsys.readouterr().err


def test_bad_overrides_and_config_values_are_reported_in_one_pass(tmp_path, capsys):
    (tmp_path / "train.yaml").write_text("optim:\n  steps: 3\n")
    assert main(["train", str(tmp_path / "train.yaml"), "optim.steps=[1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "optim.steps=[1" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError) as caught:
        from_dict(TrainConfig, {"data": {"crop_size": -1}, "optim": {"lr": "1e-4", "steps": -5}})
    assert "lr" not in str(caught.value) and "crop_size" in str(caught.value) and "steps" in str(caught.value)


def test_a_checkpoint_of_another_unet_size_is_one_line(tmp_path, capsys):
    write_ct_series(tmp_path / "s", phantom_hu((2, 16, 16)))
    bad = tiny_checkpoint(tmp_path / "bad.pt")
    state = __import__("torch").load(bad, weights_only=True)
    state["config"]["model"]["base_width"] = 8
    __import__("torch").save(state, bad)
    assert denoise(tmp_path / "s", "--out", tmp_path / "out", "--model", bad) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "do not fit" in err and "bad.pt" in err


# --- nothing partial is data ----------------------------------------------------------------------


def test_staging_folders_and_temp_files_of_a_dead_run_are_not_data_and_are_cleaned(tmp_path, model):
    write_ct_series(tmp_path / "s", phantom_hu((2, 16, 16)))
    out = tmp_path / "out"
    dead = out / f".s{atomic.PARTIAL_MARK}999999999"
    write_ct_series(dead, phantom_hu((2, 16, 16)))
    stale_tmp = out / f".{SUMMARY_NAME}{atomic.PARTIAL_MARK}999999999.abc.tmp"
    stale_tmp.write_text("half")
    for read in (read_volume, describe_path):
        with pytest.raises(InputError, match="empty"):
            read(out)
    assert denoise(tmp_path / "s", "--out", out, "--model", model) == 0
    assert not dead.exists() and not stale_tmp.exists()


def test_outputs_are_fsynced_before_they_are_renamed_into_place(tmp_path, model, monkeypatch):
    synced = []
    real_fsync = atomic._fsync
    monkeypatch.setattr(atomic, "_fsync", lambda path: (synced.append(Path(path)), real_fsync(path)))
    write_ct_series(tmp_path / "s", phantom_hu((2, 16, 16)))
    assert denoise(tmp_path / "s", "--out", tmp_path / "out", "--model", model) == 0
    staged = {p.name for p in synced if atomic.PARTIAL_MARK in p.parent.name}
    assert {p.name for p in derived(tmp_path / "out")} == staged == {"IM00000.dcm", "IM00001.dcm"}


def test_a_readme_beside_a_series_is_not_a_damaged_slice(tmp_path, model):
    write_ct_series(tmp_path / "s", phantom_hu((2, 16, 16)))
    (tmp_path / "s" / "README").write_text("exported by PACS")
    (tmp_path / "s" / "DONE").write_bytes(b"")
    assert denoise(tmp_path / "s", "--out", tmp_path / "out", "--model", model) == 0
    assert len(derived(tmp_path / "out")) == 2


def test_a_signed_padding_range_written_unsigned_is_written_back_signed(tmp_path, model):
    (path,) = write_ct_series(tmp_path / "s", phantom_hu((1, 16, 16)))

    def signed_padding_range(ds):
        stored = ds.pixel_array.astype(np.int16) - 1024
        stored[0, :4] = -2000
        ds.PixelData, ds.PixelRepresentation, ds.RescaleIntercept = stored.tobytes(), 1, 0
        ds.add_new("PixelPaddingValue", "US", 63536)  # -2000
        ds.add_new("PixelPaddingRangeLimit", "US", 63546)  # -1990

    rewrite(path, signed_padding_range)
    assert denoise(tmp_path / "s", "--out", tmp_path / "out", "--model", model) == 0
    (out,) = derived(tmp_path / "out")
    ds = pydicom.dcmread(out)
    assert (ds.PixelPaddingValue, ds.PixelPaddingRangeLimit) == (-2000, -1990)
    assert ds["PixelPaddingValue"].VR == ds["PixelPaddingRangeLimit"].VR == "SS"
    assert "PixelPaddingValue written as signed" in ds.DerivationDescription
