"""Benchmarks and experiments; each runnable as ``python -m benchmarks.<name>``."""
