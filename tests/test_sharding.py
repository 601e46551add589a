"""Sharded denoising: the deterministic split, ``--part K/N`` with one merged summary, two torchrun
processes (gloo, CPU) giving the same outputs as one process."""

from __future__ import annotations

import csv
import hashlib
import subprocess
import sys

import pydicom
import pytest
from denoise_factories import tiny_checkpoint
from factories import phantom_hu, write_ct_series

from n2g_ct import atomic
from n2g_ct.cli import main
from n2g_ct.inference.denoise import SUMMARY_NAME, Job, Part, assign_parts

SIZES = (6, 2, 5, 3, 4)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Five series of different lengths, one per folder."""
    root = tmp_path_factory.mktemp("in") / "scans"
    for number, slices in enumerate(SIZES):
        write_ct_series(root / f"s{number}", phantom_hu((slices, 12, 12), seed=number))
    return root


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def comparable(summary_rows, out):
    """Summary rows without the timing, outputs relative to ``out``, as a sorted list."""
    return sorted(tuple((k, v.replace(str(out), "OUT")) for k, v in row.items() if k != "seconds")
                  for row in summary_rows)


CREATION = ("SeriesDate", "ContentDate", "InstanceCreationDate", "SeriesTime", "ContentTime", "InstanceCreationTime")


def outputs_digest(out):
    """Hash of every derived file below ``out`` (path, every element but the creation time, pixels)."""
    digest = hashlib.sha256()
    for path in sorted(out.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        for keyword in CREATION:
            delattr(ds, keyword)
        digest.update(str(path.relative_to(out)).encode() + repr(ds).encode() + ds.PixelData)
    return digest.hexdigest()


def denoise(*args):
    return main(["denoise", "--no-progress", "--threads", "1", *map(str, args)])


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_every_job_goes_to_one_part_largest_first_to_the_least_loaded(count):
    jobs = [Job(f"in{i}", f"out{i}", slices) for i, slices in enumerate([9, 1, 7, 3, 3, 8, 2, 5])]
    parts = assign_parts(jobs, count)
    assert parts == assign_parts(jobs, count), "a function of the plan alone"
    assert set(parts) <= set(range(1, count + 1)) and len(parts) == len(jobs)
    load = [sum(job.slices for job, part in zip(jobs, parts) if part == p) for p in range(1, count + 1)]
    assert max(load) - min(load) <= max(job.slices for job in jobs)  # greedy balance bound


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "2/0"])
def test_bad_parts_are_refused(text, scans, model, tmp_path, capsys):
    assert denoise(scans, "--out", tmp_path / "out", "--model", model, "--part", text) == 2
    assert "part must be K/N" in capsys.readouterr().err
    assert not (tmp_path / "out" / SUMMARY_NAME).exists()


def test_parts_split_the_series_and_the_last_part_writes_the_merged_summary(scans, model, tmp_path, capsys):
    whole, out = tmp_path / "whole", tmp_path / "parts"
    assert denoise(scans, "--out", whole, "--model", model) == 0

    assert denoise(scans, "--out", out, "--model", model, "--part", "1/2") == 0
    assert "1 of 2 parts done" in capsys.readouterr().out
    assert not (out / SUMMARY_NAME).exists(), "no merged summary before every part is done"
    first = rows(out / Part(1, 2).summary_name)
    assert denoise(scans, "--out", out, "--model", model, "--part", "2/2") == 0
    assert "all parts done: merged summary" in capsys.readouterr().out
    second = rows(out / Part(2, 2).summary_name)

    assert {r["output"] for r in first}.isdisjoint(r["output"] for r in second)
    assert len(first) + len(second) == len(SIZES)
    assert sorted(int(r["slices"]) for r in first) != sorted(int(r["slices"]) for r in second)
    assert abs(sum(int(r["slices"]) for r in first) - sum(int(r["slices"]) for r in second)) <= max(SIZES)
    merged = rows(out / SUMMARY_NAME)
    assert comparable(merged, out) == comparable(rows(whole / SUMMARY_NAME), whole) != []
    assert [r["input"] for r in merged] == [r["input"] for r in rows(whole / SUMMARY_NAME)]  # plan order
    assert outputs_digest(out) == outputs_digest(whole)

    # A part run again skips what it finished (as one process does) and writes the merged summary again.
    (out / SUMMARY_NAME).unlink()
    assert denoise(scans, "--out", out, "--model", model, "--part", "1/2") == 0
    assert {r["status"] for r in rows(out / Part(1, 2).summary_name)} == {"skipped"}
    assert (out / SUMMARY_NAME).exists()


def test_two_torchrun_processes_give_the_same_outputs_as_one(scans, model, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert denoise(scans, "--out", one, "--model", model) == 0
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "n2g_ct.cli", "denoise", str(scans), "--out", str(two), "--model", str(model), "--device", "cpu",
         "--threads", "1", "--no-progress"],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (two / Part(1, 2).summary_name).exists() and (two / Part(2, 2).summary_name).exists()
    assert comparable(rows(two / SUMMARY_NAME), two) == comparable(rows(one / SUMMARY_NAME), one)
    assert outputs_digest(two) == outputs_digest(one) != outputs_digest(tmp_path)
    assert (two / "denoise.part-1-of-2.log").exists() and (two / "denoise.part-2-of-2.log").exists()


def test_partial_outputs_of_another_machine_are_left_alone(tmp_path):
    """Parts on several machines share OUT: a PID of another machine means nothing here."""
    other = tmp_path / f".s{atomic.PARTIAL_MARK}1h00000000"  # a live job elsewhere (host hash differs)
    dead_here = tmp_path / f".t{atomic.PARTIAL_MARK}999999999h{atomic.process_mark().partition('h')[2]}"
    other.mkdir()
    dead_here.mkdir()
    assert atomic.remove_stale(tmp_path) == [dead_here]
    assert other.exists() and not dead_here.exists()
