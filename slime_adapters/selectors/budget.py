"""Budgets of the fixed-budget token selectors and the machinery they share.

A budget says how many local tokens each image keeps: ``keep_fraction`` f (image ``i`` with
``n_i`` valid tokens keeps ``round_half_up(f · n_i)``) or ``keep_count`` c (every image keeps
``c``), then clamped to ``[min_keep, n_i]``. :func:`match_mean_budget` finds the fraction (or
count) whose mean kept count over a set of images comes closest to a target, e.g. the SliME
router's mean kept count at some γ, so methods are compared at equal token budgets.

Every selector ranks the valid tokens of each image by a priority (higher = kept first; equal
priorities keep their raster order, a stable sort) and keeps the first ``count`` of them, with one
sort and one scatter for the whole batch, as the router does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor

from slime_adapters.config import ConfigBase, ConfigError, check_int, check_number
from slime_adapters.router import RouterInputError, RouterOutput

__all__ = [
    "BUDGET_FIELDS",
    "BudgetConfig",
    "DEFAULT_KEEP_FRACTION",
    "budget_counts",
    "check_budget",
    "keep_top",
    "match_mean_budget",
]

BUDGET_FIELDS = ("keep_fraction", "keep_count", "min_keep")


DEFAULT_KEEP_FRACTION = 0.25


def check_budget(owner: str, keep_fraction, keep_count, min_keep, *,
                 others: Sequence[tuple[str, object]] = ()) -> None:
    """Validate a budget: ``keep_fraction`` in (0, 1] or None, ``keep_count`` an int >= 1 or None,
    at most one of them (or of them and ``others``, e.g. a stride) set (none: the selector's
    default budget); ``min_keep`` an int >= 0."""
    check_number(owner, "keep_fraction", keep_fraction, above=0, maximum=1, allow_none=True)
    check_int(owner, "keep_count", keep_count, minimum=1, allow_none=True)
    check_int(owner, "min_keep", min_keep, minimum=0)
    given = [name for name, value in (("keep_fraction", keep_fraction),
                                      ("keep_count", keep_count), *others) if value is not None]
    names = ["keep_fraction", "keep_count", *(n for n, _ in others)]
    if len(given) > 1:
        raise ConfigError(f"{owner}: set at most one of {', '.join(names)} (the budget), got "
                          + ", ".join(given))


@dataclasses.dataclass(frozen=True)
class BudgetConfig(ConfigBase):
    """Base of the selectors' configs, a budget: at most one of ``keep_fraction`` (in (0, 1]) and
    ``keep_count`` (>= 1); neither means ``keep_fraction`` 0.25. ``min_keep`` (>= 0) bounds every
    image's count from below."""

    keep_fraction: float | None = None
    keep_count: int | None = None
    min_keep: int = 1

    def __post_init__(self) -> None:
        check_budget(type(self).__name__, self.keep_fraction, self.keep_count, self.min_keep)

    def budget(self) -> dict[str, float | int]:
        """``{"keep_fraction": f}`` or ``{"keep_count": c}``: the budget in force."""
        if self.keep_count is not None:
            return {"keep_count": self.keep_count}
        f = DEFAULT_KEEP_FRACTION if self.keep_fraction is None else self.keep_fraction
        return {"keep_fraction": f}


def budget_counts(num_valid: Tensor, *, keep_fraction: float | None = None,
                  keep_count: int | None = None, min_keep: int = 1) -> Tensor:
    """Tokens each image keeps: ``(b,)`` long from ``num_valid`` ``(b,)`` valid tokens per image.

    ``keep_fraction`` f: ``floor(f · n_i + 1/2)`` computed in float64; ``keep_count`` c: ``c``;
    then ``max(·, min_keep)`` and ``min(·, n_i)``. Exactly one of the two must be given."""
    if (keep_fraction is None) == (keep_count is None):
        raise ValueError("budget_counts: give exactly one of keep_fraction and keep_count")
    n = num_valid.to(torch.long)
    if keep_count is not None:
        count = torch.full_like(n, int(keep_count))
    else:
        count = torch.floor(n.to(torch.float64) * float(keep_fraction) + 0.5).to(torch.long)
    return torch.minimum(count.clamp(min=min_keep), n)


