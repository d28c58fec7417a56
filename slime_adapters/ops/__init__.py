"""Kernels shared by the modules: attention with probed backends, and the plain-math oracles."""

from slime_adapters.ops.attention import (
    BACKENDS,
    AttentionInputError,
    BackendUnavailableError,
    ProbeCache,
    attention,
    backend_reasons,
    select_backend,
)

__all__ = [
    "BACKENDS",
    "AttentionInputError",
    "BackendUnavailableError",
    "ProbeCache",
    "attention",
    "backend_reasons",
    "select_backend",
]
