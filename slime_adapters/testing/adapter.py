"""Float64 loop oracle of the visual adapter (:class:`slime_adapters.adapter.SliMEVisualAdapter`): one image at a time: slow, obvious and dtype-agnostic.

Tests and benchmarks compare the fast module against it in float64; users who port the component
can hold their version to the same bar. Loops over samples, tiles, heads and tokens are the point:
each formula reads on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["adapter_reference"]


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
            raster = raster.reshape(rows * cols * side * side, local.shape[-1])
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
