"""Manifests: Mayo 2016 scan in both layouts, splits, check, load_split, CLI — on a tiny fake tree."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from fake_mayo import MAYO_PATIENTS, build_fake_mayo, mayo_series_folder

from n2g_ct.cli import main
from n2g_ct.datasets.check import check_manifest
from n2g_ct.datasets.definition import DEFINITIONS_DIR, RandomPositionsRule, load_definition
from n2g_ct.datasets.manifest import load_manifest, load_split
from n2g_ct.datasets.scan import pair_positions, paper_counts, scan_dataset
from n2g_ct.datasets.selection import PairSelection
from n2g_ct.errors import ConfigError, InputError

PHI = ("PID-SECRET-42", "Doe", "Jane")  # the fake headers' patient ID and name
UNPAIRED = "L333"  # in the patient split's test set: its quarter-dose series has one extra slice
N_PAIRS = 6 * len(MAYO_PATIENTS)


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """The same fake Mayo data in both layouts (6 slices per 1 mm series, 2 per 3 mm series)."""
    base = tmp_path_factory.mktemp("mayo")
    return {layout: build_fake_mayo(base / layout, layout, extra_quarter_slice={UNPAIRED})
            for layout in ("by_patient", "by_dose")}


@pytest.fixture(scope="module")
def scanned(trees, tmp_path_factory):
    """(summary, manifest path) of the by_patient tree, default seed."""
    out = tmp_path_factory.mktemp("manifest") / "mayo2016.yaml"
    return scan_dataset("mayo2016", trees["by_patient"], out), out


def _roles(split_doc: dict) -> dict[str, dict[str, list[float]]]:
    """role → patient → positions (mm) of a split as written in the YAML."""
    return {role: {e["patient"]: e["positions_mm"] for e in split_doc[role]} for role in ("noisy", "clean", "test")}


def _edited(manifest: Path, tmp_path: Path, edit) -> Path:
    doc = yaml.safe_load(manifest.read_text())
    edit(doc)
    out = tmp_path / "edited.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def test_definition_matches_the_challenge_and_the_paper():
    d = load_definition("mayo2016")
    assert d.patients == MAYO_PATIENTS
    assert d.split_resolution == "1mm" and set(d.resolutions) == {"1mm", "3mm"}
    paper, patient = d.splits["paper"], d.splits["patient"]
    assert (paper.test_pairs, paper.noisy_slices, paper.clean_slices) == (500, 2718, 2718)
    assert patient.test == ("L333", "L506")
    assert len(patient.noisy) == len(patient.clean) == 4
    assert set(patient.noisy + patient.clean + patient.test) == set(MAYO_PATIENTS)


def test_pair_positions_mutual_nearest_within_tolerance():
    low = np.array([-1.0, 0.0, 1.0, 2.0, 5.0])
    ref = np.array([0.02, 1.0, 2.3, 5.0, 6.0])
    pairs = pair_positions(low, ref, tolerance_mm=0.1)
    assert pairs.tolist() == [[1, 0], [2, 1], [4, 3]]  # 2.0↔2.3 too far; -1 and 6 unpaired


def test_paper_counts_scale_down_by_a_stated_rule():
    rule = RandomPositionsRule("paper", "", 500, 2718, 2718)
    assert paper_counts(5936, rule) == ((500, 2718, 2718), None)
    counts, note = paper_counts(6000, rule)
    assert counts == (500, 2718, 2718) and "64 of 6000 paired positions unused" in note
    counts, note = paper_counts(60, rule)
    assert counts == (5, 27, 27) and note.startswith("scaled: 60 paired positions < 5936")
    assert paper_counts(3, rule)[0] == (1, 1, 1)
    with pytest.raises(InputError, match="need at least 3"):
        paper_counts(2, rule)


def test_scan_counts_pairs_and_reports_unpaired(scanned):
    summary, out = scanned
    assert summary.layout == "by_patient"
    by_patient = {p.patient: p for p in summary.patients}
    assert by_patient[UNPAIRED].low_dose == 7 and by_patient[UNPAIRED].reference == 6
    assert all(p.paired == 6 for p in summary.patients)
    assert summary.split_counts["paper"] == {"noisy": 27, "clean": 27, "test": 5}
    assert summary.split_counts["patient"] == {"noisy": 24, "clean": 24, "test": 12}
    assert "scaled by 60/5936" in summary.render()
    doc = yaml.safe_load(out.read_text())
    assert doc["provenance"]["unpaired_positions_mm"] == {UNPAIRED: {"quarter": [-261.0], "full": []}}
    inventory = {(r["patient"], r["dose"], r["resolution"]): r["files"] for r in doc["inventory"]}
    assert len(inventory) == 40 and inventory[("L067", "full", "3mm")] == 2


def test_paper_split_uses_each_position_in_one_role(scanned):
    _, out = scanned
    doc = yaml.safe_load(out.read_text())
    roles = _roles(doc["splits"]["paper"])
    for patient in MAYO_PATIENTS:
        used = [z for role in roles.values() for z in role.get(patient, [])]
        assert len(used) == len(set(used)), f"{patient}: a position serves two roles"
    total = sum(len(z) for role in roles.values() for z in role.values())
    assert total == 59 <= N_PAIRS
    unpaired_mm = yaml.safe_load(out.read_text())["provenance"]["unpaired_positions_mm"][UNPAIRED]["quarter"][0]
    assert all(unpaired_mm not in role.get(UNPAIRED, []) for role in roles.values())
    noisy = doc["splits"]["paper"]["noisy"]
    assert all("quarter_1mm" in e["series"] for e in noisy)
    assert all("full_1mm" in e["series"] for e in doc["splits"]["paper"]["clean"])


def test_same_seed_same_manifest_other_seed_other_draw(scanned, trees, tmp_path):
    _, first = scanned
    again = tmp_path / "again.yaml"
    scan_dataset("mayo2016", trees["by_patient"], again)
    assert again.read_bytes() == first.read_bytes()
    other = tmp_path / "seed7.yaml"
    scan_dataset("mayo2016", trees["by_patient"], other, seed=7, splits=["paper"])
    doc0, doc7 = (yaml.safe_load(p.read_text()) for p in (first, other))
    assert list(doc7["splits"]) == ["paper"]
    assert _roles(doc0["splits"]["paper"]) != _roles(doc7["splits"]["paper"])


def test_both_layouts_give_the_same_selection(scanned, trees, tmp_path):
    _, first = scanned
    summary = scan_dataset("mayo2016", trees["by_dose"], tmp_path / "by_dose.yaml")
    assert summary.layout == "by_dose"
    a, b = (yaml.safe_load(p.read_text())["splits"] for p in (first, summary.out))
    for name in ("paper", "patient"):
        assert _roles(a[name]) == _roles(b[name])
    split = load_split(summary.out, "patient")
    assert split.noisy[0].series == trees["by_dose"] / mayo_series_folder("by_dose", "L067", "quarter", "1mm")


def test_patient_split_membership(scanned, trees):
    _, out = scanned
    split = load_split(out, "patient")
    root = trees["by_patient"]
    assert [s.series for s in split.noisy] == [root / p / "quarter_1mm" for p in ("L067", "L096", "L109", "L143")]
    assert [s.series for s in split.clean] == [root / p / "full_1mm" for p in ("L192", "L286", "L291", "L310")]
    assert [(t.low_dose, t.reference) for t in split.test] == [
        (root / p / "quarter_1mm", root / p / "full_1mm") for p in ("L333", "L506")]
    l333 = split.test[0]
    # the extra lowest quarter-dose slice is unpaired, so low-dose indices run one ahead of the reference's
    assert l333.slices == (1, 2, 3, 4, 5, 6) and l333.reference_slices == (0, 1, 2, 3, 4, 5)
    assert split.test[1].slices == split.test[1].reference_slices == tuple(range(6))


def test_check_passes_and_prints_counts_per_patient_and_role(scanned):
    _, out = scanned
    report = check_manifest(out)
    assert report.ok, report.problems
    text = report.render()
    assert "split paper (disjoint: slice)" in text and "split patient (disjoint: patient)" in text
    assert "total" in text and "L067" in text
    assert not any(s in text for s in PHI)


def test_check_finds_missing_files_with_data_root(scanned, trees, tmp_path):
    _, out = scanned
    moved = shutil.copytree(trees["by_patient"], tmp_path / "moved")
    assert check_manifest(out, data_root=moved).ok
    victim = yaml.safe_load(out.read_text())["splits"]["patient"]["clean"][0]["files"][2]
    (moved / victim).unlink()
    report = check_manifest(out, data_root=moved)
    assert not report.ok
    assert any("1 of 6 listed file(s)" in p and "missing" in p for p in report.problems)


def test_check_finds_stale_indices(scanned, tmp_path):
    _, out = scanned

    def swap_files(doc):
        files = doc["splits"]["patient"]["noisy"][0]["files"]
        files[0], files[1] = files[1], files[0]

    report = check_manifest(_edited(out, tmp_path, swap_files))
    assert any("no longer point at the listed file" in p for p in report.problems)


def _full_dose_twin_in_clean(doc):
    """Paper split: put the full-dose slices at a noisy entry's positions into the clean pool."""
    noisy = doc["splits"]["paper"]["noisy"][0]
    doc["splits"]["paper"]["clean"].append(dict(noisy, series=noisy["series"].replace("quarter", "full"), files=None))


