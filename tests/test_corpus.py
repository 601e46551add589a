"""Conformance on real-world DICOM: every case of ``../shared/data/ct-corpus`` (25 cases from many
scanners, encoders and anonymisers; its README lists each case's facts).

One identity-model denoise run over every case (module fixture), then per case: the files that are
CT image slices each give one derived frame at the source's position and orientation, with the HU
the corpus README states, that open in SimpleITK and dcm2niix and carry no ``dciodvfy`` error their
source lacks; ``info``, a training pool and ``evaluate`` read them; the deliberately wrong cases are
refused or skipped with a reason; the corpus stays byte-identical. Skipped when the corpus is absent.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from denoise_factories import _tool, dciodvfy_errors, identity_checkpoint

from n2g_ct.datasets.cache import VolumeCache
from n2g_ct.datasets.selection import PairSelection
from n2g_ct.datasets.slices import slice_pool
from n2g_ct.evaluation.evaluate import evaluate
from n2g_ct.inference.denoise import denoise_inputs
from n2g_ct.io import read_dicom_series, scan_dicom
from n2g_ct.io.summary import describe_path

CORPUS = Path(os.environ.get("N2G_CT_CORPUS", Path(__file__).resolve().parents[2] / "shared" / "data" / "ct-corpus"))
pytestmark = pytest.mark.skipif(not (CORPUS / "MANIFEST.sha256").is_file(),
                                reason=f"the ct-corpus is not at {CORPUS} (set N2G_CT_CORPUS to its folder)")
CASES = sorted(p.name for p in CORPUS.iterdir() if p.is_dir()) if CORPUS.is_dir() else []

# The corpus README's facts: stored value range and RescaleIntercept (slope 1) of every image case.
README_STORED_RANGE_AND_INTERCEPT = {
    "anon-ct-j2k-lossless-bitdepth-mismatch": (-2000, 2492, -1024),
    "enhanced-ct-multiframe-nema": (0, 1196, -1024),
    "ge-ctpace-1998-no-preamble-series": (-1500, 1439, 0),
    "ge-discovery750-big-endian-tilt": (0, 4095, -1024),
    "ge-discovery750-gaps-duplicate-position-series": (-1024, 2517, -1024),
    "ge-hispeed-deflate": (-2000, 2402, -1024),
    "ge-hispeed-implicit-vr-pad32768": (-2000, 2402, -1024),
    "ge-hispeed-jpeg-lossless-p14-nonsv1": (-2000, 2402, -1024),
    "ge-hispeed-jpegls-lossless": (-2000, 2402, -1024),
    "ge-hispeed-localizer-jpegll-400x512": (-196, 406, 0),
    "ge-lightspeed16-irregular-spacing-series": (0, 254, -1024),
    "ge-optima520-tilt-padding-as-us": (-2000, 2400, -1024),
    "ge-rhapsode-rle-multifragment": (-2000, 2278, -1024),
    "hitachi-supria-tilt-j2k-pixrep-mismatch": (-2000, 1896, 0),
    "philips-bigbore-intercept1000-series": (0, 2365, -1000),
    "philips-ingenuityflex-localizer": (0, 2424, -1024),
    "siemens-definitionas-jpegll-sv1-12bit": (13, 2267, -1024),
    "siemens-definitionas-tilt-via-orientation-series": (0, 254, -1024),
    "tcia-lctsc-anonymised-no-manufacturer": (0, 2035, -1000),
    "tcia-pancreas-explicit-vr-all-un-j2k": (-1024, 1186, 0),
    "toshiba-aquilion-j2k-lossless": (-2048, 1969, 0),
    "xeos-aura-1024-jpegll-intercept1000": (0, 0, -1000),
}
LOCALIZERS = {"ge-hispeed-localizer-jpegll-400x512", "philips-ingenuityflex-localizer"}
# Cases with no CT image slice to denoise, and the reason the run must give.
NOT_SLICES = {
    "philips-gemini-private-pmsct-rle1": "no standard Pixel Data",
    "wrong-ct-modality-secondary-capture": "no patient geometry",
    **{case: "localizer" for case in LOCALIZERS},
}
DICOMDIR_CASE = "wrong-dicomdir-mixed-modalities"
WINDOW_HU = (-1024.0, 3072.0)  # the identity checkpoint's window: HU outside it are clipped


def _source_frames(case: Path, include_localizers: bool) -> dict[str, tuple[Path, pydicom.Dataset]]:
    """The CT image slices of a case, read independently of n2g_ct: SOPInstanceUID → (file, dataset)."""
    found = {}
    for path in sorted(p for p in case.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=False)
        image_type = [str(v) for v in ds.get("ImageType", [])]
        geometry = "ImagePositionPatient" in ds or "PerFrameFunctionalGroupsSequence" in ds
        if (ds.get("Modality") == "CT" and "PixelData" in ds and geometry
                and (include_localizers or "LOCALIZER" not in image_type)):
            found[str(ds.SOPInstanceUID)] = (path, ds)
    return found


def _hu(path: Path, localizer: bool) -> np.ndarray:
    (series,) = scan_dicom(path, include_localizers=localizer)
    return read_dicom_series(series).hu


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Denoise the whole corpus with the identity model (twice: without and with localizers)."""
    if not CASES:
        pytest.skip("no corpus")
    tmp = tmp_path_factory.mktemp("corpus")
    model = identity_checkpoint(tmp / "identity.pt")
    inputs = [CORPUS / case for case in CASES]
    summary = denoise_inputs(inputs, tmp / "out", model, force=True, progress=False)
    localizers = denoise_inputs([CORPUS / c for c in sorted(LOCALIZERS)], tmp / "localizers", model, force=True,
                                progress=False, include_localizers=True)
    return tmp, summary, localizers


