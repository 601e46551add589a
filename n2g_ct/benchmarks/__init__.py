"""Measurement scripts on real data (``python -m n2g_ct.benchmarks.<name> --help``); not part of the tests."""