def _noisy_entry_in_clean(doc):
    doc["splits"]["paper"]["clean"].append(dict(doc["splits"]["paper"]["noisy"][0]))


def _clean_patient_in_noisy(doc):
    """Patient split: give a clean-pool patient's quarter-dose series to the noisy pool."""
    clean = doc["splits"]["patient"]["clean"][0]
    entry = dict(clean, series=clean["series"].replace("full", "quarter"), files=None, positions_mm=None)
    doc["splits"]["patient"]["noisy"].append(entry)


def _wrong_count(doc):
    doc["splits"]["paper"]["counts"]["test"] = 500


@pytest.mark.parametrize(
    "edit, message",
    [
        (_full_dose_twin_in_clean, "slice position(s) in both noisy and clean"),
        (_noisy_entry_in_clean, "used as both noisy and clean"),
        (_clean_patient_in_noisy, "patient(s) L192 in both noisy and clean"),
        (_wrong_count, "test has 5 pair(s), the manifest records 500"),
    ],
    ids=["position-in-two-roles", "slice-in-two-roles", "patient-in-two-roles", "counts"],
)
def test_check_finds_overlaps_and_count_changes(scanned, tmp_path, edit, message):
    _, out = scanned
    report = check_manifest(_edited(out, tmp_path, edit))
    assert not report.ok
    assert any(message in p for p in report.problems), report.problems


