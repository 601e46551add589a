"""n2g-ct: Noise2Grad denoising of low-dose CT trained without paired scans.

Python API (:mod:`n2g_ct.api`)::

    import n2g_ct
    model = n2g_ct.load_model("starter")                    # a named model or a checkpoint path
    model.denoise("scans/patient1/").save("out/patient1")   # derived DICOM series ("....nii.gz": NIfTI)

``model.denoise(hu_array)`` returns the denoised array; ``n2g_ct.read_volume(path)`` reads CT.
The API loads torch and pydicom on first use, so ``import n2g_ct`` (and ``n2g-ct --help``) stay fast.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["NAMED_MODELS", "__version__", "load_model", "read_volume"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from n2g_ct.api import load_model

        return load_model
    if name == "NAMED_MODELS":
        from n2g_ct.models import NAMED_MODELS

        return NAMED_MODELS
    if name == "read_volume":
        from n2g_ct.io import read_volume

        return read_volume
    raise AttributeError(f"module 'n2g_ct' has no attribute {name!r}")
