"""SliMEVisualAdapter: global MoE tokens + compressed, text-routed local tokens, ready for an LLM.

Legend::

    b  images in the batch            s  vision tokens per view (576 for CLIP ViT-L/14-336)
    p  tiles of all images (Σ p_i)    q  queries per tile (n_q, a square: 144 = 12²)
    n  local tokens of an image, laid out on its (rows·√q) × (cols·√q) grid; n_max over the batch
    dv vision width                   dl LLM width          l  question tokens

Per image the output is ``[projected global tokens (s)] + [separator (0 or 1)] + [kept local tokens
in raster order]``. The whole batch runs in one call of each sub-module: all global views through the
projector, all tiles through the compressor and the MLP, then every image's local tokens are
scattered onto a padded ``(b, n_max, dl)`` raster (no loop over images or tiles) and routed together.

The packed output has a data-dependent length, so building it reads the kept counts on the host
once; everything before that runs without a host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from slime_adapters.compressor import QueryCompressor, QueryCompressorConfig
from slime_adapters.config import ConfigBase, ConfigurableMixin
from slime_adapters.projector import MoEOutput, NoisyMoEProjector, NoisyMoEProjectorConfig
from slime_adapters.router import CosineTokenRouter, CosineTokenRouterConfig, RouterOutput

__all__ = [
    "AdapterAux",
    "SliMEVisualAdapter",
    "SliMEVisualAdapterConfig",
    "VisualTokens",
    "local_raster_index",
]

VIEWS = ("global", "local", "both")
SEPARATORS = ("learned", "embedding", "none")
LOCAL_MLPS = ("shared", "own")


@dataclass(frozen=True)
class SliMEVisualAdapterConfig(ConfigBase):
    """Configuration of :class:`SliMEVisualAdapter`; the sub-module configs are nested."""

    kind = "slime_visual_adapter"
    projector: NoisyMoEProjectorConfig = field(default_factory=NoisyMoEProjectorConfig)
    compressor: QueryCompressorConfig = field(default_factory=QueryCompressorConfig)
    router: CosineTokenRouterConfig = field(default_factory=CosineTokenRouterConfig)
    separator: str = "learned"
    local_mlp: str = "shared"
    views: str = "both"


@dataclass
class AdapterAux:
    """What the adapter computed on the way, for losses and logging."""

    moe: MoEOutput | None
    router: RouterOutput | None
    num_local: Tensor | None  # (b,) local tokens offered to the router per image
    num_kept: Tensor | None  # (b,) local tokens kept per image

    @property
    def aux_loss(self) -> Tensor | None:
        return None if self.moe is None else self.moe.aux_loss


@dataclass
class VisualTokens:
    """Visual tokens of a batch of images, packed end to end.

    ``packed`` is ``(Σ n_i, dl)``; image ``i`` owns rows ``cu_seqlens[i]:cu_seqlens[i + 1]``, of
    which the first ``num_global`` are its global tokens, then ``num_separator`` separator rows,
    then its kept local tokens in raster order."""

    packed: Tensor
    lengths: Tensor  # (b,) long
    cu_seqlens: Tensor  # (b + 1,) int32
    num_global: int
    num_separator: int
    aux: AdapterAux

    def split(self) -> list[Tensor]:
        """One ``(n_i, dl)`` tensor per image (a convenience for inspection, not for a hot path)."""
        return list(torch.split(self.packed, self.lengths.tolist()))


def _as_long(x: Tensor | list[int] | tuple[int, ...], name: str, device: torch.device) -> Tensor:
    t = torch.as_tensor(x)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got dtype {t.dtype}")
    return t.to(device=device, dtype=torch.long)


def local_raster_index(grids: Tensor, tokens_side: int) -> tuple[Tensor, Tensor]:
    """Where every local token of every tile lands on its image's raster.

    Args:
        grids: ``(b, 2)`` long ``(cols, rows)`` per image; image ``i`` has ``cols·rows`` tiles in
            row-major order, tiles of all images concatenated in image order.
        tokens_side: ``√q``, the side of a tile's compressed token grid.

    Returns:
        ``(image, position)``, both ``(p·q,)`` long: for the ``j``-th compressed token of tile ``t``
        (flattened as ``t·q + j``) the image it belongs to and its index on that image's
        ``(rows·√q) × (cols·√q)`` raster.
    """
    q_side = tokens_side
    cols, rows = grids[:, 0], grids[:, 1]
    tiles = cols * rows  # (b,)
    image = torch.repeat_interleave(torch.arange(grids.shape[0], device=grids.device), tiles)
    first = torch.cumsum(tiles, 0) - tiles
    k = torch.arange(image.numel(), device=grids.device) - first[image]  # tile index in its image
    c_img = cols[image]
    r, c = k // c_img, k % c_img  # (p,)
    ii = torch.arange(q_side, device=grids.device)
    # row = r·√q + i, col = c·√q + j, position = row · (cols·√q) + col
    row = r[:, None, None] * q_side + ii[None, :, None]  # (p, √q, 1)
    col = c[:, None, None] * q_side + ii[None, None, :]  # (p, 1, √q)
    pos = row * (c_img[:, None, None] * q_side) + col  # (p, √q, √q)
    return image.repeat_interleave(q_side * q_side), pos.reshape(-1)


class SliMEVisualAdapter(ConfigurableMixin, nn.Module):
    """Composes :class:`NoisyMoEProjector`, :class:`QueryCompressor` and :class:`CosineTokenRouter`.

    Args:
        projector: config of the global-view projector (``in_dim`` = vision width, ``out_dim`` =
            LLM width).
        compressor: config of the tile compressor; its output width must equal the projector's
            ``in_dim`` (local tokens go through an MLP from the vision width to the LLM width).
        router: config of the text-guided router.
        separator: ``"learned"`` (a trained vector between global and local tokens), ``"embedding"``
            (the caller passes ``separator_embeds``, e.g. the LLM's embedding of ``","`` as in the
            released code) or ``"none"``. A separator appears only when both views are present.
        local_mlp: ``"shared"`` (compressed tiles go through the projector's ``mlp``, as released)
            or ``"own"`` (a separate MLP of the same shape, ``local_mlp``).
        views: default views: ``"global"``, ``"local"`` or ``"both"``; a stage may override per call.
    """

    config_class = SliMEVisualAdapterConfig

    def __init__(
        self,
        *,
        projector: NoisyMoEProjectorConfig = NoisyMoEProjectorConfig(),
        compressor: QueryCompressorConfig = QueryCompressorConfig(),
        router: CosineTokenRouterConfig = CosineTokenRouterConfig(),
        separator: str = "learned",
        local_mlp: str = "shared",
        views: str = "both",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if separator not in SEPARATORS:
            raise ValueError(f"separator must be one of {SEPARATORS}, got {separator!r}")
        if local_mlp not in LOCAL_MLPS:
            raise ValueError(f"local_mlp must be one of {LOCAL_MLPS}, got {local_mlp!r}")
        if views not in VIEWS:
            raise ValueError(f"views must be one of {VIEWS}, got {views!r}")
        comp_out = compressor.out_dim or compressor.dim
        if comp_out != projector.in_dim:
            raise ValueError(
                f"compressor output width ({comp_out}) must equal the projector's in_dim "
                f"({projector.in_dim}): compressed tiles go through the projector's MLP"
            )
        side = int(round(compressor.num_queries ** 0.5))
        if side * side != compressor.num_queries:
            raise ValueError(
                f"compressor.num_queries must be a perfect square to lay tiles out on a grid, "
                f"got {compressor.num_queries}"
            )
        self.config = SliMEVisualAdapterConfig(
            projector=projector, compressor=compressor, router=router, separator=separator,
            local_mlp=local_mlp, views=views,
        )
        factory = {"device": device, "dtype": dtype}
        self.projector = NoisyMoEProjector.from_config(projector, **factory)
        self.compressor = QueryCompressor.from_config(compressor, **factory)
        self.router = CosineTokenRouter.from_config(router, **factory)
        self.local_mlp = (
            nn.Sequential(
                nn.Linear(projector.in_dim, projector.out_dim, **factory),
                nn.GELU(),
                nn.Linear(projector.out_dim, projector.out_dim, **factory),
            )
            if local_mlp == "own"
            else None
        )
        self.separator = (
            nn.Parameter(torch.empty(projector.out_dim, **factory)) if separator == "learned" else None
        )
        self.tokens_side = side
        self.reset_separator()

    def reset_separator(self) -> None:
        if self.separator is not None and not self.separator.is_meta:
            nn.init.normal_(self.separator, std=0.02)

    @property
    def llm_dim(self) -> int:
        return self.config.projector.out_dim

    # ------------------------------------------------------------------------------------- paths

    def encode_local(self, tile_features: Tensor) -> Tensor:
        """``(p, s, dv)`` tile features → ``(p, q, dl)`` compressed, projected local tokens."""
        mlp = self.projector.mlp if self.local_mlp is None else self.local_mlp
        return mlp(self.compressor(tile_features))

    def local_raster(self, local: Tensor, grids: Tensor) -> tuple[Tensor, Tensor]:
        """Scatter ``(p, q, dl)`` tokens onto a padded ``(b, n_max, dl)`` raster plus its validity
        mask ``(b, n_max)``. ``n_max`` comes from ``grids`` (read on the host when on a GPU)."""
        tiles = grids[:, 0] * grids[:, 1]
        n_max = int(tiles.max()) * self.tokens_side**2 if grids.shape[0] else 0
        image, pos = local_raster_index(grids, self.tokens_side)
        raster = local.new_zeros(grids.shape[0], n_max, local.shape[-1])
        raster = raster.index_put((image, pos), local.reshape(-1, local.shape[-1]))
        mask = torch.zeros(grids.shape[0], n_max, dtype=torch.bool, device=local.device)
        mask = mask.index_put((image, pos), torch.ones((), dtype=torch.bool, device=local.device))
        return raster, mask

    # ----------------------------------------------------------------------------------- forward

    def forward(
        self,
        global_features: Tensor | None,
        tile_features: Tensor | None = None,
        *,
        grids: Tensor | list[tuple[int, int]] | None = None,
        tiles_per_image: Tensor | list[int] | None = None,
        text_embeds: Tensor | None = None,
        text_mask: Tensor | None = None,
        separator_embeds: Tensor | None = None,
        views: str | None = None,
        force_expert: int | None = None,
        router_gamma: float | None = None,
    ) -> VisualTokens:
        """Visual tokens for a batch of ``b`` images.

        Args:
            global_features: ``(b, s, dv)`` vision features of the global views (needed unless
                ``views="local"``).
            tile_features: ``(p, s, dv)`` vision features of all tiles, image after image, each
                image's tiles in row-major order (needed unless ``views="global"``).
            grids: ``(b, 2)`` ``(cols, rows)`` of each image's tile grid.
            tiles_per_image: optional ``(b,)``; checked against ``cols·rows`` when given.
            text_embeds: ``(b, l, dl)`` LLM embeddings of each image's question, for the router.
                May be omitted only when the router keeps everything (γ ≥ 1).
            text_mask: ``(b, l)`` bool, True for valid question tokens.
            separator_embeds: ``(dl,)`` or ``(b, dl)``, required when ``separator="embedding"``.
            views: overrides the configured views for this call (a training stage's views).
            force_expert: passed to the projector (0 = MLP expert only, 1 = query expert only).
            router_gamma: overrides the router's γ for this call.

        Returns:
            :class:`VisualTokens`.

        Raises:
            ValueError: a missing input for the requested views, or shapes that do not agree.
        """
        views = self.config.views if views is None else views
        if views not in VIEWS:
            raise ValueError(f"views must be one of {VIEWS}, got {views!r}")
        use_global, use_local = views != "local", views != "global"
        dl = self.llm_dim

        batch = None
        if use_global:
            if global_features is None:
                raise ValueError(f"views={views!r} needs global_features (b, s, dv)")
            if global_features.dim() != 3:
                raise ValueError(
                    f"global_features must be (b, s, dv), got shape {tuple(global_features.shape)}"
                )
            batch = global_features.shape[0]
        if use_local:
            if tile_features is None or grids is None:
                raise ValueError(f"views={views!r} needs tile_features (p, s, dv) and grids (b, 2)")
            device = tile_features.device
            grids_t = _as_long(grids, "grids", device)
            if grids_t.dim() != 2 or grids_t.shape[1] != 2:
                raise ValueError(f"grids must be (b, 2) as (cols, rows), got {tuple(grids_t.shape)}")
            if (grids_t < 0).any():
                raise ValueError("grids must hold non-negative (cols, rows); (0, 0) = no tiles")
            if batch is not None and grids_t.shape[0] != batch:
                raise ValueError(
                    f"grids describe {grids_t.shape[0]} images but global_features has {batch}"
                )
            batch = grids_t.shape[0]
            tiles = grids_t[:, 0] * grids_t[:, 1]
            if tiles_per_image is not None:
                tpi = _as_long(tiles_per_image, "tiles_per_image", device)
                if tpi.shape != tiles.shape or not torch.equal(tpi, tiles):
                    raise ValueError(
                        f"tiles_per_image {tpi.tolist()} disagrees with the grids' cols·rows "
                        f"{tiles.tolist()}"
                    )
            if tile_features.dim() != 3:
                raise ValueError(
                    f"tile_features must be (p, s, dv), got shape {tuple(tile_features.shape)}"
                )
            total = int(tiles.sum())
            if tile_features.shape[0] != total:
                raise ValueError(
                    f"tile_features has {tile_features.shape[0]} tiles but the grids need {total}"
                )

        parts: list[Tensor] = []  # each (b, k, dl)
        keep_parts: list[Tensor] = []  # each (b, k) bool
        moe = routed = num_local = None
        if use_global:
            moe = self.projector(global_features, force_expert=force_expert)
            parts.append(moe.tokens)
            keep_parts.append(torch.ones(moe.tokens.shape[:2], dtype=torch.bool,
                                         device=moe.tokens.device))
        num_sep = 0
        if use_global and use_local and self.config.separator != "none":
            sep = self._separator(batch, separator_embeds, parts[0])
            parts.append(sep[:, None, :])
            keep_parts.append(torch.ones(batch, 1, dtype=torch.bool, device=sep.device))
            num_sep = 1
        if use_local:
            local = self.encode_local(tile_features)  # (p, q, dl); p may be 0
            raster, valid = self.local_raster(local, grids_t)
            num_local = valid.sum(1)
            routed = self._route(raster, valid, text_embeds, text_mask, router_gamma)
            parts.append(raster)
            keep_parts.append(routed.keep_mask)

        tokens = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        keep = torch.cat(keep_parts, dim=1) if len(keep_parts) > 1 else keep_parts[0]
        packed = tokens[keep]  # row-major: image after image, each in layout order
        lengths = keep.sum(1)
        cu = torch.zeros(batch + 1, dtype=torch.int32, device=packed.device)
        cu[1:] = torch.cumsum(lengths, 0)
        aux = AdapterAux(moe=moe, router=routed, num_local=num_local,
                         num_kept=None if routed is None else routed.num_kept)
        return VisualTokens(packed, lengths, cu, moe.tokens.shape[1] if moe is not None else 0,
                            num_sep, aux)

    def _separator(self, batch: int, separator_embeds: Tensor | None, like: Tensor) -> Tensor:
        if self.config.separator == "learned":
            return self.separator.to(like.dtype).expand(batch, -1)
        if separator_embeds is None:
            raise ValueError(
                'separator="embedding" needs separator_embeds: (dl,) or (b, dl), e.g. the LLM\'s '
                'embedding of ","'
            )
        sep = separator_embeds.to(like.dtype)
        if sep.shape not in ((self.llm_dim,), (batch, self.llm_dim)):
            raise ValueError(
                f"separator_embeds must be ({self.llm_dim},) or ({batch}, {self.llm_dim}), "
                f"got {tuple(sep.shape)}"
            )
        return sep.expand(batch, -1)

    def _route(
        self,
        raster: Tensor,
        valid: Tensor,
        text_embeds: Tensor | None,
        text_mask: Tensor | None,
        gamma: float | None,
    ) -> RouterOutput:
        gamma_eff = self.router.config.gamma if gamma is None else gamma
        if text_embeds is None:
            if gamma_eff < 1.0:
                raise ValueError(
                    f"the local view with router gamma={gamma_eff} needs text_embeds (b, l, dl) "
                    "of the question; pass router_gamma=1.0 to keep every local token"
                )
            # γ ≥ 1 keeps every valid token whatever the scores, so no question is needed.
            count = valid.sum(1)
            scores = valid.float() / count.clamp(min=1)[:, None].float()
            return RouterOutput(keep_mask=valid, num_kept=count, scores=scores)
        return self.router(raster, text_embeds, image_mask=valid, text_mask=text_mask,
                           gamma=gamma)

