"""Benchmarks: `pumpwatch bench <name>` prints figures; the README records them."""
