"""Datasets: slice selections, manifests and dataset definitions, the volume cache, training crops and
transforms, natural images with synthetic noise models."""
