"""Single-score selectors: random, uniform spatial, feature norm, question top-k, saliency.

Each ranks the valid tokens of every image by one number and keeps the top ``count``
(:mod:`slime_adapters.selectors.budget`); the interface is the router's
(:mod:`slime_adapters.selectors.base`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor

from slime_adapters.config import check_choice, check_int
from slime_adapters.router import ON_EMPTY_TEXT, RouterInputError
from slime_adapters.router_scores import pooled_cosine_scores
from slime_adapters.selectors.base import FixedBudgetSelector, compute_dtype
from slime_adapters.selectors.budget import BudgetConfig, check_budget

__all__ = [
    "BudgetConfig",
    "NormSelector",
    "NormSelectorConfig",
    "QuestionTopKSelector",
    "QuestionTopKSelectorConfig",
    "RandomSelector",
    "RandomSelectorConfig",
    "SaliencySelector",
    "SaliencySelectorConfig",
    "SpatialSelector",
    "SpatialSelectorConfig",
    "bayer_index",
]


# ------------------------------------------------------------------------------------- random
@dataclasses.dataclass(frozen=True)
class RandomSelectorConfig(BudgetConfig):
    """:class:`RandomSelector`'s budget and ``seed`` (an int >= 0)."""

    kind: ClassVar[str] = "random_selector"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(type(self).__name__, "seed", self.seed, minimum=0)


class RandomSelector(FixedBudgetSelector):
    """Keeps ``count`` tokens per image drawn uniformly at random among the valid ones.

    The draw is a float64 key per token from a ``torch.Generator`` seeded with ``seed`` on the CPU
    for every call (no global RNG state is read or advanced): the same batch shape gives the same
    draw on any device. Pass ``generator=`` to draw from your own (a new draw each call)."""

    config_class = RandomSelectorConfig
    reads = ("image_mask",)

    def __init__(self, *, keep_fraction: float | None = None, keep_count: int | None = None,
                 min_keep: int = 1, seed: int = 0, device=None, dtype=None) -> None:
        super().__init__(RandomSelectorConfig(keep_fraction=keep_fraction,
                                keep_count=keep_count, min_keep=min_keep, seed=seed))

    def forward(self, image_tokens, text_embeds=None, *, image_mask=None, text_mask=None,
                gamma=None, raster=None, saliency=None,
                generator: torch.Generator | None = None):
        """As :meth:`FixedBudgetSelector.forward`; ``generator`` a CPU generator to draw from
        instead of a fresh one seeded with ``seed``."""
        if generator is not None and (not isinstance(generator, torch.Generator)
                                      or generator.device.type != "cpu"):
            raise RouterInputError("generator must be a CPU torch.Generator")
        return self._select(image_tokens, text_embeds, image_mask=image_mask,
                            text_mask=text_mask, gamma=gamma, raster=raster, saliency=saliency,
                            generator=generator)

    def priority(self, image_tokens, text_embeds, valid, count, *, generator=None, **_):
        g = generator or torch.Generator().manual_seed(self.config.seed)
        keys = torch.rand(valid.shape, generator=g, dtype=torch.float64)
        keys = keys.to(device=valid.device, dtype=compute_dtype(image_tokens))
        return keys, keys


# ------------------------------------------------------------------------------------ spatial
@dataclasses.dataclass(frozen=True)
class SpatialSelectorConfig(BudgetConfig):
    """:class:`SpatialSelector`: at most one of ``stride`` (an int >= 1: every stride-th row and
    column), ``keep_fraction`` or ``keep_count`` (an exact budget in ordered-dither order);
    neither: ``stride`` 2."""

    kind: ClassVar[str] = "spatial_selector"
    stride: int | None = None

    @property
    def effective_stride(self) -> int | None:
        """The stride in force: ``stride``, 2 when no budget is set, None under a budget."""
        if self.stride is not None:
            return self.stride
        return 2 if self.keep_fraction is None and self.keep_count is None else None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_int(owner, "stride", self.stride, minimum=1, allow_none=True)
        check_budget(owner, self.keep_fraction, self.keep_count, self.min_keep,
                     others=[("stride", self.stride)])


