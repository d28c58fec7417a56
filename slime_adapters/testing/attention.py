"""Float64 loop oracle of the attention op (:func:`slime_adapters.ops.attention.attention`): slow, obvious and dtype-agnostic.

Tests and benchmarks compare the fast module against it in float64; users who port the component
can hold their version to the same bar. Loops over samples, tiles, heads and tokens are the point:
each formula reads on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["attention_reference"]


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    seqlens: Sequence[int] | None = None,
    kv_seqlens: Sequence[int] | None = None,
    key_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """softmax(q·kᵀ·scale)·v per batch element, per packed sequence and per head, in q's dtype.

    Layout ``(b, m, h, k)`` as :func:`slime_adapters.ops.attention.attention`. Padded keys
    (``key_mask`` False; True = a valid key) are dropped before the product, so whatever they hold cannot
    reach the output; a query with no key left gets zeros.
    """
    b, m, h, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    out = q.new_zeros(b, m, h, v.shape[-1])
    if seqlens is not None:
        kv_seqlens = list(seqlens) if kv_seqlens is None else list(kv_seqlens)
        q0 = k0 = 0
        for lq, lk in zip(list(seqlens), kv_seqlens):
            if lq and lk:
                out[0, q0:q0 + lq] = attention_reference(
                    q[:, q0:q0 + lq], k[:, k0:k0 + lk], v[:, k0:k0 + lk], scale=scale
                )[0]
            q0, k0 = q0 + lq, k0 + lk
        return out
    for i in range(b):
        keep = slice(None) if key_mask is None else key_mask[i]
        ki, vi = k[i][keep], v[i][keep]  # (n', h, d)
        if ki.shape[0] == 0:
            continue
        for j in range(h):
            scores = (q[i, :, j] @ ki[:, j].T) * scale  # (m, n')
            out[i, :, j] = torch.softmax(scores, dim=-1) @ vi[:, j]
    return out
