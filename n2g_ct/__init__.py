"""n2g-ct: Noise2Grad denoising of low-dose CT trained without paired scans."""

__version__ = "0.1.0"
