"""Batch denoising: every series or volume found in the inputs → a derived DICOM series or a NIfTI file.

Inputs are series folders, folder trees (searched recursively: each DICOM series and each NIfTI file
is one job), single DICOM files, NIfTI files, or manifests (the low-dose series of one split: its
test pairs' low-dose series and its noisy pool, each whole). Outputs mirror the inputs below OUT::

    folder IN (tree or series)  → OUT/<IN name>/<series folder relative to IN>/IM00000.dcm ...
    several series in a folder  → OUT/<IN name>/<folder>/<source SeriesInstanceUID>/
    DICOM file F                → OUT/<F stem>/
    NIfTI file N                → OUT/<N name>            (in a tree: OUT/<IN name>/<relative path>)
    manifest                    → as a folder IN, IN being the manifest's data root

plus ``OUT/denoise_summary.csv``: one row per job (input, series UID, output, slices, status
``done``/``skipped``/``refused``/``failed``, seconds, voxels clipped below and above the stored
range (below: air, harmless; above: values lost), the self-check values,
message), rewritten after each job. What is not a CT image slice (other modalities, localizers,
secondary captures, DICOMDIR indexes, images without standard pixel data) gets a ``skipped`` row
with the reason; a damaged file fails its series by name. Any slice geometry is denoised slice by
slice (irregular spacing, gaps, duplicated positions, tilt); Enhanced CT frames too.

Self-check: every series is checked, reference-free, while it is denoised (:mod:`n2g_ct.quality.self_check`:
the HU shift in uniform soft tissue, the power removed per band against the series' own noise,
how much of it lies at edges). A series on which the model fails is *refused*: nothing is written
for it, its row says which check failed, and the run ends with status 1; ``force`` writes it anyway.

Safety: a job is written to a hidden ``.<name>.partial-<pid>`` sibling of its output and renamed
into place when complete, so an output that exists is complete; a re-run skips it (``overwrite``
redoes it) after checking that it was made from the same series with the same model. Inputs are
only read: OUT inside an input, or any output landing inside one, is refused before anything is
written. Before any model time is spent, OUT must be writable, every slice must have a usable
rescale and every series' derived header must build (else that series fails). A job that fails is
reported and the others go on. Partial outputs of dead runs below OUT are removed at the start.
One run per OUT at a time.

Sharding: ``part`` K of N (``--part K/N`` for schedulers, or ``torchrun --nproc_per_node N``, one part
per rank) denoises the jobs :func:`assign_parts` gives it: every part plans all jobs the same way and
takes its own, largest first to the least loaded part, so the split needs no communication and the
same inputs always split the same way. Part K writes ``OUT/denoise_summary.part-K-of-N.csv``; the
part that completes the set writes the merged ``OUT/denoise_summary.csv`` (every row, in plan
order). Skipping, resuming and refusing work per job as in one process; several machines may share OUT.

DICOM series stream through memory ``max(batch_size, 32)`` slices at a time, so host memory does
not grow with the series length; NIfTI volumes, DICOM series written as NIfTI and Enhanced CT
(multi-frame) series are read whole.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.misc import is_dicom
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from n2g_ct.atomic import remove_stale, staged_output, write_text_atomic
from n2g_ct.datasets.manifest import load_manifest
from n2g_ct.devices import Processes
from n2g_ct.errors import ConfigError, InputError, N2GError
from n2g_ct.inference.denoiser import (
    DEFAULT_BATCH_SIZE,
    Denoiser,
    denoise_volume,
    denoiser_from_checkpoint,
)
from n2g_ct.io.dicom import DicomSeries, frame_rescale, read_dicom_series, scan_dicom_tree, visible_files
from n2g_ct.io.dicom_writer import Clipping, Derivation, DerivedSeriesWriter
from n2g_ct.io.nifti import is_nifti, read_nifti, write_volume_nifti
from n2g_ct.io.volume import CTVolume
from n2g_ct.models import resolve_model
from n2g_ct.models.checkpoint import read_checkpoint
from n2g_ct.quality.self_check import SelfCheck, SelfCheckResult

log = logging.getLogger(__name__)

SUMMARY_NAME = "denoise_summary.csv"
SUMMARY_FIELDS = ("input", "series_uid", "output", "slices", "status", "seconds", "clipped_below", "clipped_above",
                  "self_check",
                  "hu_shift_hu", "removed_noise_ratio", "edge_ratio", "message")
READ_CHUNK_SLICES = 32
"""DICOM slices decoded at a time (at least one batch)."""
_MANIFEST_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Job:
    """One series or volume to denoise.

    Attributes:
        source: series folder (DICOM file for a single-file input) or NIfTI file.
        output: the output folder (DICOM) or file (NIfTI).
        slices: number of slices (progress), 0 when unknown.
        series: the DICOM series from a header scan; ``None`` for NIfTI.
        identity_rescale: read CT images without RescaleSlope/Intercept as stored value = HU.
    """

    source: Path
    output: Path
    slices: int
    series: DicomSeries | None = None
    identity_rescale: bool = False


@dataclass
class Outcome:
    """What happened to one job (a row of the summary CSV)."""

    source: Path
    output: Path | None
    status: str = "failed"
    slices: int = 0
    series_uid: str = ""
    seconds: float = 0.0
    clipping: Clipping = field(default_factory=Clipping)
    check: SelfCheckResult | None = None
    message: str = ""

    def row(self) -> dict[str, str]:
        check = ("", "", "", "") if self.check is None else (
            "pass" if self.check.passed else "FAIL", f"{self.check.hu_shift_hu:.2f}",
            f"{self.check.removed_noise_ratio:.3f}", f"{self.check.edge_ratio:.3f}")
        values = (self.source, self.series_uid, self.output or "", self.slices, self.status,
                  f"{self.seconds:.2f}", self.clipping.below, self.clipping.above, *check, self.message)
        return dict(zip(SUMMARY_FIELDS, (str(v) for v in values)))


@dataclass(frozen=True)
class Part:
    """This process's share of a sharded run: part ``number`` (from 1) of ``count`` (module docstring)."""

    number: int = 1
    count: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.number <= self.count:
            raise ConfigError(f"part must be K/N with 1 ≤ K ≤ N, got {self.number}/{self.count}")

    @classmethod
    def parse(cls, text: str) -> Part:
        """``K/N``, e.g. ``2/8``.

        >>> Part.parse("2/8")
        Part(number=2, count=8)
        """
        number, _, count = text.partition("/")
        if not (number.strip().isdigit() and count.strip().isdigit()):
            raise ConfigError(f"part must be K/N (e.g. 2/8), got {text!r}")
        return cls(int(number), int(count))

    @classmethod
    def of_processes(cls, processes: Processes) -> Part:
        """One part per rank of a ``torchrun`` job."""
        return cls(processes.rank + 1, processes.world_size)

    @property
    def summary_name(self) -> str:
        return SUMMARY_NAME if self.count == 1 else f"denoise_summary.part-{self.number}-of-{self.count}.csv"