def _outcomes(summary, case: str):
    return [o for o in summary.outcomes if Path(o.source).is_relative_to(CORPUS / case)]


def _derived_files(summary, case: str) -> list[Path]:
    return sorted(p for o in _outcomes(summary, case) if o.status == "done" for p in Path(o.output).rglob("*.dcm"))


def test_the_corpus_is_left_byte_identical(run):
    for line in (CORPUS / "MANIFEST.sha256").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        assert hashlib.sha256((CORPUS / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize("case", CASES)
def test_info_describes_every_case(case):
    text = describe_path(CORPUS / case)
    if case in README_STORED_RANGE_AND_INTERCEPT and case not in LOCALIZERS:
        assert "DICOM series" in text and "not readable" not in text
    else:
        assert "set aside" in text


@pytest.mark.parametrize("case", sorted(README_STORED_RANGE_AND_INTERCEPT))
def test_every_image_case_reads_to_the_readme_hu(case):
    low, high, intercept = README_STORED_RANGE_AND_INTERCEPT[case]
    (series,) = scan_dicom(CORPUS / case, include_localizers=case in LOCALIZERS)
    volume = read_dicom_series(series)
    assert (volume.hu.min(), volume.hu.max()) == (low + intercept, high + intercept)


@pytest.mark.parametrize("case", sorted(set(README_STORED_RANGE_AND_INTERCEPT) | {DICOMDIR_CASE}))
def test_each_ct_slice_gives_one_derived_frame_in_place_with_its_hu(run, case):
    tmp, summary, localizers = run
    summary = localizers if case in LOCALIZERS else summary
    sources = _source_frames(CORPUS / case, include_localizers=case in LOCALIZERS)
    derived = _derived_files(summary, case)
    frames = 0
    for path in derived:
        ds = pydicom.dcmread(path)
        frames += int(ds.get("NumberOfFrames", 1) or 1)
        reference = ds.get("SourceImageSequence")
        source_uid = reference[0].ReferencedSOPInstanceUID if reference else None
        if source_uid is None:  # a source UID that is not a valid UID is not referenced
            (source_uid,) = sources
        source_path, source = sources[str(source_uid)]
        if "PerFrameFunctionalGroupsSequence" in ds:
            positions = [f.PlanePositionSequence[0].ImagePositionPatient for f in ds.PerFrameFunctionalGroupsSequence]
            expected = [f.PlanePositionSequence[0].ImagePositionPatient
                        for f in source.PerFrameFunctionalGroupsSequence]
            assert positions == expected
        else:
            assert ds.ImagePositionPatient == source.ImagePositionPatient
            assert ds.ImageOrientationPatient == source.ImageOrientationPatient
        got, want = _hu(path, case in LOCALIZERS), _hu(source_path, case in LOCALIZERS)
        inside = (want >= WINDOW_HU[0]) & (want <= WINDOW_HU[1])
        assert np.abs(got - want)[inside].max(initial=0) <= 0.5, f"{path} from {source_path}"
    assert frames == sum(int(ds.get("NumberOfFrames", 1) or 1) for _, ds in sources.values()) > 0


@pytest.mark.parametrize("case", sorted(set(README_STORED_RANGE_AND_INTERCEPT) | {DICOMDIR_CASE}))
def test_derived_files_add_no_validator_error_and_open_in_sitk_and_dcm2niix(run, case, tmp_path):
    tmp, summary, localizers = run
    summary = localizers if case in LOCALIZERS else summary
    source_errors = {e for p in (CORPUS / case).rglob("*") if p.is_file() for e in dciodvfy_errors(p)}
    derived = _derived_files(summary, case)
    for path in derived:
        assert set(dciodvfy_errors(path)) <= source_errors, path
        assert sitk.ReadImage(str(path)).GetSize()[:2] == tuple(reversed(pydicom.dcmread(path).pixel_array.shape[-2:]))
    for folder in sorted({p.parent for p in derived}):
        converted = subprocess.run([_tool("dcm2niix"), "-o", str(tmp_path), "-f", folder.name, str(folder)],
                                   capture_output=True, text=True, check=False)
        assert converted.returncode == 0 and list(tmp_path.glob(f"{folder.name}*.nii")), converted.stdout[-500:]


@pytest.mark.parametrize("case", sorted(NOT_SLICES))
def test_what_is_not_a_ct_slice_is_refused_with_the_reason(run, case):
    _, summary, _ = run
    outcomes = _outcomes(summary, case)
    assert outcomes and all(o.status in ("skipped", "failed") for o in outcomes)
    assert any(NOT_SLICES[case] in o.message for o in outcomes)
    assert not _derived_files(summary, case)


def test_a_dicomdir_folder_gives_its_ct_series_and_lists_the_rest(run):
    _, summary, _ = run
    outcomes = _outcomes(summary, DICOMDIR_CASE)
    done = [o for o in outcomes if o.status == "done"]
    skipped = "\n".join(o.message for o in outcomes if o.status == "skipped")
    assert len(done) == 2 and not [o for o in outcomes if o.status == "failed"]
    assert "modality MR" in skipped and "modality CR" in skipped and "localizer" in skipped and "DICOMDIR" in skipped


def test_every_ct_series_of_the_corpus_makes_a_training_pool_and_an_evaluation(run, tmp_path):
    """Training reads each series slice by slice (any geometry); evaluate pairs each derived series
    with its source (the identity model: the same image)."""
    _, summary, _ = run
    done = [o for o in summary.outcomes if o.status == "done"]
    cache = VolumeCache(tmp_path / "cache")
    table = slice_pool("noisy pool", [Path(o.source) for o in done], cache)
    assert len(table) == sum(o.slices for o in done)
    pairs = [PairSelection(Path(o.output), Path(o.source)) for o in done if Path(o.source).is_dir()]
    result = evaluate(pairs, tmp_path / "evaluation", cache=cache, examples=1, progress=False)
    assert (tmp_path / "evaluation" / "summary.json").is_file() and result.summary["data"]["slices"] == sum(
        o.slices for o in done if Path(o.source).is_dir())
