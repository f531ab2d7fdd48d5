"""Benchmark harness: our PVTv2 against its peers on the same weights and machine (not part of the library)."""