def assign_parts(jobs: Sequence[Job], count: int) -> list[int]:
    """The part (from 1) of each job: largest first (slices, then plan order) to the part with the fewest
    slices so far, the lower part on a tie. Deterministic: a function of the plan alone.

    >>> jobs = [Job(Path(f"s{i}"), Path(f"o{i}"), slices) for i, slices in enumerate([10, 40, 30, 20])]
    >>> assign_parts(jobs, 2)
    [1, 1, 2, 2]
    """
    load = [0] * count
    part_of = [0] * len(jobs)
    for index in sorted(range(len(jobs)), key=lambda i: (-jobs[i].slices, i)):
        part = min(range(count), key=lambda p: (load[p], p))
        load[part] += max(jobs[index].slices, 1)
        part_of[index] = part + 1
    return part_of


@dataclass
class DenoiseSummary:
    """The outcome of every job of a run (of this part's jobs, when sharded), and where the summary CSV is.

    Attributes:
        merged: the merged summary of all parts, once this part completed the set; else ``None``.
        parts_done: parts whose every job has a row (sharded runs).
    """

    outcomes: list[Outcome]
    csv_path: Path
    part: Part = Part()
    merged: Path | None = None
    parts_done: int = 0

    @property
    def ok(self) -> bool:
        """True when no job failed or was refused."""
        return all(o.status not in ("failed", "refused") for o in self.outcomes)

    def render(self) -> str:
        """A few lines for the terminal: counts per status, the CSV, and each failure."""
        counts = Counter(o.status for o in self.outcomes)
        done = [o for o in self.outcomes if o.status == "done"]
        head = (
            f"{len(self.outcomes)} job(s): {counts['done']} done, {counts['skipped']} skipped, "
            f"{counts['refused']} refused, {counts['failed']} failed ({sum(o.slices for o in done)} slice(s) "
            f"denoised in {sum(o.seconds for o in done):.1f} s); summary: {self.csv_path}"
        )
        lines = [head]
        if self.part.count > 1:
            lines.append(f"part {self.part.number}/{self.part.count}; " + (
                f"all parts done: merged summary {self.merged}" if self.merged is not None else
                f"{self.parts_done} of {self.part.count} parts done (the last to finish writes {SUMMARY_NAME})"))
        lines += [f"{o.status}: {o.source}: {o.message}" for o in self.outcomes if o.status in ("refused", "failed")]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Finding the jobs
