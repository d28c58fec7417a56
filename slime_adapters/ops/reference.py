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


# ---- adapter and splice oracles ----


def splice_reference(
    input_embeds: Tensor,
    input_ids: Tensor,
    image_token_id: int,
    packed: Tensor,
    lengths: Tensor,
    *,
    labels: Tensor | None = None,
    attention_mask: Tensor | None = None,
    ignore_index: int = -100,
    padding_side: str = "right",
    drop_padding: bool = False,
) -> dict[str, Tensor | None]:
    """Per-sample, per-token loop version of ``splice_into_embeddings``."""
    images = list(torch.split(packed, [int(n) for n in lengths]))
    rows_e, rows_m, rows_l = [], [], []
    k = 0
    for r in range(input_ids.shape[0]):
        e, m, lab = [], [], []
        for c in range(input_ids.shape[1]):
            if int(input_ids[r, c]) == image_token_id:
                for tok in images[k]:
                    e.append(tok)
                    m.append(1)
                    lab.append(ignore_index)
                k += 1
            elif drop_padding and int(attention_mask[r, c]) == 0:
                continue
            else:
                e.append(input_embeds[r, c])
                m.append(1 if attention_mask is None else int(attention_mask[r, c]))
                lab.append(ignore_index if labels is None else int(labels[r, c]))
        rows_e.append(e)
        rows_m.append(m)
        rows_l.append(lab)
    width = max(len(e) for e in rows_e)
    d = input_embeds.shape[-1]
    out_e = input_embeds.new_zeros(len(rows_e), width, d)
    out_m = torch.zeros(len(rows_e), width, dtype=torch.long)
    out_l = torch.full((len(rows_e), width), ignore_index, dtype=torch.long)
    for r, (e, m, lab) in enumerate(zip(rows_e, rows_m, rows_l)):
        s = width - len(e) if padding_side == "left" else 0
        for j, (tok, mv, lv) in enumerate(zip(e, m, lab)):
            out_e[r, s + j] = tok
            out_m[r, s + j] = mv
            out_l[r, s + j] = lv
    return {"inputs_embeds": out_e, "attention_mask": out_m,
            "labels": None if labels is None else out_l}


__all__ += ["splice_reference"]


def adapter_reference(
    adapter,
    global_features: Tensor | None,
    tile_features: Tensor | None,
    grids: Sequence[tuple[int, int]],
    *,
    text_embeds: Tensor | None = None,
    text_mask: Tensor | None = None,
    separator_embeds: Tensor | None = None,
    views: str = "both",
    force_expert: int | None = None,
    router_gamma: float | None = None,
) -> list[Tensor]:
    """Per-image version of ``SliMEVisualAdapter.forward``: one image at a time through the
    adapter's own sub-modules, tiles pasted onto the raster one by one. Returns one
    ``(n_i, dl)`` tensor per image."""
    side = adapter.tokens_side
    mlp = adapter.projector.mlp if adapter.local_mlp is None else adapter.local_mlp
    outs, first_tile = [], 0
    for i, (cols, rows) in enumerate(grids):
        parts = []
        if views != "local":
            parts.append(adapter.projector(global_features[i:i + 1],
                                           force_expert=force_expert).tokens[0])
        if views == "both" and adapter.config.separator != "none":
            if adapter.config.separator == "learned":
                parts.append(adapter.separator[None].to(parts[0].dtype))
            else:
                sep = separator_embeds if separator_embeds.dim() == 1 else separator_embeds[i]
                parts.append(sep[None].to(parts[0].dtype))
        if views != "global":
            tiles = tile_features[first_tile:first_tile + cols * rows]
            local = mlp(adapter.compressor(tiles))  # (cols·rows, q, dl)
            raster = local.new_zeros(rows * side, cols * side, local.shape[-1])
            for t in range(cols * rows):
                r, c = divmod(t, cols)
                raster[r * side:(r + 1) * side, c * side:(c + 1) * side] = local[t].reshape(
                    side, side, -1)
            raster = raster.reshape(rows * cols * side * side, -1)
            gamma = adapter.router.config.gamma if router_gamma is None else router_gamma
            if text_embeds is None and gamma >= 1.0:
                keep = torch.ones(raster.shape[0], dtype=torch.bool)
            else:
                routed = adapter.router(
                    raster[None], text_embeds[i:i + 1],
                    text_mask=None if text_mask is None else text_mask[i:i + 1], gamma=router_gamma)
                keep = routed.keep_mask[0]
            parts.append(raster[keep])
            first_tile += cols * rows
        outs.append(torch.cat(parts, dim=0))
    return outs


__all__ += ["adapter_reference"]
