"""SliMEVisualAdapter: global MoE tokens + compressed, text-routed local tokens, ready for an LLM.

Legend::

    b  images in the batch            s  vision tokens per view (576 for CLIP ViT-L/14-336)
    p  tiles of all images (Σ p_i)    q  queries per tile (n_q, a square: 144 = 12²)
    n  local tokens of an image, laid out on its (rows·√q) × (cols·√q) grid; n_max over the batch
    dv vision width                   dl LLM width          l  question tokens

Per image the output is ``[projected global tokens (s)] + [separator (0 or 1)] + [kept local tokens
in raster order]``. The whole batch runs in one call of each sub-module: all global views through the
projector, all tiles through the compressor and the MLP; the local tokens stay packed as
``(p, q, dl)``: only their router scores are scattered onto a padded ``(b, n_max)`` raster (no loop
over images or tiles), routed together, and every output row is written once into the packed
result (no concatenation, no boolean compaction, no token raster).

Grids are checked and turned into indices on the host. The packed output has a data-dependent
length, so building it reads the total kept count on the host once; everything before that runs
without a host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slime_adapters.adapter_config import SliMEVisualAdapterConfig
from slime_adapters.compressor import QueryCompressor, QueryCompressorConfig
from slime_adapters.config import ConfigurableMixin
from slime_adapters.layers import mlp
from slime_adapters.projector import MoEOutput, NoisyMoEProjector, NoisyMoEProjectorConfig
from slime_adapters.router import CosineTokenRouter, CosineTokenRouterConfig, RouterOutput, check_gamma
from slime_adapters.router_scores import cosine_scores_to, pooled_text_direction
from slime_adapters.selectors import build_router, select_packed
from slime_adapters.schedule.roles import RoleSpec
from slime_adapters.slicing.plan import VIEWS

__all__ = [
    "AdapterAux",
    "SliMEVisualAdapter",
    "SliMEVisualAdapterConfig",
    "VisualTokens",
    "local_raster_index",
]  # SliMEVisualAdapterConfig lives in slime_adapters.adapter_config (re-exported here)

_HOST = torch.device("cpu")


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
        router: config of the router or of a baseline selector (:mod:`slime_adapters.selectors`).
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
        self._config = SliMEVisualAdapterConfig(
            projector=projector, compressor=compressor, router=router, separator=separator,
            local_mlp=local_mlp, views=views,
        )
        cfg = self._config
        factory = {"device": device, "dtype": dtype}
        self.projector = NoisyMoEProjector.from_config(cfg.projector, **factory)
        self.compressor = QueryCompressor.from_config(cfg.compressor, **factory)
        self.router = build_router(cfg.router, **factory)
        out = cfg.projector.out_dim
        self.local_mlp = mlp(cfg.projector.in_dim, out, **factory) if local_mlp == "own" else None
        self.separator = (nn.Parameter(torch.empty(out, **factory)) if separator == "learned"
                          else None)
        self.tokens_side = int(round(cfg.compressor.num_queries ** 0.5))
        self.reset_parameters()

    @property
    def config(self) -> SliMEVisualAdapterConfig:
        """The adapter's config, with the sub-modules' configs as they are now (a setting changed
        on a sub-module, e.g. ``adapter.projector.force_expert = 0``, shows here and is saved)."""
        return self._config.replace(projector=self.projector.config,
                                    compressor=self.compressor.config, router=self.router.config)

    @property
    def views(self) -> str:
        """The default views; setting it updates ``config`` (validated)."""
        return self._config.views

    @views.setter
    def views(self, value: str) -> None:
        self._config = self._config.replace(views=value)

    def roles(self) -> dict[str, RoleSpec]:
        """The paper's training roles over this adapter, covering every parameter exactly once.

        ``mlp_expert``: the projector's MLP and the learned separator (both map into the LLM
        space; the separator trains in the stages that train the projector's MLP and in the
        joint stage); ``query_expert``: the projector's query expert (and its own MLP);
        ``gate``: the projector's gate and noise weights; ``compressor``: the tile compressor and
        the own local MLP (``local_mlp="own"``). The router has no parameters.
        """
        return {
            "mlp_expert": RoleSpec(self, ("projector.mlp", "separator")),
            "query_expert": RoleSpec(self, ("projector.query_expert", "projector.query_mlp")),
            "gate": RoleSpec(self, ("projector.w_gate", "projector.w_noise")),
            "compressor": RoleSpec(self, ("compressor", "local_mlp")),
        }

    def reset_parameters(self) -> None:
        """(Re-)initialise the adapter's own parameter, the learned separator (normal, std 0.02).

        The sub-modules reset their own; after building on the meta device and ``to_empty()``,
        call ``reset_parameters()`` on every module that has one, this one included."""
        if self.separator is not None and not self.separator.is_meta:
            nn.init.normal_(self.separator, std=0.02)

    @property
    def llm_dim(self) -> int:
        return self.projector.out_dim

    # ------------------------------------------------------------------------------------- paths

    def encode_local(self, tile_features: Tensor) -> Tensor:
        """``(p, s, dv)`` tile features → ``(p, q, dl)`` compressed, projected local tokens."""
        mlp = self.projector.mlp if self.local_mlp is None else self.local_mlp
        return mlp(self.compressor(tile_features))

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
        tile_saliency: Tensor | None = None,
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
            router_gamma: overrides the router's γ for this call (a selector: None or 1.0 only).
            tile_saliency: ``(p, q)``/``(p, s)`` tile saliency, for a ``SaliencySelector`` only.

        Returns:
            :class:`VisualTokens`.

        Raises:
            ValueError: a missing input for the requested views, or shapes that do not agree.
        """
        views = self._config.views if views is None else views
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
            # grids are checked and turned into indices on the host: no device synchronisation
            # (a CUDA tensor passed by the caller is copied back once)
            grids_h = _as_long(grids, "grids", _HOST)
            if grids_h.dim() != 2 or grids_h.shape[1] != 2:
                raise ValueError(f"grids must be (b, 2) as (cols, rows), got {tuple(grids_h.shape)}")
            if (grids_h < 0).any():
                raise ValueError("grids must hold non-negative (cols, rows); (0, 0) = no tiles")
            if batch is not None and grids_h.shape[0] != batch:
                raise ValueError(
                    f"grids describe {grids_h.shape[0]} images but global_features has {batch}"
                )
            batch = grids_h.shape[0]
            tiles = grids_h[:, 0] * grids_h[:, 1]
            if tiles_per_image is not None:
                tpi = _as_long(tiles_per_image, "tiles_per_image", _HOST)
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

        moe = routed = num_local = local = None
        if use_global:
            moe = self.projector(global_features, force_expert=force_expert)
        num_sep = 1 if use_global and use_local and self._config.separator != "none" else 0
        num_global = moe.tokens.shape[1] if moe is not None else 0
        base = num_global + num_sep  # rows of every image before its local tokens
        if not use_local:
            packed = moe.tokens.reshape(-1, dl)
            lengths = torch.full((batch,), base, dtype=torch.long, device=packed.device)
            cu = torch.arange(batch + 1, dtype=torch.int32, device=packed.device) * base
            aux = AdapterAux(moe=moe, router=None, num_local=None, num_kept=None)
            return VisualTokens(packed, lengths, cu, num_global, 0, aux)

        local = self.encode_local(tile_features)  # (p, q, dl); p may be 0
        q_tokens = self.tokens_side**2
        n_max = int(tiles.max()) * q_tokens if batch else 0
        image_h, pos_h = local_raster_index(grids_h, self.tokens_side)
        valid_h = torch.zeros(batch, n_max, dtype=torch.bool)
        valid_h[image_h, pos_h] = True
        # pageable host → device copies are staged at once: non_blocking never reads stale data
        image = image_h.to(device, non_blocking=True)
        pos = pos_h.to(device, non_blocking=True)
        valid = valid_h.to(device, non_blocking=True)
        num_local = (tiles * q_tokens).to(device, non_blocking=True)
        if isinstance(self.router, CosineTokenRouter) and tile_saliency is None:
            routed = self._route_local(local, image, pos, valid, text_embeds, text_mask,
                                       router_gamma)
        else:  # a baseline selector, on each image's (rows, cols) token raster
            routed = select_packed(self.router, local, image, pos, valid,
                                   grids_h.flip(1) * self.tokens_side, text_embeds, text_mask,
                                   router_gamma, tile_saliency)

        # Every row is written once into one buffer of b·base + p·q rows: image i's global
        # tokens, separator and kept local tokens (raster order) at cu[i]:cu[i+1], the dropped
        # local tokens after cu[b]; the packed output is its first cu[b] rows. No concatenation,
        # no boolean compaction, no (b, n_max, dl) raster of the tokens themselves.
        lengths = base + routed.num_kept
        cu = torch.zeros(batch + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(lengths, 0)
        starts = cu[:-1].long()
        flat = local.reshape(-1, dl)
        out = flat.new_zeros(batch * base + flat.shape[0], dl)
        if moe is not None:
            rows = starts[:, None] + torch.arange(num_global, device=device)
            out.index_copy_(0, rows.reshape(-1), moe.tokens.reshape(-1, dl).to(out.dtype))
        if num_sep:
            sep = self._separator(batch, separator_embeds, out)
            out.index_copy_(0, starts + num_global, sep.to(out.dtype))
        keep = routed.keep_mask
        kept_before = torch.cumsum(keep, 1) - keep.long()  # kept tokens earlier on the raster
        kept = keep[image, pos]
        dropped_before = torch.cumsum(~kept, 0) - (~kept).long()
        dest = torch.where(kept, starts[image] + base + kept_before[image, pos],
                           cu[-1].long() + dropped_before)
        out.index_copy_(0, dest, flat)
        total = int(cu[-1])  # the one host synchronisation: the packed length is data-dependent
        aux = AdapterAux(moe=moe, router=routed, num_local=num_local, num_kept=routed.num_kept)
        return VisualTokens(out[:total], lengths, cu, num_global, num_sep, aux)

    def _separator(self, batch: int, separator_embeds: Tensor | None, like: Tensor) -> Tensor:
        if self._config.separator == "learned":
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

    def _route_local(
        self,
        local: Tensor,
        image: Tensor,
        pos: Tensor,
        valid: Tensor,
        text_embeds: Tensor | None,
        text_mask: Tensor | None,
        gamma: float | None,
    ) -> RouterOutput:
        """Route the local tokens of every image on its raster. The tokens stay packed
        ``(p, q, dl)``: only their scalar scores are scattered onto the ``(b, n_max)`` raster."""
        gamma_eff = self.router.config.gamma if gamma is None else check_gamma(gamma,
                                                                                "router_gamma")
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
        b, n_max = valid.shape
        dl = local.shape[-1]
        # the router's own checks of the question against a (b, ·, dl) stand-in for the tokens
        self.router._validate(local.new_empty(b, 0, dl), text_embeds, None, text_mask, None)
        empty = self.router.empty_text(text_embeds, text_mask)
        work = torch.promote_types(torch.promote_types(local.dtype, text_embeds.dtype),
                                   torch.float32)
        direction = pooled_text_direction(text_embeds, text_mask=text_mask,
                                          text_pool=self.router.config.text_pool, dtype=work)
        token_scores = cosine_scores_to(local.reshape(-1, dl), direction, image)
        scores = token_scores.new_zeros(b, n_max).index_put((image, pos), token_scores)
        return self.router.route_scores(scores, image_mask=valid, empty_text=empty, gamma=gamma)