# --------------------------------------------------------------------------------------------------


def _scan_series(root: Path, include_localizers: bool = False) -> tuple[list[DicomSeries], list[Outcome]]:
    """Every CT image series below ``root`` (headers kept, pixels not read), and the outcomes of
    what cannot be a job: files set aside (skipped, with the reason), damaged files and series
    (failed, naming the file), series of another modality (skipped).

    A folder whose scan fails as a whole (one series mixes slice sizes) and holds no DICOM file
    itself is scanned again subfolder by subfolder, so that one bad series does not hide the others.
    """
    try:
        scan = scan_dicom_tree(root, keep_datasets=True, include_localizers=include_localizers)
    except InputError as exc:
        if root.is_dir():
            subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            loose = any(is_dicom(p) for p in root.iterdir() if p.is_file())
            if subfolders and not loose:
                found: list[DicomSeries] = []
                failed: list[Outcome] = []
                for sub in subfolders:
                    series, failures = _scan_series(sub, include_localizers)
                    found += series
                    failed += failures
                return found, failed
        return [], [Outcome(root, None, message=str(exc))]
    outcomes = [Outcome(item.path, None, status="skipped", message=item.reason) for item in scan.set_aside]
    attached = {d.path for s in scan.series for d in s.damaged}
    outcomes += [Outcome(item.path, None, message=f"damaged: {item.reason}") for item in scan.damaged
                 if item.path not in attached]
    series = []
    for s in scan.series:
        if s.damaged:
            outcomes.append(Outcome(s.folder, None, series_uid=s.series_uid, message=(
                f"damaged file {s.damaged[0]}" + (f" (and {len(s.damaged) - 1} more)" if len(s.damaged) > 1 else "")
                + "; the series is not denoised without it")))
        elif s.modality != "CT":
            outcomes.append(Outcome(s.folder, None, status="skipped", series_uid=s.series_uid,
                                    message=f"modality {s.modality or '(none)'}, not CT"))
        else:
            series.append(s)
    return series, outcomes


def _nifti_job(path: Path, output: Path) -> Job:
    try:
        shape = nib.load(path).shape  # type: ignore[attr-defined]  # a SpatialImage
    except Exception:  # unreadable: read_nifti reports why when the job runs
        shape = ()
    return Job(path, output, int(shape[2]) if len(shape) >= 3 else 0)


def _discover(path: Path, target: Path, include_localizers: bool) -> tuple[list[Job], list[Outcome]]:
    """Jobs for one input path whose own output is ``target``, and what could not be scanned."""
    if path.is_file() and is_nifti(path):
        return [_nifti_job(path, target)], []
    jobs = []
    if path.is_dir():
        niftis = [p for p in visible_files(path) if is_nifti(p)]
        jobs += [_nifti_job(p, target / p.relative_to(path)) for p in niftis]
    series, failures = _scan_series(path, include_localizers)
    per_folder = Counter(s.folder for s in series)
    for s in series:
        output = target if path.is_file() else target / s.folder.relative_to(path)
        if per_folder[s.folder] > 1:
            output = output / s.series_uid
        jobs.append(Job(path if path.is_file() else s.folder, output, len(s), s))
    if not jobs and not any(f.status == "failed" for f in failures):
        because = f": {failures[0].source}: {failures[0].message}" if failures else ""
        failures.append(Outcome(path, None, message=f"no CT image series or NIfTI file found{because}"))
    return jobs, failures


