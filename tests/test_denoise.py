"""Batch denoising through the real CLI: discovery, mirrored layout, summary CSV, resumable and safe runs,
NIfTI in → NIfTI out with the same header."""

from __future__ import annotations

import csv
import gzip
import hashlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml
from denoise_factories import dciodvfy_errors, identity_checkpoint, tiny_checkpoint, write_complete_ct_series
from factories import correlated_noise, phantom_hu, smooth_images, write_ct_series

import n2g_ct.inference.denoise as denoise_module
from n2g_ct.cli import main
from n2g_ct.inference.denoise import SUMMARY_NAME, denoise_inputs
from n2g_ct.io import read_nifti, read_volume
from n2g_ct.io.dicom_writer import DerivedSeriesWriter
from n2g_ct.io.nifti import write_nifti
from n2g_ct.models import STARTER_MODEL

NIFTI_AFFINE = np.array([[-0.7, 0.05, 0, 30.0], [0, -0.8, 0, 20.0], [0, 0, 2.0, -40.0], [0, 0, 0, 1]])


def write_scaled_nifti(path, hu, affine=NIFTI_AFFINE):
    """An int16 NIfTI of ``hu`` (z, y, x) stored as HU + 1024 with scl_inter = -1024 (as dcm2niix writes CT)."""
    image = nib.Nifti1Image((hu + 1024).astype(np.int16).transpose(2, 1, 0), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    image.header["descrip"] = b"test ct"
    image.header.set_slope_inter(1.0, -1024.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.to_filename(path)
    return path


def raw_header(path):
    with gzip.open(path) as f:
        return nib.Nifti1Header.from_fileobj(f)


def tree_digest(root):
    """Hash of every file (path and bytes) below ``root``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def summary_rows(out):
    with open(out / SUMMARY_NAME, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture
def scans(tmp_path):
    """A tree: a series with padding, two series sharing a folder, a NIfTI file, a text file."""
    root = tmp_path / "scans"
    hu = phantom_hu((5, 20, 18))
    hu[:, :2] = -3000
    write_complete_ct_series(root / "p1" / "ct", hu, pixel_padding_value=0, intercept=-2048)
    write_ct_series(root / "p2", phantom_hu((3, 12, 12)), file_names=[f"a{k}.dcm" for k in range(3)])
    write_ct_series(root / "p2", phantom_hu((4, 12, 12), seed=1), file_names=[f"b{k}.dcm" for k in range(4)])
    write_scaled_nifti(root / "p3" / "vol.nii.gz", phantom_hu((4, 10, 12)))
    (root / "notes.txt").write_text("not an image")
    return root


def run_cli(*args):
    return main(["denoise", "--no-progress", *map(str, args)])


def test_tree_is_denoised_into_a_mirrored_layout_with_a_summary(scans, model, tmp_path):
    before = tree_digest(scans)
    out = tmp_path / "out"
    assert run_cli(scans, "--out", out, "--model", model) == 0
    assert tree_digest(scans) == before, "inputs are never written to"

    p2_series = sorted(p.name for p in (out / "scans" / "p2").iterdir())
    assert len(p2_series) == 2 and all(name.startswith("1.2.") for name in p2_series)
    rows = summary_rows(out)
    assert [r["status"] for r in rows] == ["done"] * 4
    outputs = {r["output"]: r for r in rows}
    assert set(outputs) == {str(out / "scans" / "p3" / "vol.nii.gz"), str(out / "scans" / "p1" / "ct"),
                            *(str(out / "scans" / "p2" / n) for n in p2_series)}
    assert outputs[str(out / "scans" / "p1" / "ct")]["slices"] == "5"
    assert all(float(r["seconds"]) >= 0 for r in rows)  # timed (tiny series may round to 0.0)
    assert not list(out.rglob(".*partial*")), "no temporary folder is left"

    source, result = read_volume(scans / "p1" / "ct"), read_volume(out / "scans" / "p1" / "ct")
    assert result.shape == source.shape
    np.testing.assert_allclose(result.origin_xyz, source.origin_xyz, atol=1e-4)
    np.testing.assert_array_equal(result.padding_mask, source.padding_mask)
    assert not np.allclose(result.hu[~source.padding_mask], source.hu[~source.padding_mask], atol=1)
    assert dciodvfy_errors(min((out / "scans" / "p1" / "ct").iterdir())) == []
    assert read_nifti(out / "scans" / "p3" / "vol.nii.gz").shape == (4, 10, 12)


def test_rerun_skips_completed_series_and_overwrite_redoes_them_with_the_same_uids(scans, model, tmp_path):
    out = tmp_path / "out"
    assert run_cli(scans / "p1" / "ct", "--out", out, "--model", model) == 0
    files = sorted((out / "ct").iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    uids = [pydicom.dcmread(f).SOPInstanceUID for f in files]

    assert run_cli(scans / "p1" / "ct", "--out", out, "--model", model) == 0
    assert [r["status"] for r in summary_rows(out)] == ["skipped"]
    assert [f.stat().st_mtime_ns for f in files] == stamps

    assert run_cli(scans / "p1" / "ct", "--out", out, "--model", model, "--overwrite") == 0
    assert [r["status"] for r in summary_rows(out)] == ["done"]
    redone = sorted((out / "ct").iterdir())
    assert [f.stat().st_mtime_ns for f in redone] != stamps
    assert [pydicom.dcmread(f).SOPInstanceUID for f in redone] == uids, "UIDs are deterministic"


def test_output_made_with_another_model_is_not_silently_skipped(scans, model, tmp_path):
    out = tmp_path / "out"
    other = tiny_checkpoint(tmp_path / "other.pt", seed=1)
    assert run_cli(scans / "p1" / "ct", "--out", out, "--model", other) == 0
    assert run_cli(scans / "p1" / "ct", "--out", out, "--model", model) == 1
    (row,) = summary_rows(out)
    assert row["status"] == "failed" and "--overwrite" in row["message"]


def test_failing_series_are_reported_and_the_run_goes_on(scans, model, tmp_path, capsys):
    write_ct_series(scans / "mr", phantom_hu((3, 8, 8)), modality="MR")
    gap = write_ct_series(scans / "gap", phantom_hu((5, 8, 8)))
    gap[2].write_bytes(gap[2].read_bytes()[:-100])  # truncated pixel data: the series fails, naming the file
    out = tmp_path / "out"
    assert run_cli(scans, "--out", out, "--model", model) == 1
    rows = {r["input"]: r for r in summary_rows(out)}
    assert rows[str(scans / "mr")]["status"] == "skipped" and "not CT" in rows[str(scans / "mr")]["message"]
    assert rows[str(scans / "gap")]["status"] == "failed" and gap[2].name in rows[str(scans / "gap")]["message"]
    assert rows[str(scans / "p1" / "ct")]["status"] == "done"
    assert not (out / "scans" / "mr").exists() and not (out / "scans" / "gap").exists()
    assert not list(out.rglob(".*partial*"))
    assert "1 failed" in capsys.readouterr().out


def test_a_series_with_mixed_slice_sizes_does_not_hide_the_other_series(scans, model, tmp_path):
    paths = write_ct_series(scans / "mixed", phantom_hu((3, 8, 8)), series_uid="1.2.3.4")
    write_ct_series(scans / "mixed", phantom_hu((1, 10, 10)), series_uid="1.2.3.4", file_names=["odd.dcm"])
    assert len(paths) == 3
    out = tmp_path / "out"
    assert run_cli(scans, "--out", out, "--model", model) == 1
    rows = {r["input"]: r for r in summary_rows(out)}
    assert rows[str(scans / "mixed")]["status"] == "failed" and "slice sizes" in rows[str(scans / "mixed")]["message"]
    assert rows[str(scans / "p1" / "ct")]["status"] == "done"
    assert len(summary_rows(out)) == 5 and (out / "scans" / "p3" / "vol.nii.gz").is_file()


def test_a_job_interrupted_midway_leaves_no_output(scans, model, tmp_path, monkeypatch):
    monkeypatch.setattr(denoise_module, "READ_CHUNK_SLICES", 2)
    calls = []
    original = DerivedSeriesWriter.write

    def failing_write(self, sources, hu, frames=None):
        calls.append(len(hu))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(self, sources, hu, frames)

    monkeypatch.setattr(DerivedSeriesWriter, "write", failing_write)
    summary = denoise_inputs([scans / "p1"], tmp_path / "out", model, progress=False)
    assert not summary.ok and "No space left" in summary.outcomes[0].message
    assert calls == [2, 2], "the series streams through memory two slices at a time"
    assert not (tmp_path / "out" / "p1" / "ct").exists()
    assert [p for p in (tmp_path / "out").rglob("*") if not p.is_dir()] == [tmp_path / "out" / SUMMARY_NAME]


def test_chunked_streaming_gives_the_same_result_as_one_chunk(scans, model, tmp_path, monkeypatch):
    denoise_inputs([scans / "p1" / "ct"], tmp_path / "whole", model, progress=False)
    monkeypatch.setattr(denoise_module, "READ_CHUNK_SLICES", 2)
    denoise_inputs([scans / "p1" / "ct"], tmp_path / "chunked", model, progress=False)
    whole, chunked = read_volume(tmp_path / "whole" / "ct"), read_volume(tmp_path / "chunked" / "ct")
    np.testing.assert_array_equal(chunked.hu, whole.hu)


@pytest.mark.parametrize("where", ["inside", "ancestor", "inside-imageless"])
def test_out_inside_an_input_is_refused_before_writing(scans, model, where, capsys):
    imageless = scans / "docs"  # even the summary CSV must not land in an input
    imageless.mkdir()
    (imageless / "readme.txt").write_text("no images here")
    target, out = {
        "inside": (scans / "p1", scans / "p1" / "denoised"),
        "ancestor": (scans, scans.parent),  # OUT/scans would be the input itself
        "inside-imageless": (imageless, imageless / "out"),
    }[where]
    before = tree_digest(scans)
    assert run_cli(target, "--out", out, "--model", model) == 2
    assert "inside the input" in capsys.readouterr().err
    assert tree_digest(scans) == before
    assert where == "ancestor" or not out.exists()


def test_without_a_model_the_shipped_starter_model_denoises(scans, tmp_path, caplog):
    assert STARTER_MODEL.is_file()
    assert STARTER_MODEL.stat().st_size < 8 * 2**20  # small enough to ship
    assert run_cli(scans, "--out", tmp_path / "out") == 0
    assert "using the starter model" in caplog.text
    rows = summary_rows(tmp_path / "out")
    assert rows and all(row["status"] == "done" for row in rows)


def test_bad_arguments_exit_2(scans, model, tmp_path):
    assert run_cli(scans, "--out", tmp_path / "out", "--model", model, "--batch-size", "0") == 2
    assert run_cli(tmp_path / "nowhere", "--out", tmp_path / "out", "--model", model) == 2
    assert not (tmp_path / "out").exists()


def test_single_files_and_same_named_inputs(scans, model, tmp_path):
    out = tmp_path / "out"
    first = min((scans / "p1" / "ct").iterdir())
    assert run_cli(first, scans / "p3" / "vol.nii.gz", "--out", out, "--model", model) == 0
    assert len(list((out / first.stem).glob("*.dcm"))) == 1 and (out / "vol.nii.gz").is_file()
    twin = write_scaled_nifti(tmp_path / "elsewhere" / "vol.nii.gz", phantom_hu((2, 6, 6)))
    assert run_cli(scans / "p3" / "vol.nii.gz", twin, "--out", tmp_path / "out2", "--model", model) == 2


def test_manifest_input_denoises_the_low_dose_series_of_the_split(tmp_path, model):
    data = tmp_path / "data"
    for name in ("low", "ref", "pool_low", "pool_clean"):
        write_ct_series(data / name, phantom_hu((3, 8, 8)))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({
        "n2g_ct_manifest": 1, "root": "data",
        "splits": {"s": {
            "noisy": [{"series": "pool_low", "slices": [0]}], "clean": [{"series": "pool_clean"}],
            "test": [{"low_dose": "low", "reference": "ref"}],
        }},
    }))
    out = tmp_path / "out"
    assert run_cli(manifest, "--out", out, "--model", model) == 0
    assert sorted(p.name for p in (out / "data").iterdir()) == ["low", "pool_low"]
    assert len(list((out / "data" / "pool_low").glob("*.dcm"))) == 3, "the whole series, not the listed slices"


def test_one_labelled_bar_counts_every_slice_of_every_series_with_its_rate(scans, model, tmp_path, capsys):
    denoise_inputs([scans], tmp_path / "out", model, progress=True)
    err = capsys.readouterr().err
    assert "denoise:" in err and "0/16" in err and "16/16" in err and "slice/s" in err
    assert "series 1/4:" in err and "series 4/4:" in err


def test_nifti_output_keeps_the_header_scaling_and_affine(tmp_path):
    source = write_scaled_nifti(tmp_path / "ct.nii.gz", phantom_hu((4, 10, 12)))
    volume = read_nifti(source)
    hu = volume.hu + 0.3
    hu[0, 0, :2] = -40000  # below int16 - 1024
    clipping = write_nifti(tmp_path / "out.nii.gz", hu, volume)
    assert clipping.below + clipping.above == 2
    before, after = raw_header(source), raw_header(tmp_path / "out.nii.gz")
    for key in before:
        assert np.array_equal(before[key], after[key], equal_nan=before[key].dtype.kind == "f"), key
    result = nib.load(tmp_path / "out.nii.gz")
    np.testing.assert_array_equal(result.affine, nib.load(source).affine)
    expected = np.clip(np.rint(hu), -32768 - 1024, None).transpose(2, 1, 0)
    np.testing.assert_array_equal(result.get_fdata(), expected)


def test_nifti_in_nifti_out_through_the_cli(scans, model, tmp_path):
    out = tmp_path / "out"
    assert run_cli(scans / "p3" / "vol.nii.gz", "--out", out, "--model", model) == 0
    before, after = raw_header(scans / "p3" / "vol.nii.gz"), raw_header(out / "vol.nii.gz")
    assert all(np.array_equal(before[k], after[k], equal_nan=before[k].dtype.kind == "f") for k in before)
    assert not np.array_equal(nib.load(out / "vol.nii.gz").get_fdata(), nib.load(scans / "p3" / "vol.nii.gz").get_fdata())


def test_module_entry_point_runs_denoise(scans, model, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "n2g_ct.cli", "denoise", str(scans / "p1"), "--out", str(tmp_path / "out"),
         "--model", str(model), "--no-progress"], capture_output=True, text=True, check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "1 done" in run.stdout


@pytest.fixture(scope="module")
def body_series(tmp_path_factory):
    """A 3-slice 96² series with soft tissue to check on: a textured disc with 60 HU of correlated noise."""
    root = tmp_path_factory.mktemp("body")
    yy, xx = np.mgrid[:96, :96]
    disc = np.hypot(yy - 48, xx - 48) < 44
    hu = np.where(disc, 40.0 + smooth_images(3, 96, seed=5, contrast_hu=20.0), -1000.0)
    write_ct_series(root / "body", np.round(hu + correlated_noise(hu.shape, 60.0, seed=6)))
    return root / "body"


def test_a_model_that_shifts_ct_numbers_is_refused_unless_forced(body_series, tmp_path, capsys):
    biased = identity_checkpoint(tmp_path / "biased.pt", shift_hu=-25.0)
    out = tmp_path / "out"
    assert run_cli(body_series, "--out", out, "--model", biased) == 1
    printed = capsys.readouterr().out.splitlines()
    refused = [line for line in printed if line.startswith("refused:")]
    assert len(refused) == 1 and str(body_series) in refused[0] and "HU shift -25" in refused[0]
    assert not (out / "body").exists() and not list(out.rglob(".*partial*")), "nothing written for it"
    row = summary_rows(out)[0]
    assert row["status"] == "refused" and row["self_check"] == "FAIL" and float(row["hu_shift_hu"]) == pytest.approx(-25, abs=1)

    assert run_cli(body_series, "--out", out, "--model", biased, "--force") == 0
    row = summary_rows(out)[0]
    assert row["status"] == "done" and row["self_check"] == "FAIL" and "--force" in row["message"]
    assert len(list((out / "body").iterdir())) == 3


def test_a_model_that_leaves_the_series_alone_passes_the_self_check(body_series, tmp_path):
    out = tmp_path / "out"
    assert run_cli(body_series, "--out", out, "--model", identity_checkpoint(tmp_path / "same.pt")) == 0
    row = summary_rows(out)[0]
    assert row["status"] == "done" and row["self_check"] == "pass" and abs(float(row["hu_shift_hu"])) < 0.5
