"""Simulated data: low-dose CT in the projection domain (projector, simulator, series in and out) and the phantom."""
