"""Check n2g-ct's series reader against SimpleITK on a real series: equality and load time.

    python -m n2g_ct.research.benchmarks.io_load --data ../shared/data/ct/chest-popi/dicom

Prints whether the HU volume and geometry equal ``sitk.ImageSeriesReader``'s exactly, also on a
copy whose InstanceNumbers are shuffled, and the load-time ratio (median of ``--repeats`` runs,
the two readers interleaved in one process).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from n2g_ct.io import read_volume
from n2g_ct.research.benchmarks import median_seconds


def _sitk_read(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _equal_to_sitk(folder: Path) -> bool:
    volume, image = read_volume(folder), _sitk_read(folder)
    return (
        np.array_equal(volume.hu, sitk.GetArrayFromImage(image).astype(np.float32))
        and np.allclose(volume.spacing_xyz, image.GetSpacing(), atol=1e-6)
        and np.allclose(volume.origin_xyz, image.GetOrigin(), atol=1e-6)
        and np.allclose(volume.direction.ravel(), image.GetDirection(), atol=1e-9)
    )


def _shuffled_copy(folder: Path, target: Path, seed: int) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    numbers = np.random.default_rng(seed).permutation(len(files)) + 1
    for path, number in zip(files, numbers):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = int(number)
        ds.save_as(target / path.name)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/ct/chest-popi/dicom"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"equal to SimpleITK: {_equal_to_sitk(args.data)}")
    with tempfile.TemporaryDirectory() as tmp:
        _shuffled_copy(args.data, Path(tmp), seed=0)
        print(f"equal to SimpleITK with shuffled InstanceNumbers: {_equal_to_sitk(Path(tmp))}")
    read_volume(args.data), _sitk_read(args.data)  # warm the page cache for both
    ours, theirs = [], []
    for _ in range(3):
        ours.append(median_seconds(lambda: read_volume(args.data), args.repeats))
        theirs.append(median_seconds(lambda: _sitk_read(args.data), args.repeats))
    n2g, ref = statistics.median(ours), statistics.median(theirs)
    print(f"load time (median of {args.repeats}, 3 interleaved rounds): n2g-ct {n2g:.3f} s, "
          f"SimpleITK {ref:.3f} s, ratio n2g-ct/SimpleITK {n2g / ref:.2f}")


if __name__ == "__main__":
    main()
