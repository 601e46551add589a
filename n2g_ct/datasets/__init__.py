"""Datasets: slice selections, manifests, the volume cache, training crops and transforms."""