def _mean_kept(n: Tensor, min_keep: int, **budget) -> float:
    return float(budget_counts(n, min_keep=min_keep, **budget).double().mean())


def match_mean_budget(num_valid: Tensor | Sequence[int], target_mean: float, *,
                      by: str = "fraction", min_keep: int = 1) -> dict[str, float | int]:
    """The budget whose mean kept count over images with ``num_valid`` valid tokens comes closest
    to ``target_mean``: ``{"keep_fraction": f}`` (``by="fraction"``) or ``{"keep_count": c}``
    (``by="count"``), ready to pass to a selector config (``RandomSelectorConfig(**budget)``).
    Ties go to the smaller budget. Computed on the host (bisection over f; all counts for c).

    Raises:
        ValueError: ``by`` unknown, no images, or a target that is not a finite number > 0.
    """
    if by not in ("fraction", "count"):
        raise ValueError(f"match_mean_budget: by must be 'fraction' or 'count', got {by!r}")
    n = torch.as_tensor(num_valid, dtype=torch.long).flatten().cpu()
    if n.numel() == 0:
        raise ValueError("match_mean_budget: num_valid holds no image")
    if isinstance(target_mean, bool) or not isinstance(target_mean, int | float) or not (
            math.isfinite(target_mean) and target_mean > 0):
        raise ValueError(f"match_mean_budget: target_mean must be a finite number > 0, got "
                         f"{target_mean!r}")
    if by == "count":
        counts = torch.arange(1, max(int(n.max()), 1) + 1)
        kept = torch.minimum(counts[:, None].clamp(min=min_keep), n[None, :]).double().mean(1)
        best = int(torch.argmin((kept - target_mean).abs()))  # argmin: the first (smallest) one
        return {"keep_count": int(counts[best])}
    lo, hi = 0.0, 1.0  # mean(lo) < target <= mean(hi) unless the target is out of reach
    if _mean_kept(n, min_keep, keep_fraction=1.0) < target_mean:
        return {"keep_fraction": 1.0}
    for _ in range(60):
        mid = (lo + hi) / 2
        if _mean_kept(n, min_keep, keep_fraction=mid) >= target_mean:
            hi = mid
        else:
            lo = mid
    candidates = [f for f in (lo, hi) if f > 0]
    errors = [abs(_mean_kept(n, min_keep, keep_fraction=f) - target_mean) for f in candidates]
    return {"keep_fraction": candidates[errors.index(min(errors))]}


def keep_top(priority: Tensor, valid: Tensor, count: Tensor, scores: Tensor) -> RouterOutput:
    """Keep, per image, the ``count`` valid tokens of highest ``priority`` (b, n) (ties: raster
    order). ``scores`` (b, n) is reported as the output's scores, zeroed at masked tokens."""
    b, n = priority.shape
    low = torch.finfo(priority.dtype).min
    # masked tokens sort after every valid one; a valid token never has the lowest float
    key = torch.where(valid, priority.clamp_min(torch.finfo(priority.dtype).min / 2), low)
    order = torch.sort(key, dim=1, descending=True, stable=True)[1]
    ranks = rearrange(torch.arange(n, device=priority.device), "n -> 1 n")
    keep_sorted = ranks < count.unsqueeze(1)
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return RouterOutput(keep & valid, count, torch.where(valid, scores, 0.0))


def check_gamma_for_budget(owner: str, gamma: float | None) -> bool:
    """A fixed-budget selector takes ``gamma`` only as None (its budget) or 1.0 (keep every valid
    token, as a stage that trains on all local tokens asks). Returns True for "keep all"."""
    if gamma is None:
        return False
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or gamma != 1.0:
        raise RouterInputError(
            f"{owner} keeps a fixed budget: gamma may only be None (the budget) or 1.0 (keep "
            f"every token), got {gamma!r}; set the budget in the selector's config")
    return True
