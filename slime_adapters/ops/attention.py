"""Multi-head attention with probed backends: xformers, PyTorch SDPA and plain math.

Layout legend (the xformers layout, used by every backend)::

    q: (b, m, h, k)    b batch, m query tokens, h heads, k head width
    k: (b, n, h, k)    n key tokens
    v: (b, n, h, kv)   kv value head width (may differ from k)
    out: (b, m, h, kv)

Packed variable-length input: with ``seqlens`` (and optionally ``kv_seqlens``), ``b`` must be 1 and
the ``m`` (``n``) tokens are several sequences laid end to end; each sequence attends only to
itself. No backend loops over the sequences in Python.

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

import contextlib
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

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

logger = logging.getLogger(__name__)

ENV_VAR = "SLIME_ADAPTERS_ATTN"
BACKENDS = ("xformers", "sdpa", "math")

SeqLens = Sequence[int] | Tensor | None


class AttentionInputError(ValueError):
    """The tensors given to :func:`attention` do not describe a valid attention problem."""


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the given input; the message lists why."""


# --------------------------------------------------------------------------------------------
# Input validation and packed-sequence helpers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    """A validated attention call: shapes are checked, packed lengths normalised."""

    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    q_lens: Tensor | None  # (s,) int64 on q.device, packed sequence lengths of the queries
    kv_lens: Tensor | None  # (s,) int64, packed sequence lengths of the keys
    key_padding_mask: Tensor | None  # (b, n) bool, True = padding (ignored)

    @property
    def packed(self) -> bool:
        return self.q_lens is not None


def _as_lengths(lens: SeqLens, name: str, total: int, device: torch.device) -> Tensor:
    if isinstance(lens, Tensor):
        if lens.dim() != 1 or lens.dtype.is_floating_point or lens.dtype == torch.bool:
            raise AttentionInputError(
                f"{name} must be a 1-D integer tensor or a sequence of ints, got a "
                f"{lens.dim()}-D {lens.dtype} tensor"
            )
        t = lens.to(device=device, dtype=torch.int64)
        # Packed attention reads the lengths on the host anyway (the longest sequence, or the
        # block-diagonal mask), so checking them here costs no extra synchronisation in kind.
        if t.numel() and int(t.min()) < 0:
            raise AttentionInputError(f"{name} must be non-negative, got {t.tolist()}")
        if int(t.sum()) != total:
            raise AttentionInputError(
                f"{name} sums to {int(t.sum())} but the packed dimension has {total} tokens"
            )
    else:
        vals = list(lens)  # type: ignore[arg-type]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in vals):
            raise AttentionInputError(f"{name} must hold ints, got {vals!r}")
        if any(x < 0 for x in vals):
            raise AttentionInputError(f"{name} must be non-negative, got {vals!r}")
        if sum(vals) != total:
            raise AttentionInputError(
                f"{name} sums to {sum(vals)} but the packed dimension has {total} tokens"
            )
        t = torch.tensor(vals, dtype=torch.int64, device=device)
    if t.numel() == 0:
        raise AttentionInputError(f"{name} is empty: a packed input needs at least one sequence")
    return t