def bayer_index(rows: Tensor, cols: Tensor, bits: int) -> Tensor:
    """Ordered-dither (Bayer) rank of raster cell (row, col) in a 2^bits × 2^bits matrix:
    ``Σ_k (2·(r_k ⊕ c_k) + r_k) · 4^(bits−1−k)`` over the bits ``r_k``, ``c_k`` (k = 0 lowest).
    Cells of rank < 4^bits / 4^j are exactly those with row and column multiples of 2^j."""
    out = torch.zeros_like(rows)
    for k in range(bits):  # a loop over bits of the coordinates, not over tokens
        r, c = (rows >> k) & 1, (cols >> k) & 1
        out = out + (2 * (r ^ c) + r) * (4 ** (bits - 1 - k))
    return out


def _host_raster(raster, b: int, n: int, owner: str) -> Tensor:
    if raster is None:
        raise RouterInputError(f"{owner} needs raster (b, 2): each image's (rows, cols) of tokens")
    r = torch.as_tensor(raster)
    if r.dtype.is_floating_point or r.dtype == torch.bool:
        raise RouterInputError(f"raster must hold integers, got dtype {r.dtype}")
    r = r.cpu().to(torch.long)
    if tuple(r.shape) != (b, 2):
        raise RouterInputError(f"raster must have shape {(b, 2)} as (rows, cols), got "
                               f"{tuple(r.shape)}")
    if (r < 0).any() or (r[:, 0] * r[:, 1] > n).any():
        raise RouterInputError(f"raster (rows, cols) must be >= 0 with rows·cols <= n = {n}, "
                               f"got {r.tolist()}")
    return r


class SpatialSelector(FixedBudgetSelector):
    """Uniform spatial subsampling on each image's own token raster (``raster`` (b, 2) = (rows,
    cols), checked on the host; tokens at positions >= rows·cols are never kept).

    ``stride=k``: keeps the valid tokens whose row and column are multiples of k (every k-th
    token in rows and columns, starting at the first). ``keep_fraction`` / ``keep_count``: keeps
    exactly the budget, in ordered-dither (Bayer) order on the raster (:func:`bayer_index`,
    uniform at every density; at a budget of n/4^j on a raster whose sides are multiples of 2^j
    it is exactly every 2^j-th token in rows and columns; ties in raster order)."""

    config_class = SpatialSelectorConfig
    reads = ("raster", "image_mask")

    def __init__(self, *, stride: int | None = None, keep_fraction: float | None = None,
                 keep_count: int | None = None, min_keep: int = 1, device=None,
                 dtype=None) -> None:
        super().__init__(SpatialSelectorConfig(stride=stride, keep_fraction=keep_fraction,
                                               keep_count=keep_count, min_keep=min_keep))

    def _cells(self, raster_h: Tensor, n: int, device):
        rows, cols = raster_h[:, 0].to(device), raster_h[:, 1].to(device)
        pos = torch.arange(n, device=device)[None, :]
        safe = cols.clamp(min=1)[:, None]
        return pos // safe, pos % safe, pos < (rows * cols)[:, None]

    def restrict(self, valid, raster, keep_all):
        b, n = valid.shape
        raster_h = _host_raster(raster, b, n, type(self).__name__)
        r, c, on = self._cells(raster_h, n, valid.device)
        valid = valid & on
        k = self.config.effective_stride
        if k is not None and not keep_all:
            valid = valid & (r % k == 0) & (c % k == 0)
        return valid, raster_h

    def counts(self, num_valid):
        return num_valid if self.config.effective_stride is not None else super().counts(num_valid)

    def priority(self, image_tokens, text_embeds, valid, count, *, raster, **_):
        b, n = valid.shape
        r, c, _ = self._cells(raster, n, valid.device)
        side = int(raster.max()) if raster.numel() else 1
        bits = max(1, (max(side, 1) - 1).bit_length())
        rank = bayer_index(r, c, bits).to(compute_dtype(image_tokens))
        return -rank, 1.0 - rank / float(4 ** bits)


# --------------------------------------------------------------------------------------- norm
@dataclasses.dataclass(frozen=True)
class NormSelectorConfig(BudgetConfig):
    """:class:`NormSelector`'s budget."""

    kind: ClassVar[str] = "norm_selector"


class NormSelector(FixedBudgetSelector):
    """Keeps the ``count`` tokens of largest L2 norm ‖v‖ per image (scores: the norms)."""

    config_class = NormSelectorConfig

    def __init__(self, *, keep_fraction: float | None = None, keep_count: int | None = None,
                 min_keep: int = 1, device=None, dtype=None) -> None:
        super().__init__(NormSelectorConfig(keep_fraction=keep_fraction,
                                keep_count=keep_count, min_keep=min_keep))

    def priority(self, image_tokens, text_embeds, valid, count, **_):
        x = image_tokens.detach().to(compute_dtype(image_tokens))
        norm = torch.linalg.vector_norm(torch.where(valid[..., None], x, 0.0), dim=-1)
        return norm, norm


