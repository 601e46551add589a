"""Scripting: the 3-line Python API, named models, NIfTI output of DICOM input, --threads,
``info --json`` and ``train --print-config``."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import yaml
from denoise_factories import identity_checkpoint
from factories import phantom_hu, write_ct_series

import n2g_ct
from n2g_ct.cli import main
from n2g_ct.config import config_template, from_dict
from n2g_ct.errors import InputError
from n2g_ct.models import NAMED_MODELS, STARTER_MODEL, resolve_model
from n2g_ct.training.config import TrainConfig


@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    return identity_checkpoint(tmp_path_factory.mktemp("model") / "identity.pt")


def test_three_lines_denoise_an_array_or_a_series_and_save_dicom_or_nifti(tmp_path, identity):
    hu = phantom_hu((3, 16, 16))
    write_ct_series(tmp_path / "s", hu)
    model = n2g_ct.load_model(identity, device="cpu")
    np.testing.assert_allclose(model.denoise(hu[0]), hu[0], atol=0.05)  # the identity, (y, x) in and out
    assert model.denoise(hu).shape == hu.shape
    denoised = model.denoise(tmp_path / "s")
    folder = denoised.save(tmp_path / "out" / "series")
    assert len(list(folder.glob("*.dcm"))) == 3
    assert pydicom.dcmread(next(folder.glob("*.dcm"))).ImageType[0] == "DERIVED"
    nifti = nib.load(denoised.save(tmp_path / "out" / "volume.nii.gz"))
    np.testing.assert_allclose(np.asarray(nifti.dataobj).transpose(2, 1, 0), np.rint(hu), atol=1)
    np.testing.assert_allclose(nifti.affine, n2g_ct.read_volume(tmp_path / "s").affine_ras(), atol=1e-4)


def test_named_models_resolve_and_are_listed(capsys):
    assert resolve_model("starter") == resolve_model(None) == STARTER_MODEL
    with pytest.raises(InputError, match="not a named model"):
        resolve_model("no-such-model")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in NAMED_MODELS) and "sha256" in out


def test_dicom_input_written_as_nifti_needs_a_regular_grid(tmp_path, identity, monkeypatch):
    write_ct_series(tmp_path / "in" / "regular", phantom_hu((3, 16, 16)))
    uid = pydicom.uid.generate_uid()
    write_ct_series(tmp_path / "in" / "irregular", phantom_hu((2, 16, 16)), series_uid=uid)
    write_ct_series(tmp_path / "in" / "irregular", phantom_hu((2, 16, 16)), series_uid=uid, origin_xyz=(0, 0, 9),
                    file_names=["x.dcm", "y.dcm"])
    argv = ["denoise", "--no-progress", "--force", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
            "--model", str(identity), "--format", "nifti"]
    assert main(argv) == 1
    assert (tmp_path / "out" / "in" / "regular.nii.gz").is_file()
    assert not list((tmp_path / "out").rglob("irregular*"))
    rows = (tmp_path / "out" / "denoise_summary.csv").read_text()
    assert "needs a regular slice grid" in rows and "--format dicom" in rows


def test_threads_sets_torch_threads_and_refuses_zero(tmp_path, identity, capsys):
    before = torch.get_num_threads()
    try:
        write_ct_series(tmp_path / "s", phantom_hu((1, 16, 16)))
        assert main(["denoise", "--no-progress", "--force", str(tmp_path / "s"), "--out", str(tmp_path / "o"),
                     "--model", str(identity), "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit) as exited:
        main(["denoise", str(tmp_path / "s"), "--out", str(tmp_path / "o"), "--threads", "0"])
    assert exited.value.code == 2


def test_info_json_is_one_document_with_the_series_and_what_was_set_aside(tmp_path, capsys):
    write_ct_series(tmp_path / "ct", phantom_hu((2, 16, 16)))
    write_ct_series(tmp_path / "mr", phantom_hu((1, 16, 16)), modality="MR")
    (tmp_path / "empty.dcm").write_bytes(b"")
    assert main(["info", "--json", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    ct = [v for v in report["volumes"] if v["modality"] == "CT"]
    assert len(ct) == 1 and ct[0]["slices"] == 2 and ct[0]["grid_problem"] is None and ct[0]["size_xy"] == [16, 16]
    assert [v["error"] for v in report["volumes"] if v["modality"] == "MR"] == ["not CT: not read (--allow-non-ct reads it)"]
    assert report["damaged"][0]["reason"].startswith("empty file")


def test_print_config_is_a_commented_template_of_the_defaults(capsys, tmp_path):
    assert main(["train", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "# side of the square training crops, pixels." in text
    data = yaml.safe_load(text)
    data["data"]["noisy"] = data["data"]["clean"] = [{"series": str(tmp_path)}]
    config = from_dict(TrainConfig, data)
    defaults = from_dict(TrainConfig, {"data": {"noisy": [{"series": str(tmp_path)}], "clean": [{"series": str(tmp_path)}]}})
    assert config == defaults
    assert config_template(TrainConfig) in text
    assert main(["train"]) == 2 and "--print-config" in capsys.readouterr().err