def _output_name(path: Path) -> str:
    return path.name if path.is_dir() or is_nifti(path) else path.stem


def _manifest_sources(path: Path, split: str | None) -> tuple[Path, list[Path]]:
    """(data root, low-dose series of the split: test pairs' low-dose series, then the noisy pool)."""
    manifest = load_manifest(path)
    selection = manifest.split(split).selection()
    sources = [pair.low_dose for pair in selection.test] + [entry.series for entry in selection.noisy]
    return manifest.root.resolve(), [Path(p).resolve() for p in dict.fromkeys(sources)]


def _is_inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def plan_jobs(inputs: Sequence[Path], out: Path, *, split: str | None = None, include_localizers: bool = False,
              output_format: str = "dicom") -> tuple[list[Job], list[Outcome]]:
    """The jobs for ``inputs`` with their outputs below ``out``, and the outcomes of what cannot be a
    job (skipped: not CT image slices; failed: damaged or unscannable), each naming the file.

    Raises:
        InputError: an input is missing, a manifest is invalid, ``out`` (or an output) lies inside
            an input, or two jobs would write the same output.
        ConfigError: unknown manifest split.
    """
    out = Path(out).expanduser().resolve()
    jobs: list[Job] = []
    failures: list[Outcome] = []
    roots: list[Path] = []
    for given in inputs:
        path = Path(given).expanduser().resolve()
        if not path.exists():
            raise InputError(f"{given}: no such file or folder")
        roots.append(path)
        if path.is_file() and path.suffix.lower() in _MANIFEST_SUFFIXES:
            root, sources = _manifest_sources(path, split)
            roots.append(root)
            for source in sources:
                if not source.exists():
                    failures.append(Outcome(source, None, message=f"listed in {path} but missing"))
                    continue
                relative = source.relative_to(root) if _is_inside(source, root) else Path(source.name)
                found = _discover(source, out / root.name / relative.parent / _output_name(source), include_localizers)
                jobs += found[0]
                failures += found[1]
        else:
            found = _discover(path, out / _output_name(path), include_localizers)
            jobs += found[0]
            failures += found[1]
    if output_format == "nifti":
        jobs = [replace(j, output=j.output.with_name(j.output.name + ".nii.gz")) if j.series else j for j in jobs]
    for root in roots:
        if _is_inside(out, root):
            raise InputError(f"--out {out} is inside the input {root}; inputs are never written to, choose another folder")
        inside = [j for j in jobs if _is_inside(j.output, root)]
        if inside:
            raise InputError(f"the output {inside[0].output} would land inside the input {root}; choose another --out")
    twice = [o for o, n in Counter(j.output for j in jobs).items() if n > 1]
    if twice:
        clashing = [str(j.source) for j in jobs if j.output == twice[0]]
        raise InputError(f"{' and '.join(clashing)} would both be written to {twice[0]}; pass them in separate runs")
    return jobs, failures


# --------------------------------------------------------------------------------------------------
# Running one job
# --------------------------------------------------------------------------------------------------


def _read_chunks(series: DicomSeries, size: int, assume_identity_rescale: bool) -> Iterator[CTVolume]:
    """Decode ``series`` ``size`` slices at a time with the series reader, in slice order; a series
    of multi-frame files in one piece (each file is decoded whole anyway)."""
    if any(frame is not None for frame in series.frames):
        size = len(series)
    for start in range(0, len(series), size):
        part = slice(start, start + size)
        yield read_dicom_series(replace(series, paths=series.paths[part], positions_mm=series.positions_mm[part],
                                        frames=series.frames[part], datasets=None),
                                assume_identity_rescale=assume_identity_rescale)