# ------------------------------------------------------------------------------- question top-k
@dataclasses.dataclass(frozen=True)
class QuestionTopKSelectorConfig(BudgetConfig):
    """:class:`QuestionTopKSelector`'s budget and ``on_empty_text`` (``"keep_all"``: a sample
    without a valid question token keeps all its tokens, as the router does; ``"raise"``)."""

    kind: ClassVar[str] = "question_topk_selector"
    on_empty_text: str = "keep_all"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(type(self).__name__, "on_empty_text", self.on_empty_text, ON_EMPTY_TEXT)


class QuestionTopKSelector(FixedBudgetSelector):
    """Keeps the ``count`` tokens with the highest pooled cosine score against the question (the
    router's own score, :func:`~slime_adapters.router_scores.pooled_cosine_scores`, mean over
    the valid question tokens) at a fixed budget: the router's "which tokens" without its γ
    ("how many")."""

    config_class = QuestionTopKSelectorConfig
    reads = ("image_tokens", "text_embeds", "text_mask")
    question_aware = True

    def __init__(self, *, keep_fraction: float | None = None, keep_count: int | None = None,
                 min_keep: int = 1, on_empty_text: str = "keep_all", device=None,
                 dtype=None) -> None:
        super().__init__(QuestionTopKSelectorConfig(keep_fraction=keep_fraction,
                                keep_count=keep_count, min_keep=min_keep,
                                on_empty_text=on_empty_text))

    def priority(self, image_tokens, text_embeds, valid, count, *, text_mask, **_):
        s = pooled_cosine_scores(torch.where(valid[..., None], image_tokens, 0.0), text_embeds,
                                 text_mask=text_mask)
        return s, s

    def adjust_counts(self, count, num_valid, text_embeds, text_mask, keep_all):
        b = text_embeds.shape[0]
        empty = (torch.full((b,), text_embeds.shape[1] == 0, device=num_valid.device)
                 if text_mask is None else ~text_mask.any(dim=1))
        if self.config.on_empty_text == "raise" and bool(empty.any()):
            bad = empty.nonzero().flatten().tolist()
            raise RouterInputError(
                f"text_mask: samples {bad} have no valid question token, so there is nothing to "
                "select by (pass on_empty_text='keep_all' to keep all their image tokens)")
        return torch.where(empty, num_valid, count)


# ----------------------------------------------------------------------------------- saliency
@dataclasses.dataclass(frozen=True)
class SaliencySelectorConfig(BudgetConfig):
    """:class:`SaliencySelector`'s budget."""

    kind: ClassVar[str] = "saliency_selector"


class SaliencySelector(FixedBudgetSelector):
    """Keeps the ``count`` most salient tokens per image, in the style of VisionZip's dominant
    tokens / PruMerge's outliers: ``saliency`` (b, n) is the attention the vision encoder's
    [CLS] token pays each token (:func:`~slime_adapters.selectors.saliency.cls_attention`), laid
    on the same tokens. Merging the dropped tokens into contextual tokens adds tokens, which a
    keep mask cannot express: :func:`~slime_adapters.selectors.saliency.contextual_tokens`
    computes them from the output as an optional extra."""

    config_class = SaliencySelectorConfig
    reads = ("saliency", "image_mask")

    def __init__(self, *, keep_fraction: float | None = None, keep_count: int | None = None,
                 min_keep: int = 1, device=None, dtype=None) -> None:
        super().__init__(SaliencySelectorConfig(keep_fraction=keep_fraction,
                                keep_count=keep_count, min_keep=min_keep))

    def priority(self, image_tokens, text_embeds, valid, count, *, saliency, **_):
        if saliency is None:
            raise RouterInputError("SaliencySelector needs saliency (b, n): the encoder's "
                                   "attention to each token")
        if not isinstance(saliency, Tensor) or not saliency.dtype.is_floating_point:
            raise RouterInputError("saliency must be a floating-point tensor of shape (b, n)")
        if tuple(saliency.shape) != tuple(valid.shape):
            raise RouterInputError(f"saliency must have shape {tuple(valid.shape)}, got "
                                   f"{tuple(saliency.shape)}")
        s = torch.where(valid, saliency.detach().to(compute_dtype(image_tokens)), 0.0)
        return s, s
