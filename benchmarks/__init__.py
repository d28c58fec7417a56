"""Benchmarks: speed, memory and router sparsity of slime-adapters, each runnable as a module."""