def _denoise_checked(denoiser: Denoiser, volume: CTVolume, batch_size: int, check: SelfCheck,
                     on_slices: Callable[[int], None]) -> np.ndarray:
    """Denoise ``volume.hu`` in place and add every slice to the self-check; returns the denoised HU."""
    noisy = volume.hu.copy()
    hu = denoise_volume(denoiser, volume.hu, batch_size=batch_size, keep=volume.padding_mask, out=volume.hu,
                        on_batch=on_slices)
    spacing = (volume.spacing_xyz[1], volume.spacing_xyz[0])
    for z in range(len(hu)):
        check.add(noisy[z], hu[z], spacing, None if volume.padding_mask is None else ~volume.padding_mask[z])
    return hu


def _denoise_dicom(job: Job, folder: Path, denoiser: Denoiser, derivation: Derivation, batch_size: int,
                   check: SelfCheck, on_slices: Callable[[int], None]) -> tuple[int, Clipping]:
    """Denoise a series into ``folder``; returns (slices written, clipping)."""
    assert job.series is not None
    writer = DerivedSeriesWriter(folder, derivation, job.series.series_uid)
    for chunk in _read_chunks(job.series, max(batch_size, READ_CHUNK_SLICES), job.identity_rescale):
        writer.write(chunk.datasets, _denoise_checked(denoiser, chunk, batch_size, check, on_slices), chunk.frames)
    writer.finish()
    return writer.slices, writer.clipping


def _denoise_nifti(job: Job, path: Path, denoiser: Denoiser, batch_size: int, check: SelfCheck,
                   on_slices: Callable[[int], None]) -> tuple[int, Clipping]:
    """Denoise a NIfTI volume or a DICOM series (whole) into the NIfTI file ``path``; returns (slices, clipping)."""
    if job.series is None:
        volume = read_nifti(job.source)
    else:
        volume = read_dicom_series(job.series, assume_identity_rescale=job.identity_rescale)
    hu = _denoise_checked(denoiser, volume, batch_size, check, on_slices)
    return len(hu), write_volume_nifti(path, hu, volume)


class SelfCheckRefusal(N2GError):
    """The model fails the self-check on a series: nothing is written for it (unless forced)."""


def _check_complete(job: Job, derivation: Derivation) -> None:
    """Raise unless the existing output of a DICOM job is this series made with this model/version
    (a NIfTI output carries no provenance to check)."""
    if job.series is None or is_nifti(job.output):
        return
    expected = derivation.uid("series", job.series.series_uid)
    first = min(job.output.glob("*.dcm"), default=None)
    found = pydicom.dcmread(first, stop_before_pixels=True).get("SeriesInstanceUID") if first else None
    if found != expected:
        raise InputError(
            f"{job.output} exists but was not made from this series with this model, precision and n2g-ct "
            "version; pass --overwrite to replace it"
        )


def _run_job(job: Job, denoiser: Denoiser, derivation: Derivation, batch_size: int, overwrite: bool,
             on_slices: Callable[[int], None], force: bool = False) -> Outcome:
    series_uid = job.series.series_uid if job.series else ""
    outcome = Outcome(job.source, job.output, slices=job.slices, series_uid=series_uid)
    start = time.perf_counter()
    try:
        if job.output.exists() and not overwrite:
            _check_complete(job, derivation)
            outcome.status, outcome.message = "skipped", "output exists (complete); --overwrite redoes it"
            return outcome
        check = SelfCheck()
        with staged_output(job.output) as staging:
            if job.series is not None and not is_nifti(job.output):
                slices, clipping = _denoise_dicom(job, staging, denoiser, derivation, batch_size, check, on_slices)
            else:
                slices, clipping = _denoise_nifti(job, staging, denoiser, batch_size, check, on_slices)
            outcome.check = check.result()
            _judge(job, outcome.check, force)
        outcome.status, outcome.slices, outcome.clipping = "done", slices, clipping
        if not outcome.check.passed:
            outcome.message = "written with --force although the self-check failed: " + "; ".join(outcome.check.failures)
        log.info("%s → %s: %d slice(s) in %.1f s; self-check: %s", job.source, job.output, slices,
                 time.perf_counter() - start, outcome.check.describe())
    except SelfCheckRefusal as exc:
        outcome.status, outcome.message = "refused", str(exc)
        log.error("%s: %s", job.source, exc)
    except N2GError as exc:
        outcome.message = str(exc)
        log.error("%s: %s", job.source, exc)
    except OSError as exc:  # disk full, permissions: the file system's message names the path
        outcome.message = f"{exc.filename or job.output}: {exc.strerror or exc}"
        log.error("%s: %s", job.source, outcome.message)
    except Exception as exc:  # a batch run reports the job and goes on with the others
        outcome.message = f"{type(exc).__name__}: {exc}"
        log.exception("%s: unexpected error", job.source)
    finally:
        outcome.seconds = time.perf_counter() - start
    return outcome


