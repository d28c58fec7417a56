"""The interface the fixed-budget selectors share with the router (``CosineTokenRouter``).

``forward(image_tokens (b, n, d), text_embeds (b, l, d) | None, *, image_mask, text_mask, gamma,
raster, saliency) -> RouterOutput``: the router's inputs, plus what some selectors read and the
others ignore:

* ``raster`` ``(b, 2)`` integers ``(rows, cols)``: image ``i``'s tokens lie row-major on a
  ``rows × cols`` raster at positions ``0 … rows·cols − 1`` (the adapter passes its local raster,
  ``(rows·√q, cols·√q)``); read by :class:`~slime_adapters.selectors.SpatialSelector`;
* ``saliency`` ``(b, n)`` floats, how much the vision encoder attends to each token (higher = more
  salient); read by :class:`~slime_adapters.selectors.SaliencySelector`.

``gamma`` is None (the configured budget) or 1.0 (keep every valid token). Masks are True = valid;
masked tokens may hold anything and are never kept. ``scores`` of the output are the selector's
priority (float32, float64 for float64 input; 0 at masked tokens). No Python loop over samples; no
host synchronisation unless a docstring says so.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from slime_adapters.config import ConfigurableMixin
from slime_adapters.router import RouterInputError, RouterOutput
from slime_adapters.selectors.budget import budget_counts, check_gamma_for_budget, keep_top

__all__ = ["FixedBudgetSelector", "compute_dtype", "select_packed"]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    out = torch.float32
    for t in tensors:
        out = torch.promote_types(out, t.dtype)
    return out


def _check_mask(name: str, m, shape: tuple[int, ...]) -> None:
    if m is None:
        return
    if not isinstance(m, Tensor) or m.dtype != torch.bool:
        kind = m.dtype if isinstance(m, Tensor) else type(m).__name__
        raise RouterInputError(f"{name} must be a bool tensor (True = valid), got {kind}")
    if tuple(m.shape) != shape:
        raise RouterInputError(f"{name} must have shape {shape}, got {tuple(m.shape)}")


class FixedBudgetSelector(ConfigurableMixin, nn.Module):
    """Base of the selectors: validation, the budget, the top-``count`` selection. A subclass
    sets ``reads`` (what it reads, for the docs and the adapter) and implements
    :meth:`priority` returning ``(priority (b, n), scores (b, n))``."""

    reads: ClassVar[tuple[str, ...]] = ("image_tokens",)
    question_aware: ClassVar[bool] = False

    def __init__(self, config, *, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.to_dict().items()
                         if k not in ("kind", "slime_adapters_version"))

    # ------------------------------------------------------------------------------ validation
    def _validate(self, image_tokens, text_embeds, image_mask, text_mask) -> None:
        name = type(self).__name__
        tensors = [("image_tokens", image_tokens)]
        if text_embeds is not None or self.question_aware:
            if text_embeds is None:
                raise RouterInputError(f"{name} is question-aware: it needs text_embeds (b, l, d)")
            tensors.append(("text_embeds", text_embeds))
        for label, t in tensors:
            if not isinstance(t, Tensor):
                raise RouterInputError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3:
                raise RouterInputError(f"{label} must have rank 3 (b, tokens, d), got shape "
                                       f"{tuple(t.shape)}")
            if not t.dtype.is_floating_point:
                raise RouterInputError(f"{label} must be floating point, got {t.dtype}")
        b, n, d = image_tokens.shape
        if text_embeds is not None:
            if text_embeds.shape[0] != b or text_embeds.shape[2] != d:
                raise RouterInputError(f"text_embeds must be (b={b}, l, d={d}) to match "
                                       f"image_tokens, got {tuple(text_embeds.shape)}")
            _check_mask("text_mask", text_mask, (b, text_embeds.shape[1]))
        _check_mask("image_mask", image_mask, (b, n))

    # ------------------------------------------------------------------------------- selection
    def counts(self, num_valid: Tensor) -> Tensor:
        """``(b,)`` tokens each image keeps under the configured budget."""
        return budget_counts(num_valid, min_keep=self.config.min_keep, **self.config.budget())

    def priority(self, image_tokens: Tensor, text_embeds: Tensor | None, valid: Tensor,
                 count: Tensor, *, text_mask: Tensor | None, raster: Tensor | None,
                 saliency: Tensor | None, **extra) -> tuple[Tensor, Tensor]:
        """The abstract hook each selector defines: its ranking of the valid tokens under
        ``count``. This base class has no ranking of its own."""
        raise NotImplementedError(f"{type(self).__name__} defines no priority()")

    def forward(
        self,
        image_tokens: Tensor,
        text_embeds: Tensor | None = None,
        *,
        image_mask: Tensor | None = None,
        text_mask: Tensor | None = None,
        gamma: float | None = None,
        raster: Tensor | None = None,
        saliency: Tensor | None = None,
    ) -> RouterOutput:
        """Select tokens of ``image_tokens`` (b, n, d); see the module docstring for the inputs.

        Returns :class:`~slime_adapters.router.RouterOutput`. Raises
        :class:`~slime_adapters.router.RouterInputError` on a bad shape, rank or dtype, a missing
        input the selector reads, or a ``gamma`` other than None or 1.0.
        """
        return self._select(image_tokens, text_embeds, image_mask=image_mask, text_mask=text_mask,
                            gamma=gamma, raster=raster, saliency=saliency)

    def _select(self, image_tokens, text_embeds, *, image_mask, text_mask, gamma, raster,
                saliency, **extra) -> RouterOutput:
        self._validate(image_tokens, text_embeds, image_mask, text_mask)
        keep_all = check_gamma_for_budget(type(self).__name__, gamma)
        b, n, _ = image_tokens.shape
        valid = (torch.ones(b, n, dtype=torch.bool, device=image_tokens.device)
                 if image_mask is None else image_mask)
        valid, raster = self.restrict(valid, raster, keep_all)
        num_valid = valid.sum(dim=1)
        count = num_valid if keep_all else self.counts(num_valid)
        priority, scores = self.priority(image_tokens, text_embeds, valid, count,
                                         text_mask=text_mask, raster=raster, saliency=saliency,
                                         **extra)
        count = self.adjust_counts(count, num_valid, text_embeds, text_mask, keep_all)
        return keep_top(priority, valid, count, scores)

    def restrict(self, valid: Tensor, raster, keep_all: bool) -> tuple[Tensor, Tensor | None]:
        """Hook: the tokens a selector may keep (all valid ones) and its checked raster."""
        return valid, None

    def adjust_counts(self, count, num_valid, text_embeds, text_mask, keep_all) -> Tensor:
        """Hook: the final per-image counts (a question-aware selector keeps every token of a
        sample without a question, as the router does)."""
        return count


def select_packed(selector: FixedBudgetSelector, local: Tensor, image: Tensor, pos: Tensor,
                  valid: Tensor, raster: Tensor, text_embeds: Tensor | None,
                  text_mask: Tensor | None, gamma: float | None,
                  tile_saliency: Tensor | None = None) -> RouterOutput:
    """Run ``selector`` on tokens held packed, as the adapter holds its local tokens: ``local``
    ``(p, q, d)`` whose flattened token ``t`` lands at ``(image[t], pos[t])`` of a ``(b, n_max)``
    raster with ``valid`` marking the occupied slots and ``raster`` ``(b, 2)`` each image's
    ``(rows, cols)``. The tokens are laid on a ``(b, n_max, d)`` raster with one scatter, and
    ``tile_saliency`` (``(p, q)`` or patch-level ``(p, s)``, see
    :func:`~slime_adapters.selectors.saliency.pool_saliency`) the same way.

    Raises:
        ValueError: ``tile_saliency`` for a selector that does not read it, or with the wrong
            number of tiles; :class:`RouterInputError` as the selector's ``forward``.
    """
    from slime_adapters.selectors.saliency import pool_saliency

    b, n_max = valid.shape
    p, q, d = local.shape
    if tile_saliency is not None and "saliency" not in getattr(selector, "reads", ()):
        raise ValueError(f"tile_saliency is read by a SaliencySelector only, not by "
                         f"{type(selector).__name__}")
    tokens = local.new_zeros(b, n_max, d).index_put((image, pos), local.reshape(-1, d))
    saliency = None
    if tile_saliency is not None:
        per_token = pool_saliency(tile_saliency, int(round(q ** 0.5)))
        if per_token.shape[0] != p:
            raise ValueError(f"tile_saliency has {per_token.shape[0]} tiles but the grids need "
                             f"{p}")
        saliency = per_token.new_zeros(b, n_max).index_put(
            (image, pos), per_token.reshape(-1).to(local.device))
    return selector(tokens, text_embeds, image_mask=valid, text_mask=text_mask, gamma=gamma,
                    raster=raster, saliency=saliency)
