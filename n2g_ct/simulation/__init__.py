"""Simulated data: low-dose CT in the projection domain, the phantom, synthetic noise models."""
