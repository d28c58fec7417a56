"""Float64 loop oracle of the slicer's rendering (:class:`slime_adapters.slicing.AdaptiveSlicer`): slow, obvious and dtype-agnostic.

Tests and benchmarks compare the fast module against it in float64; users who port the component
can hold their version to the same bar. Loops over samples, tiles, heads and tokens are the point:
each formula reads on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["slice_image_reference"]


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