def _judge(job: Job, check: SelfCheckResult, force: bool) -> None:
    """Raise SelfCheckRefusal when the self-check failed on this series and ``force`` is off."""
    if check.passed:
        return
    if force:
        log.warning("%s: the self-check failed (%s); written anyway (--force)", job.source, "; ".join(check.failures))
        return
    raise SelfCheckRefusal(f"refused, the model fails the self-check on this series: {'; '.join(check.failures)} "
                           "(nothing written; --force writes it anyway)")


def _preflight(jobs: list[Job], derivation: Derivation, outcomes: list[Outcome]) -> list[Job]:
    """The jobs whose every slice has a usable rescale and whose derived headers can be built; the
    others become failed ``outcomes`` now, before any model time is spent."""
    ready = []
    for job in jobs:
        if job.series is not None and job.series.datasets:
            try:
                for ds, frame, path in zip(job.series.datasets, job.series.frames, job.series.paths):
                    frame_rescale(ds, frame, path, job.identity_rescale)
                if is_nifti(job.output) and job.series.grid_problem:
                    raise InputError(f"a NIfTI file needs a regular slice grid, but the series has "
                                     f"{job.series.grid_problem}; write DICOM (--format dicom) instead")
                if not is_nifti(job.output):
                    DerivedSeriesWriter(job.output, derivation, job.series.series_uid).check(
                        job.series.datasets[0], job.series.frames[0])
            except (N2GError, ValueError, AttributeError, TypeError) as exc:
                outcomes.append(Outcome(job.source, job.output, series_uid=job.series.series_uid, message=str(exc)))
                continue
            job = replace(job, series=replace(job.series, datasets=None))  # the headers are read again per chunk
        ready.append(job)
    return ready


def _write_summary(path: Path, outcomes: Sequence[Outcome]) -> None:
    _write_rows(path, [o.row() for o in outcomes])


