"""Paired evaluation against references, BM3D, and the reports."""
