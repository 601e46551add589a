"""Paired evaluation: numbers checked against direct computations, outputs, privacy, errors, the CLI."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from denoise_factories import identity_checkpoint
from factories import correlated_noise, smooth_images, write_ct_series

from n2g_ct import __version__
from n2g_ct.cli import main
from n2g_ct.datasets.cache import VolumeCache
from n2g_ct.datasets.selection import PairSelection
from n2g_ct.errors import ConfigError, InputError
from n2g_ct.evaluation.evaluate import ModelSpec, RoiSettings, evaluate, evaluate_split
from n2g_ct.models.checkpoint import file_sha256
from n2g_ct.quality.metrics import WINDOWS, ssim

SIZE, SLICES = 64, 3
PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-SECRET-42"
ROI = RoiSettings(size_px=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A low-dose/reference pair of 3 slices (64², a tissue disc with texture in air, correlated
    noise), with padding outside the field-of-view circle of the low-dose series and tissue there
    in the reference."""
    root = tmp_path_factory.mktemp("eval")
    yy, xx = np.mgrid[:SIZE, :SIZE]
    radius = np.hypot(yy - SIZE / 2, xx - SIZE / 2)
    reference = np.where(radius < 0.42 * SIZE, 40.0, -1000.0) + np.where(radius < 0.42 * SIZE, smooth_images(SLICES, SIZE, 1, 30), 0)
    reference = np.round(reference + np.random.default_rng(0).normal(0, 3, reference.shape)).astype(np.float32)
    reference[:, radius >= 0.5 * SIZE] = 40.0  # the body reaches beyond the field of view...
    low = np.round(reference + correlated_noise(reference.shape, 40.0, 2)).astype(np.float32)
    low[:, radius >= 0.5 * SIZE] = -3000.0  # ...where the low-dose series has padding
    write_ct_series(root / "low", low, pixel_padding_value=0, intercept=-3024, patient_name=PATIENT_NAME, patient_id=PATIENT_ID)
    write_ct_series(root / "ref", reference, patient_name=PATIENT_NAME, patient_id=PATIENT_ID)
    return {"root": root, "low": low, "reference": reference, "valid": radius < 0.5 * SIZE,
            "pairs": [PairSelection(root / "low", root / "ref")], "identity": identity_checkpoint(root / "identity.pt")}