def test_broken_trees_get_clear_errors(trees, tmp_path):
    (tmp_path / "empty").mkdir()
    expected = r"no mayo2016 layout found; expected e\.g\. .*L067/quarter_1mm \(by_patient\) or .*QD_1mm/L067/"
    with pytest.raises(InputError, match=expected):
        scan_dataset("mayo2016", tmp_path / "empty", tmp_path / "m.yaml")
    broken = shutil.copytree(trees["by_patient"], tmp_path / "broken")
    shutil.rmtree(broken / "L109" / "quarter_1mm")
    shutil.rmtree(broken / "L506" / "full_1mm")
    with pytest.raises(InputError, match="L109 has no quarter-dose 1mm series.*L506 has no full-dose 1mm series"):
        scan_dataset("mayo2016", broken, tmp_path / "m.yaml")
    both = shutil.copytree(trees["by_dose"], tmp_path / "both")
    shutil.copytree(trees["by_patient"] / "L067", both / "L067")
    with pytest.raises(InputError, match="several mayo2016 layouts"):
        scan_dataset("mayo2016", both, tmp_path / "m.yaml")
    with pytest.raises(ConfigError, match="no split nope"):
        scan_dataset("mayo2016", trees["by_patient"], tmp_path / "m.yaml", splits=["nope"])
    assert not (tmp_path / "m.yaml").exists()


def test_scan_never_overwrites_inputs(trees, tmp_path):
    root = trees["by_patient"]
    with pytest.raises(ConfigError, match="inside the data root"):
        scan_dataset("mayo2016", root, root / "L067" / "full_1mm" / "m.yaml")
    with pytest.raises(ConfigError, match="is the dataset definition"):
        scan_dataset("mayo2016", root, DEFINITIONS_DIR / "mayo2016.yaml", force=True)
    existing = tmp_path / "mine.yaml"
    existing.write_text("precious")
    with pytest.raises(ConfigError, match="exists; pass --force"):
        scan_dataset("mayo2016", root, existing)
    assert existing.read_text() == "precious"
    scan_dataset("mayo2016", root, existing, force=True)
    assert load_manifest(existing).dataset == "mayo2016"
    assert [p.name for p in tmp_path.iterdir()] == ["mine.yaml"]  # no temporary file left behind


