"""Image quality on HU slices: metrics against a reference, CT measures, reference-free self-checks."""