@pytest.fixture(scope="module")
def result(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("result") / "out"
    return evaluate(data["pairs"], out, models=[ModelSpec("same", data["identity"])], roi=ROI, device="cpu",
                    cache=VolumeCache(data["root"] / "cache"), split="unit", progress=False)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_noisy_psnr_equals_a_direct_computation_over_the_field_of_view(data, result):
    rows = [r for r in read_rows(result.out_dir / "per_slice.csv") if r["method"] == "noisy"]
    assert [int(r["slice"]) for r in rows] == list(range(SLICES))
    valid = data["valid"]
    for row, low, ref in zip(rows, data["low"], data["reference"]):
        for name, lo, hi in (("display", -160, 240), ("full", -1024, 3072)):
            error = np.clip(low, lo, hi).astype(np.float64) - np.clip(ref, lo, hi)
            expected = 10 * np.log10((hi - lo) ** 2 / np.mean(error[valid] ** 2))
            assert float(row[f"psnr_{name}"]) == pytest.approx(expected, abs=1e-3)
        whole_slice = 10 * np.log10(4096**2 / np.mean((np.clip(low, -1024, 3072) - ref) ** 2))
        assert float(row["psnr_full"]) > whole_slice + 3, "counting the padding would lower the PSNR"
        assert float(row["roi_noise_std_hu"]) == pytest.approx(40.0, rel=0.25)
        assert float(row["reference_roi_noise_std_hu"]) < 10.0
        assert int(row["edge_voxels"]) > 0 and int(row["bone_voxels"]) == 0, "the disc's rim; no bone"
        assert float(row["edge_rmse_hu"]) == pytest.approx(40.0, rel=0.4), "the noise alone at the rim"
        assert row["bone_rmse_hu"] == "nan"


def test_an_identity_denoiser_scores_like_the_noisy_input(result):
    rows = read_rows(result.out_dir / "per_slice.csv")
    noisy = [r for r in rows if r["method"] == "noisy"]
    same = [r for r in rows if r["method"] == "same"]
    assert len(same) == len(noisy) == SLICES
    for a, b in zip(noisy, same):
        for key in ("psnr_display", "psnr_full", "ssim_display", "ssim_full", "roi_noise_std_hu", "roi_hu_bias_hu"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4, abs=1e-3), key
    results = result.summary["results"]
    assert results["same"]["psnr_display"]["mean"] == pytest.approx(results["noisy"]["psnr_display"]["mean"], abs=1e-3)
    assert result.summary["nps"]["same"]["nps_hu2_mm2"] == pytest.approx(result.summary["nps"]["noisy"]["nps_hu2_mm2"], rel=1e-3)


def test_summary_holds_the_protocol_methods_and_checkpoint_hashes(data, result):
    summary = json.loads((result.out_dir / "summary.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    protocol = summary["protocol"]
    assert [(w["name"], w["low_hu"], w["high_hu"], w["data_range_hu"]) for w in protocol["windows"]] == [
        ("display", -160.0, 240.0, 400.0), ("full", -1024.0, 3072.0, 4096.0)]
    assert (protocol["ssim"]["window"], protocol["ssim"]["window_size"], protocol["ssim"]["sigma"],
            protocol["ssim"]["use_sample_covariance"]) == ("gaussian", 11, 1.5, False)
    assert "whole slice" in protocol["ssim"]["region"] and protocol["rois"]["found_on"] == "reference"
    assert summary["data"] == {"split": "unit", "pairs": 1, "slices": SLICES, "slices_available": SLICES,
                               "slice_selection": "all"}
    assert summary["n2g_ct_version"] == __version__
    methods = {m["name"]: m for m in summary["methods"]}
    assert list(methods) == ["noisy", "same"]
    assert methods["same"]["sha256"] == file_sha256(data["identity"]) and methods["same"]["training_method"] == "supervised"
    assert methods["same"]["precision"] == "fp32"  # evaluation always runs float32
    assert summary["results"]["noisy"]["psnr_display"]["n"] == SLICES
    nps = summary["nps"]["noisy"]
    assert nps["frequency_per_mm"][-1] <= 0.5 / 0.7 and len(nps["frequency_per_mm"]) == len(nps["nps_hu2_mm2"]) == 4


def test_report_embeds_figures_and_shows_no_patient_data(result):
    out = result.out_dir
    html = (out / "report.html").read_text()
    markdown = (out / "report.md").read_text()
    assert html.count("data:image/png;base64,") == 5  # two examples, PSNR per slice, NPS, self-checks
    linked = [line.split("](")[1].rstrip(")") for line in markdown.splitlines() if line.startswith("![")]
    assert len(linked) == 5 and all((out / name).read_bytes().startswith(b"\x89PNG") for name in linked)
    assert "display [-160, 240] HU, data range 400" in html and "full [-1024, 3072] HU, data range 4096" in markdown
    assert "precision fp32" in markdown
    for name in ("report.html", "report.md", "summary.json", "per_slice.csv"):
        text = re.sub(r"base64,[A-Za-z0-9+/=]+", "", (out / name).read_text())
        for secret in ("Doe", "Jane", PATIENT_ID):
            assert secret not in text, (name, secret)
    assert not any(p.name.startswith(".") for p in out.parent.iterdir()), "no staging folder left"


def test_max_slices_takes_evenly_spaced_slices_and_out_must_be_new_or_overwritten(data, tmp_path):
    options = {"roi": ROI, "device": "cpu", "cache": VolumeCache(data["root"] / "cache"), "progress": False, "examples": 1}
    first = evaluate(data["pairs"], tmp_path / "out", max_slices=2, **options)
    assert [int(r["slice"]) for r in read_rows(first.out_dir / "per_slice.csv")] == [0, 2]
    assert first.summary["data"]["slice_selection"] == "2 evenly spaced of 3"
    with pytest.raises(ConfigError, match="--overwrite"):
        evaluate(data["pairs"], tmp_path / "out", **options)
    evaluate(data["pairs"], tmp_path / "out", max_slices=1, overwrite=True, **options)
    assert len(read_rows(tmp_path / "out" / "per_slice.csv")) == 1


def test_an_interrupted_run_leaves_no_complete_looking_output(data, tmp_path, monkeypatch):
    import n2g_ct.evaluation.evaluate as module

    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    killed = tmp_path / ".out.partial-999999999"  # left by a killed run (no such process)
    (killed / "figures").mkdir(parents=True)
    monkeypatch.setattr(module, "_evaluate_slice", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(data["pairs"], tmp_path / "out", roi=ROI, cache=VolumeCache(data["root"] / "cache"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_give_clear_errors_before_any_output(data, tmp_path):
    cache = VolumeCache(data["root"] / "cache")
    write_ct_series(tmp_path / "small", data["reference"][:, :32, :32])
    with pytest.raises(InputError, match="slice size"):
        evaluate([PairSelection(data["root"] / "low", tmp_path / "small")], tmp_path / "a", cache=cache, progress=False)
    with pytest.raises(InputError, match="checkpoint not found"):
        evaluate(data["pairs"], tmp_path / "b", models=[ModelSpec("m", tmp_path / "missing.pt")], cache=cache)
    with pytest.raises(ConfigError, match="noisy"):
        evaluate(data["pairs"], tmp_path / "c", models=[ModelSpec("noisy", data["identity"])], cache=cache)
    with pytest.raises(ConfigError, match="multiple of 4"):
        RoiSettings(size_px=10)
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(f"n2g_ct_manifest: 1\nroot: {data['root']}\nsplits:\n"
                        "  paper:\n    test:\n      - {low_dose: low, reference: ref}\n")
    with pytest.raises(ConfigError, match="no split 'nope'.*paper"):
        evaluate_split(manifest, "nope", tmp_path / "d", cache=cache)
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_bm3d_is_skipped_with_a_clear_note_when_not_installed(data, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "bm3d", None)  # import bm3d → ImportError
    result = evaluate(data["pairs"], tmp_path / "out", bm3d=True, max_slices=1, roi=ROI,
                      cache=VolumeCache(data["root"] / "cache"), progress=False)
    assert [m["name"] for m in result.summary["methods"]] == ["noisy"]
    assert "n2g-ct[bm3d]" in result.summary["skipped"][0] and "n2g-ct[bm3d]" in caplog.text
    assert "n2g-ct[bm3d]" in (tmp_path / "out" / "report.md").read_text()


def test_bm3d_with_the_estimated_psd_beats_the_noisy_input(data, tmp_path):
    pytest.importorskip("bm3d")
    result = evaluate(data["pairs"], tmp_path / "out", bm3d=True, max_slices=1, examples=0, roi=ROI,
                      cache=VolumeCache(data["root"] / "cache"), progress=False)
    psnr = {name: r["psnr_display"]["mean"] for name, r in result.summary["results"].items()}
    assert psnr["bm3d"] > psnr["noisy"] + 3 and psnr["bm3d-oracle"] > psnr["noisy"] + 3
    noise = {name: r["roi_noise_std_hu"]["mean"] for name, r in result.summary["results"].items()}
    assert noise["bm3d"] < 0.6 * noise["noisy"]


def test_cli_evaluates_pairs_through_the_entry_point(data, tmp_path):
    env = {**os.environ, "N2G_CT_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "n2g_ct.cli", "evaluate", "--pair", str(data["root"] / "low"),
               str(data["root"] / "ref"), "--model", f"same={data['identity']}", "--roi-size", "8", "--max-slices", "1",
               "--device", "cpu", "--out", str(tmp_path / "out"), "--no-progress"]
    run = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert run.returncode == 0, run.stderr
    assert "PSNR display [dB]" in run.stdout and "same" in run.stdout and "report.html" in run.stdout
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["data"]["slices"] == 1


def test_cli_errors_are_one_message_and_status_2(data, tmp_path, capsys):
    pair = ["--pair", str(data["root"] / "low"), str(data["root"] / "ref")]
    assert main(["evaluate", *pair, "--model", "x=missing.pt", "--out", str(tmp_path / "a")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["evaluate", *pair, "--model", "no-equals-sign", "--out", str(tmp_path / "b")]) == 2
    assert "NAME=CHECKPOINT" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: a manifest or pairs, not both
        main(["evaluate", *pair, "--manifest", "m.yaml", "--out", str(tmp_path / "c")])
    assert not any(tmp_path.iterdir())


def test_masked_ssim_ignores_what_lies_outside_the_mask():
    rng = np.random.default_rng(0)
    reference = torch.from_numpy(rng.normal(0, 50, (1, 1, 40, 40)).astype(np.float32))
    output = reference + torch.from_numpy(rng.normal(0, 20, (1, 1, 40, 40)).astype(np.float32))
    mask = torch.zeros(1, 1, 40, 40, dtype=torch.bool)
    mask[..., :20, :] = True
    corrupted = output.clone()
    corrupted[..., 26:, :] = 1000.0  # more than 5 pixels (half the SSIM window) from the mask
    for window in WINDOWS:
        assert float(ssim(corrupted, reference, window, mask)) == pytest.approx(float(ssim(output, reference, window, mask)))
        assert float(ssim(corrupted, reference, window)) < float(ssim(output, reference, window))
        assert float(ssim(output, reference, window, torch.ones_like(mask))) == pytest.approx(float(ssim(output, reference, window)))
