"""Series in, series out: ``n2g-ct simulate`` on a routine-dose DICOM series (:mod:`n2g_ct.simulation.low_dose`)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from n2g_ct.errors import InputError
from n2g_ct.io.dicom_writer import Derivation
from n2g_ct.simulation.low_dose import DEFAULT_ELECTRONIC_NOISE, SimulationResult, simulate_low_dose
from n2g_ct.simulation.projector import ScanGeometry

log = logging.getLogger(__name__)



def simulate_series(
    source: Path,
    out: Path,
    dose: float,
    *,
    geometry: ScanGeometry = ScanGeometry(),
    i0: float | None = None,
    electronic_noise: float = DEFAULT_ELECTRONIC_NOISE,
    seed: int = 0,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
) -> tuple[SimulationResult, Path]:
    """Read a routine-dose series, simulate ``dose``, write it as a derived series (DICOM) or NIfTI file.

    A DICOM series becomes a derived series in the folder ``out`` (as :mod:`n2g_ct.io.dicom_writer` writes it: new UIDs,
    ``DERIVED\\SECONDARY\\AXIAL``, a DerivationDescription naming the simulation and its
    parameters); a NIfTI file becomes ``out/<its name>`` with its header. The output is written
    to a hidden sibling and renamed into place when complete.

    Args:
        source: DICOM series folder or file, or NIfTI file.
        out: output folder; must not exist (or be empty) and must not lie inside ``source``.
        dose, geometry, i0, electronic_noise, seed: see :func:`simulate_low_dose`.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: slices per batch (default 4 on CPU, 16 on CUDA).
        progress: a progress bar over the slices (after the I0 calibration, which logs each step).

    Returns:
        The simulation and the path written (the series folder or the NIfTI file).

    Raises:
        InputError: unreadable source, or ``out`` not usable.
        ConfigError: a parameter is out of range.
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from n2g_ct.atomic import check_writable, staged_output
    from n2g_ct.devices import Processes, select_device
    from n2g_ct.io import read_volume
    from n2g_ct.io.dicom_writer import write_derived_series
    from n2g_ct.io.nifti import is_nifti, write_nifti

    source, out = Path(source), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"output {out} exists and is not an empty folder")
    if source.is_dir() and out.resolve().is_relative_to(source.resolve()):
        raise InputError(f"output {out} lies inside the input {source}")
    check_writable(out.resolve().parent)
    volume = read_volume(source)
    torch_device = select_device(device, Processes())
    batch_size = batch_size or (16 if torch_device.type == "cuda" else 4)
    spacing_yx = (volume.spacing_xyz[1], volume.spacing_xyz[0])
    log.info("simulating dose %g of %s (%d slices, %s) on %s", dose, source, len(volume.hu), geometry.describe(), torch_device)
    with logging_redirect_tqdm(), tqdm(total=len(volume.hu), unit="slice", desc=f"simulate dose {dose:g}",
                                       disable=not progress, dynamic_ncols=True) as bar:
        result = simulate_low_dose(
            volume.hu, spacing_yx, dose, geometry=geometry, i0=i0, electronic_noise=electronic_noise, seed=seed,
            padding_mask=volume.padding_mask, device=torch_device, batch_size=batch_size, on_slices=bar.update,
        )
    with staged_output(out) as staging:
        if source.is_file() and is_nifti(source):
            staging.mkdir()
            written = out / source.name
            clipping = write_nifti(staging / source.name, result.hu, volume)
            log.info("NIfTI data type's range: %d voxel(s) clipped below it, %d above it", clipping.below, clipping.above)
        else:
            written = out
            write_derived_series(volume, result.hu, staging, SimulationDerivation.of(result))
    return result, written


@dataclass(frozen=True)
class SimulationDerivation(Derivation):
    """Provenance of a simulated series: the DerivationDescription names the simulation and its parameters."""

    parameters: str = ""

    @classmethod
    def of(cls, result: SimulationResult) -> SimulationDerivation:
        """The derivation of a simulation; its UIDs follow from the parameters (seed included)."""
        parameters = result.describe()
        digest = hashlib.sha256(parameters.encode()).hexdigest()
        return cls(method=f"sim dose {result.dose:g}", checkpoint_sha256=digest, parameters=parameters)

    @property
    def description(self) -> str:
        """DerivationDescription text (ST)."""
        return f"Simulated lower dose by {self.software}: {self.parameters}"
