"""Multi-head attention with probed backends: xformers, PyTorch SDPA and plain math.

Layout legend (the xformers layout, used by every backend)::

    q: (b, m, h, k)    b batch, m query tokens, h heads, k head width
    k: (b, n, h, k)    n key tokens
    v: (b, n, h, kv)   kv value head width (may differ from k)
    out: (b, m, h, kv)

Packed variable-length input: with ``seqlens`` (and optionally ``kv_seqlens``), ``b`` must be 1 and
the ``m`` (``n``) tokens are several sequences laid end to end; each sequence attends only to
itself. No backend loops over the sequences in Python.

The packed path is a documented utility, not a hot path: no module of the library calls it. Every
attention the components run has one size per batch (a tile's tokens, a view's tokens, the fixed
query counts), so a dense batch without padding is the cheapest layout; packing the compressor's
12 tiles of 144 queries × 576 keys measured 161 ms against 45 ms for the dense batch (CPU, SDPA,
8 heads of 64, 2 threads). It serves callers whose sequences differ in length (its results match
the float64 oracle, ``tests/test_attention.py``); on CUDA it runs xformers' block-diagonal kernel,
elsewhere the padded layout with a key mask.

Backend selection. ``backend="auto"`` chooses among the backends that a one-time *probe* showed to
work for the input's device and dtype (a tiny real call compared against the math backend; cached
per device and dtype in an explicit, inspectable :class:`ProbeCache`), then among those the first
in the device's preference order that has no reason to refuse this particular input:

* CUDA, dense input: ``sdpa`` first. Measured on an H200 (SPEC §2.7): SDPA ran dense 144×576 and
  576×576 attention about 2× faster than xformers.
* CUDA, packed input: ``xformers`` first: its block-diagonal mask skips the off-diagonal blocks,
  where SDPA needs a dense (m × n) boolean mask.
* CPU: ``sdpa`` (xformers has no CPU operator; the math backend is the last resort everywhere).

``SLIME_ADAPTERS_ATTN=xformers|sdpa|math`` overrides ``"auto"``. An explicit backend that cannot run
an input raises :class:`BackendUnavailableError` listing every reason.
"""

from __future__ import annotations

import os

from torch import Tensor

from slime_adapters.config import refuse_removed_keywords
from slime_adapters.ops.backends import (
    BACKENDS,
    IMPLS,
    STATIC_REASONS,
    BackendUnavailableError,
    ProbeCache,
    default_probe_cache,
)
from slime_adapters.ops.inputs import AttentionInputError, Problem, SeqLens, validate

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "AttentionInputError",
    "BackendUnavailableError",
    "ProbeCache",
    "attention",
    "backend_reasons",
    "default_probe_cache",
    "select_backend",
]

ENV_VAR = "SLIME_ADAPTERS_ATTN"


def _preference(p: Problem) -> tuple[str, ...]:
    if p.q.device.type == "cuda":
        return ("xformers", "sdpa", "math") if p.packed else ("sdpa", "xformers", "math")
    return ("sdpa", "math", "xformers")


def _reasons(name: str, p: Problem, cache: ProbeCache) -> list[str]:
    static = STATIC_REASONS[name](p)
    if static:
        return static
    return cache.reasons(name, p.q.device, p.q.dtype)


def _requested(backend: str) -> str:
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(
                f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not a backend; "
                f"expected one of {', '.join(BACKENDS)} or auto"
            )
    elif backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected auto or one of {BACKENDS}")
    return backend


def _choose(p: Problem, backend: str, cache: ProbeCache) -> str:
    backend = _requested(backend)
    if backend != "auto":
        reasons = _reasons(backend, p, cache)
        if reasons:
            raise BackendUnavailableError(
                f"attention backend {backend!r} cannot run this input "
                f"(q {tuple(p.q.shape)} {p.q.dtype} on {p.q.device}): " + "; ".join(reasons)
            )
        return backend
    refused = {}
    for name in _preference(p):
        reasons = _reasons(name, p, cache)
        if not reasons:
            return name
        refused[name] = reasons
    raise BackendUnavailableError(  # unreachable unless math itself fails on this device/dtype
        "no attention backend can run this input: "
        + "; ".join(f"{n}: {', '.join(r)}" for n, r in refused.items())
    )


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    seqlens: SeqLens = None,
    kv_seqlens: SeqLens = None,
    key_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    probe_cache: ProbeCache | None = None,
    **removed: object,
) -> Tensor:
    """Scaled dot-product attention, softmax(q·kᵀ·scale)·v, on the chosen backend.

    Args:
        q: ``(b, m, h, k)`` queries.
        k: ``(b, n, h, k)`` keys.
        v: ``(b, n, h, kv)`` values.
        seqlens: packed query sequence lengths (``b`` must be 1, they sum to ``m``); each packed
            sequence attends only to the keys of the same index.
        kv_seqlens: packed key lengths (sum to ``n``); defaults to ``seqlens``.
        key_mask: ``(b, n)`` bool, **True = a valid key** (transformers' ``attention_mask``
            convention), False = padding that no query may see. Values stored at padding (NaN
            included) never reach the output; a query with no valid key gets 0. The former
            ``key_padding_mask`` (True = padding) raises :class:`TypeError` naming ``key_mask``.
        scale: score scale, ``head_dim ** -0.5`` by default.
        backend: ``"auto"`` (probed, see the module docstring), ``"xformers"``, ``"sdpa"`` or
            ``"math"``.
        probe_cache: where probe results live; :func:`default_probe_cache` by default.

    Returns:
        ``(b, m, h, kv)`` attention output in the input dtype.

    Raises:
        AttentionInputError: shapes, dtypes, devices or lengths do not fit together.
        BackendUnavailableError: an explicit backend cannot run this input (the reasons listed).
        ValueError: unknown backend name, in the argument or in ``SLIME_ADAPTERS_ATTN``.
    """
    refuse_removed_keywords("attention", removed)
    p = validate(q, k, v, seqlens, kv_seqlens, key_mask, scale)
    name = _choose(p, backend, probe_cache or default_probe_cache())
    return IMPLS[name](p)


def select_backend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    seqlens: SeqLens = None,
    kv_seqlens: SeqLens = None,
    key_mask: Tensor | None = None,
    backend: str = "auto",
    probe_cache: ProbeCache | None = None,
    **removed: object,
) -> str:
    """The backend :func:`attention` would use for these arguments (same checks, no compute)."""
    refuse_removed_keywords("select_backend", removed)
    p = validate(q, k, v, seqlens, kv_seqlens, key_mask, None)
    return _choose(p, backend, probe_cache or default_probe_cache())


def backend_reasons(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    seqlens: SeqLens = None,
    kv_seqlens: SeqLens = None,
    key_mask: Tensor | None = None,
    probe_cache: ProbeCache | None = None,
    **removed: object,
) -> dict[str, list[str]]:
    """For every backend, why it cannot run this input (an empty list: it can)."""
    refuse_removed_keywords("backend_reasons", removed)
    p = validate(q, k, v, seqlens, kv_seqlens, key_mask, None)
    cache = probe_cache or default_probe_cache()
    return {name: _reasons(name, p, cache) for name in BACKENDS}
