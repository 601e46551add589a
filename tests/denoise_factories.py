"""Test helpers for denoising: tiny checkpoints, DICOM series that pass dciodvfy, validator calls."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
import torch
from factories import write_ct_series

from n2g_ct.models import build_denoiser
from n2g_ct.models.checkpoint import save_checkpoint

WINDOW_HU = (-1024.0, 3072.0)


def tiny_checkpoint(path: Path, *, base_width: int = 4, depth: int = 3, method: str = "noise2grad",
                    window_hu: tuple[float, float] = WINDOW_HU, seed: int = 0) -> Path:
    """A checkpoint as ``n2g-ct train`` writes it, with a tiny untrained U-Net (seeded weights)."""
    torch.manual_seed(seed)
    config = {
        "data": {"window_hu": list(window_hu)},
        "model": {"channels": 1, "base_width": base_width, "depth": depth},
        "method": {"name": method},
    }
    save_checkpoint(path, config=config, denoiser=build_denoiser(1, 1, base_width, depth).state_dict(), step=0,
                    total_steps=None, self_check=None)
    return path


def identity_checkpoint(path: Path, shift_hu: float = 0.0) -> Path:
    """A U-Net checkpoint whose network returns its input plus ``shift_hu`` (0: the identity): one
    channel passed through every layer of the full-resolution path (inputs in [0, 1] survive the
    ReLUs), everything else zero, the shift as the head's bias. Window [-1024, 3072] HU."""
    network = build_denoiser(base_width=4, depth=2)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.zero_()
        first, last = network.encoder[0], network.decoder[-1]
        for conv in (first[0], first[2], last[0], last[2], network.head):
            conv.weight[0, 0, 1, 1] = 1.0
        network.head.bias[0] = shift_hu / (WINDOW_HU[1] - WINDOW_HU[0])
    config = {"data": {"window_hu": list(WINDOW_HU)}, "model": {"channels": 1, "base_width": 4, "depth": 2},
              "method": {"name": "supervised"}}
    save_checkpoint(path, config=config, denoiser=network.state_dict(), step=7, total_steps=None, self_check=None)
    return path


def write_complete_ct_series(folder: Path, hu, **kwargs) -> list[Path]:
    """:func:`factories.write_ct_series` plus the Type 1/2 attributes the CT Image IOD requires,
    so that the source itself passes ``dciodvfy`` without errors."""
    paths = write_ct_series(folder, hu, **kwargs)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "F"
        ds.StudyDate, ds.StudyTime = "20240102", "101010"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "S1"
        ds.AccessionNumber = "ACC-SECRET-7"
        ds.PatientPosition = "HFS"
        ds.BodyPartExamined = "CHEST"
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "ACME"
        ds.KVP = "120"
        ds.AcquisitionNumber = "1"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.add_new("SmallestImagePixelValue", "US", 0)
        ds.add_new("LargestImagePixelValue", "US", 4095)
        ds.SoftwareVersions = "scanner 1.0"
        ds.add_new(0x00091010, "LO", "private vendor data")
        ds.add_new(0x00090010, "LO", "ACME PRIVATE")
        ds.save_as(path)
    return paths


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (.ci/run installs it with apt)")
    return found


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy reports for one file."""
    run = subprocess.run([_tool("dciodvfy"), str(path)], capture_output=True, text=True, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def dcentvfy_report(paths: list[Path]) -> str:
    """What dcentvfy says about a set of files (empty when the entities are consistent)."""
    run = subprocess.run([_tool("dcentvfy"), *map(str, paths)], capture_output=True, text=True, check=False)
    return (run.stdout + run.stderr).strip()


def dcm2niix(folder: Path, out: Path) -> list[Path]:
    """Convert a DICOM folder with dcm2niix; returns the NIfTI files it wrote."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([_tool("dcm2niix"), "-z", "y", "-f", "%s", "-o", str(out), str(folder)],
                   capture_output=True, text=True, check=True)
    return sorted(out.glob("*.nii.gz"))
