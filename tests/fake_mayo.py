"""A small fake 2016 NIH-AAPM-Mayo tree of tiny DICOM series, in either on-disk layout."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

from factories import phantom_hu, write_ct_series

MAYO_PATIENTS = ("L067", "L096", "L109", "L143", "L192", "L286", "L291", "L310", "L333", "L506")
DOSES = (("quarter", "QD"), ("full", "FD"))
SLICE_MM = {"1mm": 1.0, "3mm": 3.0}


def mayo_series_folder(layout: str, patient: str, dose: str, resolution: str) -> Path:
    """Series folder relative to the root: ``L067/full_1mm`` (by_patient) or ``FD_1mm/L067/full_1mm`` (by_dose)."""
    leaf = Path(patient) / f"{dose}_{resolution}"
    if layout == "by_patient":
        return leaf
    if layout == "by_dose":
        return Path(f"{dict(DOSES)[dose]}_{resolution}") / leaf
    raise ValueError(f"unknown layout {layout!r}")


def build_fake_mayo(
    root: Path,
    layout: str = "by_patient",
    *,
    patients: Sequence[str] = MAYO_PATIENTS,
    slices: dict[str, int] | None = None,
    size: int = 8,
    extra_quarter_slice: Collection[str] = (),
) -> Path:
    """Write a Mayo-like tree under ``root`` and return ``root``.

    Each patient gets quarter- and full-dose series per resolution (default 6 slices at 1 mm and
    2 at 3 mm, ``size``×``size`` pixels) on the same slice grid, at a patient-specific height.
    File names follow the challenge's (``L067_QD_1_1.CT.0001.0006....IMA``) with numbers counting
    down the z axis, as the scanner's instance order does. Patients in ``extra_quarter_slice`` get
    one more quarter-dose 1 mm slice, 1 mm below the others, which has no full-dose partner.
    The DICOM headers carry a fake patient name and ID that must never appear in any output.
    """
    slices = slices or {"1mm": 6, "3mm": 2}
    for p_index, patient in enumerate(patients):
        for resolution, n in slices.items():
            dz = SLICE_MM[resolution]
            for dose, code in DOSES:
                extra = int(dose == "quarter" and resolution == "1mm" and patient in extra_quarter_slice)
                names = [f"{patient}_{code}_{resolution[0]}_1.CT.0001.{n + extra - k:04d}.2015.12.22.IMA"
                         for k in range(n + extra)]
                write_ct_series(
                    root / mayo_series_folder(layout, patient, dose, resolution),
                    phantom_hu((n + extra, size, size), seed=p_index),
                    spacing_xyz=(0.7, 0.7, dz),
                    origin_xyz=(-2.8, -2.8, -100.0 - 20.0 * p_index - extra * dz),
                    file_names=names,
                    series_description=f"{dose} dose {resolution}",
                )
    return root
