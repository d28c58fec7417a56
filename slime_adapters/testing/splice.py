"""Float64 loop oracle of the splice (:func:`slime_adapters.splice.splice_into_embeddings`): slow, obvious and dtype-agnostic.

Tests and benchmarks compare the fast module against it in float64; users who port the component
can hold their version to the same bar. Loops over samples, tiles, heads and tokens are the point:
each formula reads on its own.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["splice_reference"]


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
                padded = attention_mask is not None and int(attention_mask[r, c]) == 0
                lab.append(ignore_index if labels is None or padded else int(labels[r, c]))
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
