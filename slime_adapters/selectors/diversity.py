"""Diversity selection in the style of DivPrune: greedy max–min cosine distance at a fixed budget.

With ``x̂ = x / max(‖x‖, 1e-8)`` and the cosine distance ``δ(i, j) = 1 − x̂_i · x̂_j``, per image:

1. the first token kept is the one farthest from its nearest other valid token,
   ``argmax_i min_{j ≠ i} δ(i, j)`` (a lone valid token has no neighbour and is taken first);
2. each next token is the one farthest from the kept set, ``argmax_i min_{s ∈ S} δ(i, s)``, among
   the valid tokens not yet kept, until ``count`` tokens are kept. Ties: the lower raster index.

The greedy steps loop over the budget (each step one batched product for every image at once);
the number of steps is bounded by the configured budget and the static token count (no host
synchronisation). Step 1 holds one ``(b, n, n)`` similarity matrix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import Tensor

from slime_adapters.router_scores import NORM_EPS
from slime_adapters.selectors.base import FixedBudgetSelector, compute_dtype
from slime_adapters.selectors.budget import BudgetConfig

__all__ = ["DiversitySelector", "DiversitySelectorConfig"]


@dataclasses.dataclass(frozen=True)
class DiversitySelectorConfig(BudgetConfig):
    """:class:`DiversitySelector`'s budget."""

    kind: ClassVar[str] = "diversity_selector"


class DiversitySelector(FixedBudgetSelector):
    """Keeps ``count`` mutually distant tokens per image (greedy max–min cosine distance, see the
    module docstring). ``scores``: a kept token's distance to the tokens kept before it (its
    nearest-neighbour distance for the first, 2.0 for a lone token), a dropped token's distance
    to the kept set."""

    config_class = DiversitySelectorConfig

    def __init__(self, *, keep_fraction: float | None = None, keep_count: int | None = None,
                 min_keep: int = 1, device=None, dtype=None) -> None:
        super().__init__(DiversitySelectorConfig(keep_fraction=keep_fraction,
                                                 keep_count=keep_count, min_keep=min_keep))

    def max_steps(self, n: int) -> int:
        """The most tokens any image of ``n`` slots can keep under the budget (no data read)."""
        budget = self.config.budget()
        top = budget.get("keep_count") or math.floor(budget["keep_fraction"] * n + 0.5)
        return min(n, max(top, self.config.min_keep))

    def priority(self, image_tokens, text_embeds, valid, count, **_):
        b, n, _ = image_tokens.shape
        cd = compute_dtype(image_tokens)
        x = torch.where(valid[..., None], image_tokens.detach().to(cd), 0.0)
        x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(NORM_EPS)
        inf = torch.tensor(math.inf, dtype=cd, device=x.device)
        dist = 1.0 - torch.einsum("bid,bjd->bij", x, x)
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        dist = torch.where(valid[:, None, :] & ~eye, dist, inf)
        nearest = dist.amin(dim=2) if n else dist.new_zeros(b, 0)  # (b, n); inf: no neighbour
        del dist
        selected = torch.zeros_like(valid)
        picked_at = torch.full((b, n), n, dtype=torch.long, device=x.device)
        pick_score = torch.zeros(b, n, dtype=cd, device=x.device)
        to_set = torch.full((b, n), math.inf, dtype=cd, device=x.device)
        rows = torch.arange(b, device=x.device)
        for step in range(self.max_steps(n)):  # a loop over the budget, batched over images
            free = valid & ~selected
            key = torch.where(free, nearest if step == 0 else to_set, -inf)
            pick = key.argmax(dim=1)  # the first maximum: the lower raster index on ties
            active = (step < count) & free.any(dim=1)
            hit = torch.zeros_like(valid).scatter(1, pick[:, None], active[:, None])
            selected = selected | hit
            picked_at = torch.where(hit, step, picked_at)
            pick_score = torch.where(hit, key[rows, pick][:, None], pick_score)
            new = 1.0 - torch.einsum("bnd,bd->bn", x, x[rows, pick])
            to_set = torch.where(active[:, None], torch.minimum(to_set, new), to_set)
        priority = (n - picked_at).to(cd)  # kept tokens in pick order, then the rest
        scores = torch.where(selected, pick_score.clamp_max(2.0), to_set.clamp_max(2.0))
        return priority, scores
