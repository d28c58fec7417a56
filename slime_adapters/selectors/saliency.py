"""Encoder attention for :class:`~slime_adapters.selectors.SaliencySelector`, and the merged
contextual tokens of VisionZip, which a keep mask cannot express.

How the attention reaches the selector: the vision encoder returns its attention maps
(transformers' ``output_attentions=True``); :func:`cls_attention` takes the [CLS] row of one layer
(VisionZip and PruMerge use the penultimate), averaged over heads: ``(p, s)`` per tile. The
adapter's local tokens are the compressor's ``q`` queries per tile on a ``√q × √q`` grid over the
tile's ``√s × √s`` patches, so :func:`pool_saliency` averages the patch attention over the cells
of that grid, ``(p, q)``; ``SliMEVisualAdapter.forward(tile_saliency=...)`` takes either form and
lays it on the image rasters like the router's scores.

:func:`contextual_tokens`: VisionZip's contextual tokens from a selection's dropped tokens. Per
image, the dropped valid tokens in raster order are numbered ``j = 0 … D − 1``; with
``step = max(1, D // m)`` the targets are the tokens with ``j % step == 0`` and ``j // step < m``;
every other dropped token joins the target of highest cosine similarity (ties: the first target);
a contextual token is the mean of its target and the tokens that joined it. Returns them padded,
``(b, m, d)`` with a mask, to append after the kept tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from slime_adapters.router import PaddedTokens, RouterInputError, RouterOutput
from slime_adapters.router_scores import NORM_EPS

__all__ = ["cls_attention", "contextual_tokens", "pool_saliency"]


def cls_attention(attentions: Tensor | tuple[Tensor, ...], *, layer: int = -2) -> Tensor:
    """``(p, s)`` attention of the [CLS] token (position 0) to the ``s`` patches, averaged over
    heads, from ``attentions`` (one ``(p, h, 1 + s, 1 + s)`` map, or the per-layer tuple of
    transformers' ``output_attentions=True``, of which ``layer`` is taken)."""
    if isinstance(attentions, tuple | list):
        if not attentions:
            raise RouterInputError("attentions: the tuple of per-layer maps is empty")
        attentions = attentions[layer]
    if not isinstance(attentions, Tensor) or attentions.dim() != 4 or (
            attentions.shape[-1] != attentions.shape[-2]) or attentions.shape[-1] < 2:
        shape = tuple(attentions.shape) if isinstance(attentions, Tensor) else type(attentions)
        raise RouterInputError(f"attentions must be (p, heads, 1 + s, 1 + s) with a [CLS] "
                               f"token first, got {shape}")
    return attentions[:, :, 0, 1:].mean(dim=1)


def pool_saliency(saliency: Tensor, tokens_side: int) -> Tensor:
    """Average ``(p, s)`` patch saliency over a ``tokens_side × tokens_side`` grid of cells
    (``adaptive_avg_pool2d`` on the ``√s × √s`` patch grid): ``(p, tokens_side²)``. A saliency
    already of that size is returned as is."""
    if not isinstance(saliency, Tensor) or saliency.dim() != 2 or (
            not saliency.dtype.is_floating_point):
        raise RouterInputError("tile saliency must be a floating-point (tiles, s) tensor")
    p, s = saliency.shape
    if s == tokens_side * tokens_side:
        return saliency
    side = int(round(s ** 0.5))
    if side * side != s or side < tokens_side:
        raise RouterInputError(
            f"tile saliency has {s} values per tile: neither the {tokens_side ** 2} local tokens "
            f"nor a square patch grid of at least {tokens_side}x{tokens_side}")
    grid = saliency.reshape(p, 1, side, side)
    return F.adaptive_avg_pool2d(grid, tokens_side).reshape(p, tokens_side * tokens_side)


def contextual_tokens(image_tokens: Tensor, routed: RouterOutput, num_contextual: int, *,
                      image_mask: Tensor | None = None) -> PaddedTokens:
    """VisionZip's ``num_contextual`` merged tokens per image from the tokens ``routed`` dropped
    (see the module docstring): ``PaddedTokens(tokens (b, m, d), mask (b, m))``, in the input
    dtype, without a loop over images. Raises :class:`RouterInputError` on bad shapes or ``m``."""
    if isinstance(num_contextual, bool) or not isinstance(num_contextual, int) or (
            num_contextual < 1):
        raise RouterInputError(f"num_contextual must be an int >= 1, got {num_contextual!r}")
    if not isinstance(image_tokens, Tensor) or image_tokens.dim() != 3 or (
            tuple(image_tokens.shape[:2]) != tuple(routed.keep_mask.shape)):
        raise RouterInputError(f"image_tokens must be (b, n, d) with (b, n) = "
                               f"{tuple(routed.keep_mask.shape)}")
    b, n, d = image_tokens.shape
    m = num_contextual
    valid = routed.keep_mask.new_ones(b, n) if image_mask is None else image_mask
    dropped = valid & ~routed.keep_mask
    j = torch.cumsum(dropped, 1) - dropped.long()  # rank among the dropped tokens
    num = dropped.sum(1, keepdim=True)
    step = (num // m).clamp(min=1)
    target = dropped & (j % step == 0) & (j // step < m)
    slot = torch.where(target, j // step, 0)  # (b, n) contextual index of each target
    x = torch.where(dropped[..., None], image_tokens, 0.0)
    unit = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    unit = unit / torch.linalg.vector_norm(unit, dim=-1, keepdim=True).clamp_min(NORM_EPS)
    # (b, m, d) unit target vectors, then every dropped token's best target
    tgt = unit.new_zeros(b, m, d).scatter_add(1, slot[..., None].expand(b, n, d),
                                              torch.where(target[..., None], unit, 0.0))
    has = torch.zeros(b, m, dtype=torch.long, device=x.device).scatter_add(
        1, slot, target.long()) > 0
    sim = torch.einsum("bnd,bmd->bnm", unit, tgt)
    sim = torch.where(has[:, None, :], sim, -torch.inf)
    join = torch.where(target, slot, sim.argmax(dim=2))
    join = torch.where(dropped, join, 0)
    total = x.new_zeros(b, m, d).scatter_add(1, join[..., None].expand(b, n, d), x)
    count = torch.zeros(b, m, dtype=torch.long, device=x.device).scatter_add(
        1, join, dropped.long())
    tokens = total / count.clamp(min=1)[..., None].to(x.dtype)
    return PaddedTokens(tokens, has)