def _validate(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seqlens: SeqLens,
    kv_seqlens: SeqLens,
    key_padding_mask: Tensor | None,
    scale: float | None,
) -> _Problem:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise AttentionInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise AttentionInputError(
                f"{name} must have rank 4 with layout (batch, tokens, heads, head_dim), "
                f"got shape {tuple(t.shape)}"
            )
        if not t.dtype.is_floating_point:
            raise AttentionInputError(f"{name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionInputError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise AttentionInputError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise AttentionInputError(
            f"batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.shape[2] == k.shape[2] == v.shape[2]):
        raise AttentionInputError(
            f"head counts differ: q has {q.shape[2]}, k has {k.shape[2]}, v has {v.shape[2]} "
            "(layout is (batch, tokens, heads, head_dim))"
        )
    if q.shape[3] != k.shape[3]:
        raise AttentionInputError(
            f"q and k head widths differ: {q.shape[3]} vs {k.shape[3]}"
        )
    if k.shape[1] != v.shape[1]:
        raise AttentionInputError(f"k and v token counts differ: {k.shape[1]} vs {v.shape[1]}")
    if k.shape[1] == 0 and q.shape[1] > 0:
        raise AttentionInputError("k and v have no tokens but q has some: nothing to attend to")

    q_lens = kv_lens = None
    if seqlens is None and kv_seqlens is not None:
        raise AttentionInputError("kv_seqlens given without seqlens")
    if seqlens is not None:
        if q.shape[0] != 1:
            raise AttentionInputError(
                f"packed input (seqlens given) needs batch size 1, got {q.shape[0]}"
            )
        if key_padding_mask is not None:
            raise AttentionInputError(
                "seqlens and key_padding_mask are exclusive: packed sequences have no padding"
            )
        q_lens = _as_lengths(seqlens, "seqlens", q.shape[1], q.device)
        kv_lens = (
            q_lens
            if kv_seqlens is None
            else _as_lengths(kv_seqlens, "kv_seqlens", k.shape[1], q.device)
        )
        if kv_seqlens is None and k.shape[1] != q.shape[1]:
            raise AttentionInputError(
                f"seqlens without kv_seqlens needs as many keys as queries, got {q.shape[1]} "
                f"queries and {k.shape[1]} keys; pass kv_seqlens"
            )
        if kv_lens.numel() != q_lens.numel():
            raise AttentionInputError(
                f"seqlens has {q_lens.numel()} sequences but kv_seqlens has {kv_lens.numel()}"
            )
        if not isinstance(seqlens, Tensor) and not isinstance(kv_seqlens, Tensor):
            kv_list = list(seqlens if kv_seqlens is None else kv_seqlens)
            empty = [i for i, (a, b) in enumerate(zip(list(seqlens), kv_list)) if a > 0 and b == 0]
            if empty:
                raise AttentionInputError(
                    f"packed sequences {empty} have queries but no keys: nothing to attend to"
                )
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise AttentionInputError(
                f"key_padding_mask must be bool (True = padding), got {key_padding_mask.dtype}"
            )
        if tuple(key_padding_mask.shape) != (k.shape[0], k.shape[1]):
            raise AttentionInputError(
                f"key_padding_mask must have shape (batch, keys) = {(k.shape[0], k.shape[1])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        key_padding_mask = key_padding_mask.to(q.device)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _Problem(q, k, v, float(scale), q_lens, kv_lens, key_padding_mask)


def _segment_ids(lens: Tensor, total: int) -> Tensor:
    """(total,) sequence index of every packed token, computed without a Python loop."""
    return torch.repeat_interleave(
        torch.arange(lens.numel(), device=lens.device), lens, output_size=total
    )


def _packed_index(lens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """For every packed token: (its sequence, its position inside the sequence)."""
    seg = _segment_ids(lens, total)
    starts = torch.cumsum(lens, 0) - lens
    pos = torch.arange(total, device=lens.device) - starts[seg]
    return seg, pos


def _pad(x: Tensor, seg: Tensor, pos: Tensor, num: int, length: int) -> Tensor:
    """(1, total, h, d) packed → (num, length, h, d) padded with zeros, one sequence a row."""
    out = x.new_zeros(num, length, *x.shape[2:])
    return out.index_put((seg, pos), x[0])


def _dense_from_packed(p: _Problem) -> tuple[_Problem, Tensor, Tensor]:
    """Lay packed sequences out as a padded batch with a key padding mask.

    Costs O(sequences × longest²) scores rather than the (m × n) of one block-diagonal mask, and
    other sequences' tokens are not even present in a row, so nothing they hold can leak. Reads
    the longest length on the host (a device sync when the lengths live on a GPU)."""
    num = p.q_lens.numel()
    q_len = int(p.q_lens.max())
    kv_len = max(int(p.kv_lens.max()), 1)
    seg_q, pos_q = _packed_index(p.q_lens, p.q.shape[1])
    seg_k, pos_k = _packed_index(p.kv_lens, p.k.shape[1])
    pad = torch.ones(num, kv_len, dtype=torch.bool, device=p.q.device)
    pad = pad.index_put((seg_k, pos_k), torch.zeros((), dtype=torch.bool, device=p.q.device))
    dense = _Problem(
        _pad(p.q, seg_q, pos_q, num, q_len),
        _pad(p.k, seg_k, pos_k, num, kv_len),
        _pad(p.v, seg_k, pos_k, num, kv_len),
        p.scale,
        None,
        None,
        pad,
    )
    return dense, seg_q, pos_q


def _allowed_mask(p: _Problem) -> Tensor | None:
    """Boolean mask broadcastable to (b, h, m, n); True where a query may attend to a key."""
    if p.key_padding_mask is not None:
        return (~p.key_padding_mask)[:, None, None, :]  # (b, 1, 1, n)
    return None


def _via_padding(impl):
    """Run a dense-only implementation on packed input through the padded layout."""

    def run(p: _Problem) -> Tensor:
        if not p.packed:
            return impl(p)
        dense, seg_q, pos_q = _dense_from_packed(p)
        return impl(dense)[seg_q, pos_q][None]  # (1, m, h, kv)

    run.__name__ = impl.__name__
    return run


def _sanitise_padding(p: _Problem) -> tuple[Tensor, Tensor]:
    """Zero padded keys and values, so that NaN or inf stored in padding cannot leak: a masked
    score still multiplies its value (0 · NaN = NaN) and a NaN key poisons the score before the
    mask is applied."""
    if p.key_padding_mask is None:
        return p.k, p.v
    pad = p.key_padding_mask[:, :, None, None]
    return p.k.masked_fill(pad, 0), p.v.masked_fill(pad, 0)


def _zero_rows_without_keys(p: _Problem, out: Tensor) -> Tensor:
    """Queries that can see no key at all (every key padded) get zeros, not NaN."""
    if p.key_padding_mask is None:
        return out
    has_key = (~p.key_padding_mask).any(dim=1)[:, None, None, None]
    return torch.where(has_key, out, out.new_zeros(()))


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def _math(p: _Problem) -> Tensor:
    k, v = _sanitise_padding(p)
    # Both products and the softmax in at least float32, as the fused kernels accumulate: scores
    # or weights rounded to half precision lose about 1e-2 against the exact result.
    acc = torch.promote_types(p.q.dtype, torch.float32)
    scores = torch.einsum("bmhk,bnhk->bhmn", p.q.to(acc), k.to(acc)) * p.scale
    allowed = _allowed_mask(p)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhmn,bnhk->bmhk", weights, v.to(acc)).to(v.dtype)
    return _zero_rows_without_keys(p, out)


def _sdpa(p: _Problem) -> Tensor:
    k, v = _sanitise_padding(p)
    allowed = _allowed_mask(p)
    out = F.scaled_dot_product_attention(
        p.q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed, scale=p.scale
    ).transpose(1, 2)  # (b, m, h, kv)
    return _zero_rows_without_keys(p, out)


def _xformers(p: _Problem) -> Tensor:
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    bias = None
    if p.packed:
        # BlockDiagonalMask takes Python lists; this is the one host read of the lengths.
        bias = BlockDiagonalMask.from_seqlens(
            q_seqlen=p.q_lens.tolist(), kv_seqlen=p.kv_lens.tolist()
        )
    return xops.memory_efficient_attention(p.q, p.k, p.v, attn_bias=bias, scale=p.scale)


def _xformers_static_reasons(p: _Problem) -> list[str]:
    reasons = []
    if p.q.device.type != "cuda":
        reasons.append(f"xformers has no operator for device {p.q.device.type!r} (CUDA only)")
    if p.q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"xformers does not support dtype {p.q.dtype}")
    if p.key_padding_mask is not None:
        reasons.append("key_padding_mask is not implemented on the xformers path; use sdpa")
    if p.v.shape[-1] != p.q.shape[-1]:
        reasons.append("xformers needs equal query and value head widths")
    return reasons


def _sdpa_static_reasons(p: _Problem) -> list[str]:
    return []


def _math_static_reasons(p: _Problem) -> list[str]:
    return []


_IMPLS = {"xformers": _xformers, "sdpa": _via_padding(_sdpa), "math": _via_padding(_math)}
_STATIC_REASONS = {
    "xformers": _xformers_static_reasons,
    "sdpa": _sdpa_static_reasons,
    "math": _math_static_reasons,
}


# --------------------------------------------------------------------------------------------
# Probing
# --------------------------------------------------------------------------------------------


def _probe_one(name: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Run a tiny real call (dense and packed) and compare it with the math backend.

    Runs without autograd and with autocast off, so the caller's context cannot change the
    verdict that is cached for the whole process. Meta tensors carry no values: sdpa and math are
    taken as usable there without a probe."""
    if device.type == "meta":
        return _STATIC_REASONS[name](_validate(*(torch.empty(1, 1, 1, 1, device=device, dtype=dtype)
                                                 for _ in "qkv"), None, None, None, None))
    autocast_off = (torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda")
                    else contextlib.nullcontext())
    try:
        with torch.no_grad(), autocast_off:
            return _probe_calls(name, device, dtype)
    except Exception as exc:  # a failed probe is a reason, whatever raised it
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return [f"probe call failed: {type(exc).__name__}: {first}"]


def _probe_calls(name: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (1, 12, 2, 16)
    q, k, v = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in "qkv")
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    for lens in (None, [5, 7]):
        p = _validate(q, k, v, lens, None, None, None)
        static = _STATIC_REASONS[name](p)
        if static:
            return static
        out = _IMPLS[name](p)
        ref = _IMPLS["math"](p)
        if out.shape != ref.shape:
            return [f"probe returned shape {tuple(out.shape)}, expected {tuple(ref.shape)}"]
        err = (out.float() - ref.float()).abs().max().item()
        if not err <= tol:  # also catches NaN
            what = "packed" if lens else "dense"
            return [f"probe ({what}) disagrees with math: max abs error {err:.3g} > {tol}"]
    return []


@dataclass
class ProbeCache:
    """Results of backend probes, keyed by (device, dtype, backend): an empty list means usable.

    One instance is shared by default (:func:`default_probe_cache`); pass your own to
    :func:`attention` to isolate callers, or call :meth:`clear` after changing the environment
    (installing xformers, say)."""

    results: dict[tuple[str, torch.dtype, str], list[str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reasons(self, name: str, device: torch.device, dtype: torch.dtype) -> list[str]:
        key = (str(device), dtype, name)
        with self._lock:
            cached = self.results.get(key)
        if cached is None:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise BackendUnavailableError(
                    f"attention backend {name!r} has not been probed on {device}/{dtype} and "
                    "cannot be during CUDA graph capture; run one call before capturing"
                )
            cached = _probe_one(name, device, dtype)
            with self._lock:
                self.results[key] = cached
            if cached:
                logger.info("attention backend %r unusable on %s/%s: %s", name, device, dtype,
                            "; ".join(cached))
        return list(cached)

    def clear(self) -> None:
        with self._lock:
            self.results.clear()


_DEFAULT_CACHE = ProbeCache()


def default_probe_cache() -> ProbeCache:
    """The process-wide probe cache used when no ``probe_cache`` is passed."""
    return _DEFAULT_CACHE


def _preference(p: _Problem) -> tuple[str, ...]:
    if p.q.device.type == "cuda":
        return ("xformers", "sdpa", "math") if p.packed else ("sdpa", "xformers", "math")
    return ("sdpa", "math", "xformers")


def _reasons(name: str, p: _Problem, cache: ProbeCache) -> list[str]:
    static = _STATIC_REASONS[name](p)
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


def _choose(p: _Problem, backend: str, cache: ProbeCache) -> str:
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


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    seqlens: SeqLens = None,
    kv_seqlens: SeqLens = None,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    probe_cache: ProbeCache | None = None,
) -> Tensor:
    """Scaled dot-product attention, softmax(q·kᵀ·scale)·v, on the chosen backend.

    Args:
        q: ``(b, m, h, k)`` queries.
        k: ``(b, n, h, k)`` keys.
        v: ``(b, n, h, kv)`` values.
        seqlens: packed query sequence lengths (``b`` must be 1, they sum to ``m``); each packed
            sequence attends only to the keys of the same index.
        kv_seqlens: packed key lengths (sum to ``n``); defaults to ``seqlens``.
        key_padding_mask: ``(b, n)`` bool, True marks a padded key that no query may see. Values
            stored there (NaN included) never reach the output; a query with no valid key gets 0.
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
    p = _validate(q, k, v, seqlens, kv_seqlens, key_padding_mask, scale)
    name = _choose(p, backend, probe_cache or _DEFAULT_CACHE)
    return _IMPLS[name](p)


def select_backend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    seqlens: SeqLens = None,
    kv_seqlens: SeqLens = None,
    key_padding_mask: Tensor | None = None,
    backend: str = "auto",
    probe_cache: ProbeCache | None = None,
) -> str:
    """The backend :func:`attention` would use for these arguments (same checks, no compute)."""
    p = _validate(q, k, v, seqlens, kv_seqlens, key_padding_mask, None)
    return _choose(p, backend, probe_cache or _DEFAULT_CACHE)


def backend_reasons(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    seqlens: SeqLens = None,
    kv_seqlens: SeqLens = None,
    key_padding_mask: Tensor | None = None,
    probe_cache: ProbeCache | None = None,
) -> dict[str, list[str]]:
    """For every backend, why it cannot run this input (an empty list: it can)."""
    p = _validate(q, k, v, seqlens, kv_seqlens, key_padding_mask, None)
    cache = probe_cache or _DEFAULT_CACHE
    return {name: _reasons(name, p, cache) for name in BACKENDS}