def test_load_split_resolves_paths_and_picks_splits(tmp_path):
    template = DEFINITIONS_DIR / "in-house.yaml"
    split = load_split(template, data_root=tmp_path)
    assert split.name == "default"
    assert split.noisy[0].series == tmp_path / "low-dose/patient-001/series-3" and split.noisy[0].slices is None
    paired = tmp_path / "paired/patient-202"
    assert split.test[1] == PairSelection(paired / "low-dose", paired / "routine-dose", (0, 1, 2, 3), (2, 3, 4, 5))
    (tmp_path / "sub").mkdir()
    relative = tmp_path / "sub" / "m.yaml"
    relative.write_text("n2g_ct_manifest: 1\nroot: ../data\nsplits:\n"
                        "  a: {noisy: [{series: ld, slices: [2, 0]}], clean: [{series: /abs/rd}]}\n"
                        "  b: {test: [{low_dose: ld, reference: rd}]}\n")
    a = load_split(relative, "a")
    assert a.noisy[0].series == tmp_path / "sub" / "../data/ld" and a.noisy[0].slices == (2, 0)
    assert a.clean[0].series == Path("/abs/rd")
    assert load_split(relative, "b").test[0].reference_slices is None
    with pytest.raises(ConfigError, match="holds splits a, b; name the one"):
        load_split(relative)
    with pytest.raises(ConfigError, match="no split 'c'"):
        load_split(relative, "c")


@pytest.mark.parametrize(
    "text, message",
    [
        ("splits: {}", r"missing key\(s\) n2g_ct_manifest"),
        ("n2g_ct_manifest: 2\nsplits: {a: {noisy: [{series: x}]}}", "is not supported"),
        ("n2g_ct_manifest: 1\nsplits: {a: {noisy: [{series: x, slice: [1]}]}}",
         r"splits\.a\.noisy\[0\]: unknown key\(s\) slice"),
        ("n2g_ct_manifest: 1\nsplits: {a: {noisy: [{series: x, slices: [1, 1]}]}}", "lists a slice index twice"),
        ("n2g_ct_manifest: 1\nsplits: {a: {noisy: [{series: x, slices: [-1]}]}}", "non-negative integer"),
        ("n2g_ct_manifest: 1\nsplits: {a: {noisy: [{series: x, slices: [0], files: [p, q]}]}}",
         r"files: has 2 item\(s\) for 1 slice"),
        ("n2g_ct_manifest: 1\nsplits: {a: {test: [{low_dose: x, reference: y, reference_slices: [0]}]}}",
         "'reference_slices' needs 'slices'"),
        ("n2g_ct_manifest: 1\nsplits: {a: {disjoint: study, noisy: [{series: x}]}}", "expected one of slice, patient"),
        ("n2g_ct_manifest: 1\nsplits: {a: {noisy: []}}", "has no noisy, clean or test entry"),
        ("n2g_ct: [", "not valid YAML"),
    ],
)
def test_invalid_manifests_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as info:
        load_manifest(path)
    assert str(path) in str(info.value)


def test_check_reports_every_missing_series_of_the_template(tmp_path):
    report = check_manifest(DEFINITIONS_DIR / "in-house.yaml", data_root=tmp_path)
    assert len(report.problems) == 9 and all("is missing" in p for p in report.problems)
    text = report.render()
    assert re.search(r"^  P002 +10 +0 +0$", text, re.M)  # counted from the listed slice indices
    assert re.search(r"^  total +\? +\? +\?$", text, re.M)  # "all slices" of a missing series: unknown


def test_a_definition_is_not_a_manifest():
    with pytest.raises(InputError, match="is a dataset definition, not a manifest.*manifest scan mayo2016"):
        load_split(DEFINITIONS_DIR / "mayo2016.yaml")


def test_cli_scan_and_check(trees, tmp_path, capsys):
    out = tmp_path / "m.yaml"
    scan = ["manifest", "scan", "mayo2016", "--root", str(trees["by_dose"]), "--out", str(out), "--split", "patient"]
    assert main(scan) == 0
    printed = capsys.readouterr()
    assert "layout by_dose" in printed.out and "split patient: noisy 24 slices" in printed.out
    assert main(["manifest", "check", str(out)]) == 0
    assert "OK:" in capsys.readouterr().out
    missing = yaml.safe_load(out.read_text())["splits"]["patient"]["test"][0]["reference_files"][0]
    moved = shutil.copytree(trees["by_dose"], tmp_path / "moved")
    (moved / missing).unlink()
    assert main(["manifest", "check", str(out), "--data-root", str(moved)]) == 1
    printed = capsys.readouterr()
    assert "listed file(s)" in printed.out and "1 problem(s)" in printed.err
    for text in (printed.out, printed.err, out.read_text()):
        assert not any(s in text for s in PHI)


def test_cli_entry_point_reports_errors_without_traceback(tmp_path):
    (tmp_path / "nothing").mkdir()
    run = subprocess.run([sys.executable, "-m", "n2g_ct.cli", "manifest", "scan", "mayo2016", "--root",
                          str(tmp_path / "nothing"), "--out", str(tmp_path / "m.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "n2g-ct manifest: error:" in run.stderr and "no mayo2016 layout found" in run.stderr
    assert "Traceback" not in run.stderr
