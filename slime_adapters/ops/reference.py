"""Plain, loop-based oracles for every component: slow, obvious and dtype-agnostic.

Tests and benchmarks compare the fast modules against these in float64. Nothing here is meant to
be fast: loops over samples, sequences and tokens are the point, since they make each formula
readable on its own.
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
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """softmax(q·kᵀ·scale)·v per batch element, per packed sequence and per head, in q's dtype.

    Layout ``(b, m, h, k)`` as :func:`slime_adapters.ops.attention.attention`. Padded keys
    (``key_padding_mask`` True) are dropped before the product, so whatever they hold cannot
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
        keep = slice(None) if key_padding_mask is None else ~key_padding_mask[i]
        ki, vi = k[i][keep], v[i][keep]  # (n', h, d)
        if ki.shape[0] == 0:
            continue
        for j in range(h):
            scores = (q[i, :, j] @ ki[:, j].T) * scale  # (m, n')
            out[i, :, j] = torch.softmax(scores, dim=-1) @ vi[:, j]
    return out


# ---- slicing oracles ----
__all__ += ["slice_image_reference"]


def slice_image_reference(
    rgb,
    plan,
    *,
    global_view: str,
    fill: tuple[int, int, int],
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[Tensor, Tensor]:
    """The slicer's rendering, the slow obvious way, in float64: ``(global_view, tiles)``.

    ``rgb`` is an RGB PIL image (already decoded and oriented), ``plan`` its
    :class:`~slime_adapters.slicing.SlicePlan`. Builds the canvas with PIL (new + paste), crops
    each tile with ``Image.crop`` in a row-major loop, and normalises every pixel
    ``(x/255 − mean)/std`` in float64. Global view ``"pad"``: the image resized so its longer side
    is the tile size (rounded half up), centred on a fill square; ``"resize"``: stretched.
    Returns ``(3, t, t)`` and ``(p, 3, t, t)`` float64 tensors.
    """
    import numpy as np
    from PIL import Image

    t = plan.tile_size
    bicubic = Image.Resampling.BICUBIC

    def normalise(image) -> Tensor:
        pixels = np.asarray(image, dtype=np.float64) / 255.0  # (t, t, 3)
        out = torch.empty(3, t, t, dtype=torch.float64)
        for ch in range(3):
            out[ch] = torch.from_numpy((pixels[:, :, ch] - mean[ch]) / std[ch])
        return out

    canvas = Image.new("RGB", plan.canvas_size, fill)
    canvas.paste(rgb.resize(plan.resized_size, bicubic), plan.offset)
    cols, rows = plan.grid
    tiles = []
    for r in range(rows):
        for c in range(cols):
            tiles.append(normalise(canvas.crop((c * t, r * t, (c + 1) * t, (r + 1) * t))))

    if global_view == "resize":
        view = rgb.resize((t, t), bicubic)
    else:
        w, h = rgb.size
        longer = max(w, h)
        size = (max(1, round(w * t / longer + 1e-9)), max(1, round(h * t / longer + 1e-9)))
        view = Image.new("RGB", (t, t), fill)
        view.paste(rgb.resize(size, bicubic), ((t - size[0]) // 2, (t - size[1]) // 2))
    return normalise(view), torch.stack(tiles)
