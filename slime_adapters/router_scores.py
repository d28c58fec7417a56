"""Cosine scores of image tokens against a question, pooled over its tokens (paper §2.2).

The router (:mod:`slime_adapters.router`) selects tokens by these scores; the adapter scores its
packed local tokens with :func:`cosine_scores_to`. Legend: ``b`` images, ``n`` image tokens,
``l`` text tokens, ``d`` the shared width, ``t`` tokens held packed.

``s_i = v̂_i · pool_j(ê_j)`` with ``x̂ = x / max(‖x‖, 1e-8)`` and ``pool`` the mean (``"mean"``) or
the sum (``"sum"``) over the valid text tokens: exactly the mean (sum) of the n×l cosine matrix,
computed with (b, n) and (b, d) intermediates only. Masks are True = valid. No gradient flows
back (routing decisions are not differentiable).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NORM_EPS", "cosine_scores_to", "pooled_cosine_scores", "pooled_text_direction"]

NORM_EPS = 1e-8


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def pooled_cosine_scores(
    image_tokens: Tensor, text_embeds: Tensor, *, text_mask: Tensor | None = None,
    text_pool: str = "mean",
) -> Tensor:
    """Mean (or sum) over valid text tokens of cos(v_i, e_j), as v̂_i · pool(ê_j).

    ``image_tokens`` (b, n, d), ``text_embeds`` (b, l, d), ``text_mask`` (b, l) bool True = valid.
    Returns (b, n) in float32 (float64 for float64 input). Masked text tokens never contribute,
    whatever they hold (NaN included); a question with no valid token scores 0 everywhere. No
    gradient flows back (routing decisions are not differentiable). Inputs are not validated here.
    """
    cd = _compute_dtype(image_tokens.dtype, text_embeds.dtype)
    pooled = pooled_text_direction(text_embeds, text_mask=text_mask, text_pool=text_pool,
                                   dtype=cd)
    v = image_tokens.detach().to(cd)
    dots = torch.einsum("bnd,bd->bn", v, pooled)
    return dots / torch.linalg.vector_norm(v, dim=-1).clamp_min(NORM_EPS)


def pooled_text_direction(text_embeds: Tensor, *, text_mask: Tensor | None = None,
                          text_pool: str = "mean", dtype: torch.dtype | None = None) -> Tensor:
    """``pool(ê_j)``: the mean (or sum) over valid text tokens of the unit text embeddings,
    ``(b, d)`` in ``dtype`` (default: float32, float64 for float64 input), detached. The pooled
    cosine score of a token ``v`` is ``v̂ · pool(ê_j)``. Inputs are not validated here."""
    cd = _compute_dtype(text_embeds.dtype) if dtype is None else dtype
    e = text_embeds.detach().to(cd)
    e = e / torch.linalg.vector_norm(e, dim=-1, keepdim=True).clamp_min(NORM_EPS)
    if text_mask is not None:
        e = torch.where(text_mask.unsqueeze(-1), e, 0.0)
    pooled = e.sum(dim=1)  # (b, d)
    if text_pool == "mean":
        count = e.new_full((e.shape[0],), e.shape[1]) if text_mask is None else text_mask.sum(1)
        pooled = pooled / count.to(cd).clamp_min(1.0).unsqueeze(-1)
    return pooled


def cosine_scores_to(tokens: Tensor, directions: Tensor, owner: Tensor) -> Tensor:
    """``v̂_t · directions[owner[t]]`` for tokens ``(t, d)`` that belong to different samples:
    :func:`pooled_cosine_scores` for tokens held packed instead of ``(b, n, d)``.

    ``directions`` (b, d) from :func:`pooled_text_direction`, ``owner`` (t,) long sample index.
    Returns ``(t,)`` in ``directions``' dtype, detached. Inputs are not validated here."""
    v = tokens.detach().to(directions.dtype)
    dots = (v @ directions.T).gather(1, owner[:, None]).squeeze(1)  # (t, b) → (t,): b is small
    return dots / torch.linalg.vector_norm(v, dim=-1).clamp_min(NORM_EPS)
