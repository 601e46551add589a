"""Inference: a trained denoiser on HU slices, and batch denoising of series and volumes."""
