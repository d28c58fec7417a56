"""Attention backends (xformers, PyTorch SDPA, plain math) and the probes that vet them.

Internal to :mod:`slime_adapters.ops`: :func:`slime_adapters.ops.attention.attention` picks a
backend; :class:`ProbeCache` holds, per device and dtype, why a backend cannot run (an empty list:
it can), found by a tiny real call compared against the math backend.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from slime_adapters.ops.inputs import (
    Problem,
    allowed_mask,
    sanitise_padding,
    validate,
    via_padding,
    zero_rows_without_keys,
)

__all__ = [
    "BACKENDS",
    "IMPLS",
    "STATIC_REASONS",
    "BackendUnavailableError",
    "ProbeCache",
    "default_probe_cache",
]

logger = logging.getLogger("slime_adapters.ops.attention")

BACKENDS = ("xformers", "sdpa", "math")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the given input; the message lists why."""


def _math(p: Problem) -> Tensor:
    k, v = sanitise_padding(p)
    # Both products and the softmax in at least float32, as the fused kernels accumulate: scores
    # or weights rounded to half precision lose about 1e-2 against the exact result.
    acc = torch.promote_types(p.q.dtype, torch.float32)
    scores = torch.einsum("bmhk,bnhk->bhmn", p.q.to(acc), k.to(acc)) * p.scale
    allowed = allowed_mask(p)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhmn,bnhk->bmhk", weights, v.to(acc)).to(v.dtype)
    return zero_rows_without_keys(p, out)


def _sdpa(p: Problem) -> Tensor:
    k, v = sanitise_padding(p)
    allowed = allowed_mask(p)
    out = F.scaled_dot_product_attention(
        p.q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed, scale=p.scale
    ).transpose(1, 2)  # (b, m, h, kv)
    return zero_rows_without_keys(p, out)


def _xformers(p: Problem) -> Tensor:
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    bias = None
    if p.packed:
        # BlockDiagonalMask takes Python lists; this is the one host read of the lengths.
        bias = BlockDiagonalMask.from_seqlens(
            q_seqlen=p.q_lens.tolist(), kv_seqlen=p.kv_lens.tolist()
        )
    return xops.memory_efficient_attention(p.q, p.k, p.v, attn_bias=bias, scale=p.scale)


def _xformers_static_reasons(p: Problem) -> list[str]:
    reasons = []
    if p.q.device.type != "cuda":
        reasons.append(f"xformers has no operator for device {p.q.device.type!r} (CUDA only)")
    if p.q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"xformers does not support dtype {p.q.dtype}")
    if p.key_mask is not None:
        reasons.append("key_mask is not implemented on the xformers path; use sdpa")
    if p.v.shape[-1] != p.q.shape[-1]:
        reasons.append("xformers needs equal query and value head widths")
    return reasons


def _sdpa_static_reasons(p: Problem) -> list[str]:
    return []


def _math_static_reasons(p: Problem) -> list[str]:
    return []


IMPLS = {"xformers": _xformers, "sdpa": via_padding(_sdpa), "math": via_padding(_math)}
STATIC_REASONS = {
    "xformers": _xformers_static_reasons,
    "sdpa": _sdpa_static_reasons,
    "math": _math_static_reasons,
}


def _probe_one(name: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Run a tiny real call (dense and packed) and compare it with the math backend.

    Runs without autograd and with autocast off, so the caller's context cannot change the
    verdict that is cached for the whole process. Meta tensors carry no values: sdpa and math are
    taken as usable there without a probe."""
    if device.type == "meta":
        return STATIC_REASONS[name](validate(*(torch.empty(1, 1, 1, 1, device=device, dtype=dtype)
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
        p = validate(q, k, v, lens, None, None, None)
        static = STATIC_REASONS[name](p)
        if static:
            return static
        out = IMPLS[name](p)
        ref = IMPLS["math"](p)
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