def _write_rows(path: Path, rows: Sequence[dict[str, str]]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SUMMARY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


def _merge_parts(out: Path, jobs: Sequence[Job], part_of: Sequence[int], discovered: Sequence[Outcome],
                 count: int) -> tuple[int, Path | None]:
    """Write the merged summary once every part's CSV has a row for each of its jobs.

    Returns:
        (parts done, the merged summary or None while parts are missing).
    """
    rows: dict[str, dict[str, str]] = {}
    done = 0
    for number in range(1, count + 1):
        expected = {str(job.output) for job, part in zip(jobs, part_of) if part == number}
        path = out / Part(number, count).summary_name
        found = {}
        if path.is_file():
            with open(path, newline="") as f:
                found = {row["output"]: row for row in csv.DictReader(f) if row.get("output") in expected}
        done += len(found) == len(expected)
        rows.update(found)
    if done < count:
        return done, None
    _write_rows(out / SUMMARY_NAME, [o.row() for o in discovered] + [rows[str(job.output)] for job in jobs])
    return done, out / SUMMARY_NAME


def denoise_inputs(
    inputs: Sequence[Path],
    out: Path,
    model: str | Path | None,
    *,
    split: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    precision: str = "auto",
    overwrite: bool = False,
    force: bool = False,
    progress: bool = True,
    include_localizers: bool = False,
    assume_identity_rescale: bool = False,
    output_format: str = "dicom",
    part: Part = Part(),
    processes: Processes = Processes(),
) -> DenoiseSummary:
    """Denoise every series / volume found in ``inputs`` into ``out`` (layout: module docstring).

    Args:
        inputs: series folders, folder trees, DICOM files, NIfTI files or manifest YAML files.
        out: output folder (created); must not lie inside an input.
        model: a named model (:data:`n2g_ct.models.NAMED_MODELS`) or a checkpoint written by
            ``n2g-ct train`` or ``n2g-ct export``; None: the starter model.
        split: manifest split whose low-dose series are denoised (default: the manifest's default).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: slices per forward pass (default: :data:`n2g_ct.inference.denoiser.DEFAULT_BATCH_SIZE`).
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (:mod:`n2g_ct.inference.precision`); it is
            recorded in each derived series' DerivationDescription.
        overwrite: redo jobs whose output exists.
        force: write a series even when the model fails the self-check on it (the row says so).
        progress: a progress bar over all slices of all jobs, with the current series, on stderr.
        include_localizers: denoise localizers/scouts too (default: skipped, with a note).
        assume_identity_rescale: read CT images without RescaleSlope/Intercept as stored value = HU
            (default: such a series fails, naming the file).
        output_format: ``dicom`` (derived series) or ``nifti`` (``.nii.gz``) for DICOM input; a
            series that is not a regular slice grid fails when NIfTI is asked for.
        part: this process's share of a sharded run (module docstring); default: all jobs.
        processes: this process's place under ``torchrun`` (its GPU is that of its local rank).

    Returns:
        The outcome per job; ``ok`` is False when any failed or was refused. The CSV is written after each job.

    Raises:
        InputError / ConfigError: unreadable checkpoint, missing input, unsafe ``out``,
            bad batch size; nothing is written then.
    """
    if model is None or str(model) == "starter":
        log.warning("using the starter model (trained on simulated quarter-dose chest CT; "
                    "train on your own scanner's data for real use)")
    model = resolve_model(model)
    if output_format not in ("dicom", "nifti"):
        raise ConfigError(f"output format must be dicom or nifti, got {output_format!r}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch size must be ≥ 1, got {batch_size}")
    jobs, outcomes = plan_jobs(inputs, out, split=split, include_localizers=include_localizers,
                               output_format=output_format)
    jobs = [replace(job, identity_rescale=assume_identity_rescale) for job in jobs]
    out = Path(out).expanduser().resolve()
    for stale in remove_stale(out):
        log.info("removed %s, left by an interrupted run", stale)
    planned, discovered, part_of = jobs, outcomes, [1] * len(jobs)
    if part.count > 1:
        part_of = assign_parts(planned, part.count)
        jobs = [job for job, number in zip(planned, part_of) if number == part.number]
        outcomes = list(discovered) if part.number == 1 else []
        (out / SUMMARY_NAME).unlink(missing_ok=True)  # the merged summary appears when every part is done
        log.info("part %d/%d: %d of %d job(s), %d of %d slice(s)", part.number, part.count, len(jobs), len(planned),
                 sum(j.slices for j in jobs), sum(j.slices for j in planned))
    summary = DenoiseSummary(outcomes, out / part.summary_name, part)
    _write_summary(summary.csv_path, summary.outcomes)  # fails now, not after the model ran, if OUT is not writable
    checkpoint = read_checkpoint(model)
    denoiser = denoiser_from_checkpoint(checkpoint, device=device, precision=precision, processes=processes)
    derivation = Derivation(denoiser.method, checkpoint.sha256, denoiser.precision)
    del checkpoint
    batch_size = batch_size or DEFAULT_BATCH_SIZE[denoiser.device.type]
    jobs = _preflight(jobs, derivation, summary.outcomes)
    log.info("%d job(s) on %s, batch size %d, %s (%s); model %s (sha256 %s)", len(jobs), denoiser.device, batch_size,
             denoiser.precision, denoiser.note, model, derivation.checkpoint_sha256[:12])
    _write_summary(summary.csv_path, summary.outcomes)
    with logging_redirect_tqdm(), tqdm(total=sum(job.slices for job in jobs), unit="slice", desc="denoise",
                                       disable=not progress, dynamic_ncols=True) as bar:
        for number, job in enumerate(jobs, 1):
            bar.set_postfix_str(f"series {number}/{len(jobs)}: {job.output.name}")
            before = bar.n
            summary.outcomes.append(_run_job(job, denoiser, derivation, batch_size, overwrite, bar.update, force))
            _write_summary(summary.csv_path, summary.outcomes)
            bar.update(before + job.slices - bar.n)  # a skipped or failed series counts as done
    if part.count > 1:
        summary.parts_done, summary.merged = _merge_parts(out, planned, part_of, discovered, part.count)
    return summary
