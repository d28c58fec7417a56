"""Text-guided cosine token router (paper §2.2): keep the local tokens closest to the question.

einops legend::

    b  images in the batch
    n  image tokens per image (local tokens, raster order; padded to the batch maximum)
    l  text tokens (the question), padded
    d  width shared by the image tokens and the text embeddings (the LLM width)
    k  kept tokens of all images laid end to end (Σ num_kept)

Scores. The score of image token i is the cosine similarity between v_i and the question tokens
e_j, pooled over the valid question tokens::

    s_i = v̂_i · pool_j(ê_j),    x̂ = x / max(‖x‖, 1e-8)

with ``pool`` the mean (``text_pool="mean"``, the paper) or the sum (``text_pool="sum"``, the
released code, which sums over every prompt token, system prompt included, and in training the
answer too). Pooling before the product gives exactly the mean (sum) of the N×L cosine matrix while
only ever holding (b, n) and (b, d) intermediates: memory is O((n + l)·d), never n×l×d.

Selection rule (per image, vectorised over the batch with one sort, one cumsum and one scatter):

1. ``legacy_softmax`` only: s ← softmax(s / 0.5) over the valid image tokens (checkpoints released
   before Nov 2024 were trained with this extra softmax).
2. s ← s + ε, with ε the ``noise`` argument when given (any mode), else ε ~ N(0, noise_std²) in
   training mode, else 0.
3. p = softmax(s / temperature) over the valid image tokens (masked tokens get p = 0).
4. Sort the valid tokens by p, descending; equal probabilities keep their raster order (a stable
   sort: lower index first). Masked tokens always sort after every valid token.
5. K = the length of the smallest prefix whose cumulative sum reaches γ (``crossing="reach"``:
   cumsum ≥ γ; the token that crosses γ is kept) or strictly exceeds it (``crossing="exceed"``:
   cumsum > γ, the released code's ``(cumsum <= γ).sum() + 1``). γ ≥ 1 keeps every valid token
   (a float cumsum may never reach exactly 1.0).
6. K ← min(clamp(K, min_keep, max_keep), number of valid tokens); the first K sorted tokens are kept
   and the keep mask is scattered back to raster positions.
7. A token whose score is NaN or ±inf (a non-finite feature) counts as masked: it is never kept and
   the other tokens of its image are selected as if it were absent.
8. A sample whose question has no valid token: ``on_empty_text="keep_all"`` (default) keeps all its
   valid image tokens, as γ = 1 would (captioning prompts carry no question; ``forward`` stays free
   of host synchronisation); ``on_empty_text="raise"`` raises :class:`RouterInputError`, which costs
   one host synchronisation per call.

What each setting keeps (SPEC §2.4, "sharpness matters"; ``benchmarks/bench_router.py`` measures
it). Mean-pooled cosines lie in [−1, 1] and in practice within a narrow band (a few hundredths
apart), so at ``temperature=1`` the softmax over hundreds of tokens is nearly flat and γ keeps about
a fraction γ of the tokens whatever the question. A temperature of the order of the score spread
(≈0.01–0.1) makes the router selective: then γ=0.95 keeps mostly the tokens that stand out. Far
below the gap between the relevant tokens' scores and the rest, the softmax collapses onto the few
top tokens and γ keeps little more than ``min_keep`` (recall of the relevant tokens drops).
``text_pool="sum"`` multiplies the scores by the question length, i.e. divides the temperature by
it. ``legacy_softmax`` first squashes the scores into probabilities ≈ 1/n, so the second softmax is
flat and γ keeps ≈ γ·n tokens whatever the scores (≈95% at γ = 0.95).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from slime_adapters.config import (
    ConfigBase,
    ConfigurableMixin,
    check_bool,
    check_choice,
    check_int,
    check_number,
)
from slime_adapters.router_scores import pooled_cosine_scores

__all__ = [
    "CROSSINGS",
    "LEGACY_SOFTMAX_TEMPERATURE",
    "ON_EMPTY_TEXT",
    "TEXT_POOLS",
    "CosineTokenRouter",
    "CosineTokenRouterConfig",
    "PackedTokens",
    "PaddedTokens",
    "RouterInputError",
    "RouterOutput",
    "check_gamma",
]

LEGACY_SOFTMAX_TEMPERATURE = 0.5
TEXT_POOLS = ("mean", "sum")
CROSSINGS = ("reach", "exceed")
ON_EMPTY_TEXT = ("keep_all", "raise")


class RouterInputError(ValueError):
    """The router got inputs of the wrong shape, rank, dtype or value."""


class PackedTokens(NamedTuple):
    """Kept tokens of every image laid end to end, in raster order within each image.

    ``tokens`` (k, d); ``cu_seqlens`` (b + 1,) int32 offsets of each image's run; ``positions``
    (k,) long raster index of each kept token in its image; ``lengths`` (b,) long kept counts.
    """

    tokens: Tensor
    cu_seqlens: Tensor
    positions: Tensor
    lengths: Tensor


class PaddedTokens(NamedTuple):
    """Kept tokens padded to the batch maximum: ``tokens`` (b, kmax, d), ``mask`` (b, kmax) bool
    (True = a kept token; padded slots hold zeros)."""

    tokens: Tensor
    mask: Tensor


def _check_tokens(name: str, x: Tensor, keep_mask: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise RouterInputError(f"{name} must be a (b, n, d) tensor, got {shape}")
    if tuple(x.shape[:2]) != tuple(keep_mask.shape):
        raise RouterInputError(
            f"{name} has shape {tuple(x.shape)} but the router ran on (b, n) = "
            f"{tuple(keep_mask.shape)}"
        )


class RouterOutput(NamedTuple):
    """What the router decided. ``keep_mask`` (b, n) bool, True = keep; ``num_kept`` (b,) long;
    ``scores`` (b, n) the softmax probabilities used for selection (float32, float64 for float64
    inputs; 0 at masked tokens). Static shapes: nothing depends on how many tokens were kept."""

    keep_mask: Tensor
    num_kept: Tensor
    scores: Tensor

    def pack(self, image_tokens: Tensor) -> PackedTokens:
        """Gather the kept tokens of ``image_tokens`` (b, n, d) into one (k, d) tensor, image after
        image, each in raster order. Synchronises with the host (the output size depends on the
        data). Gradients flow to the kept tokens. Raises :class:`RouterInputError` when
        ``image_tokens`` does not match the routed (b, n)."""
        _check_tokens("image_tokens", image_tokens, self.keep_mask)
        # nonzero lists indices in row-major order: by image, then by raster position
        batch_idx, positions = self.keep_mask.nonzero(as_tuple=True)
        tokens = image_tokens[batch_idx, positions]
        lengths = self.num_kept.to(torch.long)
        cu_seqlens = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
        return PackedTokens(tokens, cu_seqlens, positions, lengths)

    def pad(self, image_tokens: Tensor) -> PaddedTokens:
        """Kept tokens of ``image_tokens`` (b, n, d) in raster order, zero-padded to the largest
        count in the batch: ``(tokens (b, kmax, d), mask (b, kmax))``. Synchronises with the host
        (kmax). Raises :class:`RouterInputError` when the shape does not match the routed (b, n)."""
        _check_tokens("image_tokens", image_tokens, self.keep_mask)
        b, n, d = image_tokens.shape
        kmax = int(self.num_kept.max()) if b > 0 else 0
        # a stable descending sort of the 0/1 mask moves kept tokens first, in raster order
        order = torch.sort(self.keep_mask.to(torch.uint8), dim=1, descending=True, stable=True)[1]
        idx = order[:, :kmax]
        tokens = torch.gather(image_tokens, 1, idx.unsqueeze(-1).expand(b, kmax, d))
        mask = torch.arange(kmax, device=idx.device) < self.num_kept.unsqueeze(1)
        # where, not a product: the unkept tokens gathered into padded slots may hold NaN
        tokens = torch.where(mask.unsqueeze(-1), tokens, tokens.new_zeros(()))
        return PaddedTokens(tokens, mask)


@dataclasses.dataclass(frozen=True)
class CosineTokenRouterConfig(ConfigBase):
    """Configuration of :class:`CosineTokenRouter` (its constructor keywords). Raises
    :class:`~slime_adapters.config.ConfigError` (a ``ValueError``) naming the field on an unknown
    option, a non-finite or out-of-range number, or a non-bool switch."""

    kind: ClassVar[str] = "cosine_token_router"
    gamma: float = 0.95
    noise_std: float = 0.1
    text_pool: str = "mean"
    temperature: float = 1.0
    min_keep: int = 1
    max_keep: int | None = None
    legacy_softmax: bool = False
    crossing: str = "reach"
    on_empty_text: str = "keep_all"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_number(owner, "gamma", self.gamma, above=0, maximum=1)
        check_number(owner, "noise_std", self.noise_std, minimum=0)
        check_choice(owner, "text_pool", self.text_pool, TEXT_POOLS)
        check_number(owner, "temperature", self.temperature, above=0)
        check_int(owner, "min_keep", self.min_keep, minimum=0)
        check_int(owner, "max_keep", self.max_keep, minimum=max(self.min_keep, 1),
                  allow_none=True)
        check_bool(owner, "legacy_softmax", self.legacy_softmax)
        check_choice(owner, "crossing", self.crossing, CROSSINGS)
        check_choice(owner, "on_empty_text", self.on_empty_text, ON_EMPTY_TEXT)


def check_gamma(gamma: float, name: str) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not 0 < gamma <= 1:
        raise RouterInputError(f"{name} must be a number in (0, 1], got {gamma!r}")
    return float(gamma)


def _masked_softmax(x: Tensor, valid: Tensor) -> Tensor:
    # finfo.min instead of -inf: a row with no valid token stays finite (then zeroed) instead of NaN
    x = torch.where(valid, x, torch.finfo(x.dtype).min)
    return torch.where(valid, torch.softmax(x, dim=-1), 0.0)


class CosineTokenRouter(ConfigurableMixin, nn.Module):
    """Parameter-free router keeping, per image, the tokens whose softmaxed cosine score with the
    question adds up to γ (see the module docstring for the exact rule and what each setting keeps).

    Keywords: ``gamma`` in (0, 1]; ``noise_std`` of the training noise on the scores; ``text_pool``
    ``"mean"`` (paper) or ``"sum"`` (released code); ``temperature`` > 0 of the selection softmax;
    ``min_keep``/``max_keep`` bounds on the kept count; ``legacy_softmax`` the released pre-Nov-2024
    extra softmax(·/0.5); ``crossing`` ``"reach"`` (cumsum ≥ γ) or ``"exceed"`` (cumsum > γ, the
    released code's comparison); ``on_empty_text`` ``"keep_all"`` or ``"raise"``. ``device`` and
    ``dtype`` are accepted for a uniform constructor; the router has no parameters or buffers.
    Raises :class:`~slime_adapters.config.ConfigError` on any invalid option.
    """

    config_class = CosineTokenRouterConfig

    def __init__(
        self,
        *,
        gamma: float = 0.95,
        noise_std: float = 0.1,
        text_pool: str = "mean",
        temperature: float = 1.0,
        min_keep: int = 1,
        max_keep: int | None = None,
        legacy_softmax: bool = False,
        crossing: str = "reach",
        on_empty_text: str = "keep_all",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = CosineTokenRouterConfig(
            gamma=gamma, noise_std=noise_std, text_pool=text_pool, temperature=temperature,
            min_keep=min_keep, max_keep=max_keep, legacy_softmax=legacy_softmax,
            crossing=crossing, on_empty_text=on_empty_text,
        )

    def extra_repr(self) -> str:
        c = self.config
        return (f"gamma={c.gamma}, text_pool={c.text_pool!r}, temperature={c.temperature}, "
                f"noise_std={c.noise_std}, legacy_softmax={c.legacy_softmax}")

    def _validate(self, image_tokens, text_embeds, image_mask, text_mask, noise):
        for name, t in (("image_tokens", image_tokens), ("text_embeds", text_embeds)):
            if not isinstance(t, Tensor):
                raise RouterInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3:
                raise RouterInputError(f"{name} must have rank 3 (b, tokens, d), got shape "
                                       f"{tuple(t.shape)}")
            if not t.dtype.is_floating_point:
                raise RouterInputError(f"{name} must be floating point, got {t.dtype}")
        b, n, d = image_tokens.shape
        if text_embeds.shape[0] != b or text_embeds.shape[2] != d:
            raise RouterInputError(
                f"text_embeds must be (b={b}, l, d={d}) to match image_tokens, got "
                f"{tuple(text_embeds.shape)}"
            )
        for name, m, shape in (("image_mask", image_mask, (b, n)),
                               ("text_mask", text_mask, (b, text_embeds.shape[1]))):
            if m is None:
                continue
            if not isinstance(m, Tensor) or m.dtype != torch.bool:
                kind = m.dtype if isinstance(m, Tensor) else type(m).__name__
                raise RouterInputError(f"{name} must be a bool tensor (True = valid), got {kind}")
            if tuple(m.shape) != shape:
                raise RouterInputError(f"{name} must have shape {shape}, got {tuple(m.shape)}")
        if noise is not None:
            if not isinstance(noise, Tensor) or not noise.dtype.is_floating_point:
                raise RouterInputError("noise must be a floating-point tensor of shape (b, n)")
            if tuple(noise.shape) != (b, n):
                raise RouterInputError(f"noise must have shape {(b, n)}, got {tuple(noise.shape)}")

    def forward(
        self,
        image_tokens: Tensor,
        text_embeds: Tensor,
        *,
        image_mask: Tensor | None = None,
        text_mask: Tensor | None = None,
        gamma: float | None = None,
        noise: Tensor | None = None,
    ) -> RouterOutput:
        """Route ``image_tokens`` (b, n, d) by their similarity to ``text_embeds`` (b, l, d).

        ``image_mask`` (b, n) / ``text_mask`` (b, l) bool, True = valid (None = all valid; masked
        positions may hold anything, NaN included). ``gamma`` overrides the configured γ for this
        call (e.g. a training stage's). ``noise`` (b, n) is added to the scores instead of drawn
        noise, in any mode. Returns :class:`RouterOutput`; no host synchronisation unless
        ``on_empty_text="raise"``. Raises :class:`RouterInputError` on a bad shape, rank, dtype or
        γ, or (``on_empty_text="raise"``) when a sample's question has no valid token.
        """
        self._validate(image_tokens, text_embeds, image_mask, text_mask, noise)
        empty_text = self.empty_text(text_embeds, text_mask)
        scores = pooled_cosine_scores(image_tokens, text_embeds, text_mask=text_mask,
                                      text_pool=self.config.text_pool)
        return self.route_scores(scores, image_mask=image_mask, empty_text=empty_text,
                                 gamma=gamma, noise=noise)

    def empty_text(self, text_embeds: Tensor, text_mask: Tensor | None) -> Tensor:
        """``(b,)`` bool, True where a sample's question has no valid token. Raises
        :class:`RouterInputError` for such a sample when ``on_empty_text="raise"`` (the only case
        that reads a value back from the device)."""
        b = text_embeds.shape[0]
        if text_mask is None:
            empty = torch.full((b,), text_embeds.shape[1] == 0, device=text_embeds.device)
        else:
            empty = ~text_mask.any(dim=1)
        if self.config.on_empty_text == "raise" and bool(empty.any()):
            bad = empty.nonzero().flatten().tolist()
            raise RouterInputError(
                f"text_mask: samples {bad} have no valid question token, so there is nothing to "
                "route by (pass on_empty_text='keep_all' to keep all their image tokens)"
            )
        return empty

    def route_scores(
        self,
        scores: Tensor,
        *,
        image_mask: Tensor | None = None,
        empty_text: Tensor | None = None,
        gamma: float | None = None,
        noise: Tensor | None = None,
    ) -> RouterOutput:
        """Select tokens from already pooled cosine scores ``(b, n)`` (what :meth:`forward`
        computes with :func:`pooled_cosine_scores`; a caller that holds the tokens in another
        layout, e.g. the adapter's packed tiles, scores them there and scatters the scores).

        ``image_mask`` (b, n) bool True = valid; ``empty_text`` (b,) bool marks samples whose
        question is empty (all their valid tokens are kept); ``gamma`` and ``noise`` as in
        :meth:`forward`. Returns :class:`RouterOutput`; no host synchronisation. Raises
        :class:`RouterInputError` on a bad γ. Shapes are not validated here.
        """
        cfg = self.config
        gamma = cfg.gamma if gamma is None else check_gamma(gamma, "gamma")
        b, n = scores.shape
        device = scores.device
        valid = (torch.ones(b, n, dtype=torch.bool, device=device) if image_mask is None
                 else image_mask)
        valid = valid & torch.isfinite(scores)  # a NaN / inf score is never kept (rule 7)
        if cfg.legacy_softmax:
            scores = _masked_softmax(scores / LEGACY_SOFTMAX_TEMPERATURE, valid)
        if noise is not None:
            scores = scores + noise.detach().to(scores.dtype)
        elif self.training and cfg.noise_std > 0:
            scores = scores + torch.randn_like(scores) * cfg.noise_std
        probs = _masked_softmax(scores / cfg.temperature, valid)

        # masked tokens sort after every valid one (p >= 0 > -1); stable: ties keep raster order
        sorted_p, order = torch.sort(torch.where(valid, probs, -1.0), dim=1, descending=True,
                                     stable=True)
        cum = torch.cumsum(sorted_p.clamp_min(0.0), dim=1)
        below = cum < gamma if cfg.crossing == "reach" else cum <= gamma
        count = below.sum(dim=1) + 1  # + 1: the token that crosses γ is kept
        num_valid = valid.sum(dim=1)
        if gamma >= 1.0:
            count = num_valid
        if empty_text is not None:
            count = torch.where(empty_text, num_valid, count)
        count = count.clamp(min=cfg.min_keep, max=cfg.max_keep)
        count = torch.minimum(count, num_valid)

        ranks = rearrange(torch.arange(n, device=device), "n -> 1 n")
        keep_sorted = ranks < count.unsqueeze(1)
        keep_mask = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
        return RouterOutput(keep_mask, count, probs)
