"""Kernels shared by the modules: attention with probed backends (the float64 oracles are in
:mod:`slime_adapters.testing`).

``ops.attention`` is the public API; ``ops.inputs`` (validation, packing, masks) and
``ops.backends`` (backends, probes) are its internals.
"""

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
