"""QueryCompressor: N_q learnable queries cross-attend to a tile's tokens (SliME §2.2, SPEC §2.2).

Einops legend::

    p  tiles in the batch (all tiles of all images, packed)
    s  tokens per tile (the key grid is √s × √s when 2-D positions are used)
    q  queries (num_queries; a √q × √q grid when 2-D positions are used)
    e  input feature width (kv_dim)      d  model width (dim)      o  output width (out_dim)
    h  heads                             k  head width (d / h)

Forward, for every tile at once (no loop over tiles)::

    kv   = ln_kv(kv_proj(x))                          (p, s, d)   values carry no position
    keys = kv + pos_keys                              (p, s, d)
    qry  = ln_q(query) + pos_embed                    (q, d)      shared by every tile
    out  = out_proj(attention(q_proj(qry), k_proj(keys), v_proj(kv)))   one multi-head layer
    y    = proj(ln_post(out))                         (p, q, o)   proj only when out_dim is set

This is the released resampler (Qwen-VL style) with ``nn.MultiheadAttention`` split into
``q_proj``/``k_proj``/``v_proj``/``out_proj``; the checkpoint importer splits the released
``attn.in_proj_weight`` (3·d × d) into the first three. The query is projected once, not once per
tile (its result is broadcast over the tiles, never copied).

Positions (``pos_embed="sincos2d"``). ``pos_embed`` is a fixed, non-trainable, persistent
**buffer** ``(q, d)`` (the released code keeps a frozen fp16 parameter of the same name; a buffer
keeps it out of optimizers and ZeRO partitioning while the state-dict key stays the same). Keys
get a table for their own √s × √s grid:

* ``mode="paper"``: the same sin-cos function evaluated exactly at the key cells' centres in
  query-grid units (:func:`slime_adapters.layers.sincos_2d` with ``ref_side``), so a query and
  the keys covering the same area of the tile carry matching positions.
* ``mode="reference"``: the released rule, ``pos_embed`` resized bicubically to the key grid
  (identity when the grids are equal); a freshly built table is rounded through float16 as the
  released one was.

Sizes here are checked against the module's configuration only; nothing in ``forward`` branches
on tensor values (the opt-in ``check_finite`` reads one flag back from the device).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from slime_adapters.config import (
    ConfigBase,
    ConfigError,
    ConfigurableMixin,
    check_bool,
    check_choice,
    check_int,
    check_number,
    config_field,
    config_setting,
    refuse_removed_keywords,
)
from slime_adapters.layers import grid_side, interpolate_table_bicubic, sincos_2d
from slime_adapters.ops.attention import BACKENDS, attention

__all__ = ["MODES", "QueryCompressor", "QueryCompressorConfig", "default_num_heads"]

MODES = ("paper", "reference")
POS_EMBEDS = ("sincos2d", "none")
ATTN_BACKENDS = ("auto", *BACKENDS)


def default_num_heads(dim: int) -> int:
    """The released rule: one head per 128 channels, at least one."""
    return max(1, dim // 128)


@dataclasses.dataclass(frozen=True)
class QueryCompressorConfig(ConfigBase):
    """Constructor keywords of :class:`QueryCompressor` (see there); every field is validated
    on construction (:class:`~slime_adapters.config.ConfigError` naming the field)."""

    kind: ClassVar[str] = "query_compressor"

    dim: int = 1024
    num_queries: int = 144
    num_heads: int | None = None
    kv_dim: int | None = None
    out_dim: int | None = None
    pos_embed: str = "sincos2d"
    norm_eps: float = 1e-6
    mode: str = "paper"
    check_finite: bool = False
    attn_backend: str = "auto"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_int(owner, "dim", self.dim, minimum=1)
        check_int(owner, "num_queries", self.num_queries, minimum=1)
        for name in ("num_heads", "kv_dim", "out_dim"):
            check_int(owner, name, getattr(self, name), minimum=1, allow_none=True)
        check_choice(owner, "pos_embed", self.pos_embed, POS_EMBEDS)
        check_number(owner, "norm_eps", self.norm_eps, above=0)
        check_choice(owner, "mode", self.mode, MODES)
        check_bool(owner, "check_finite", self.check_finite)
        check_choice(owner, "attn_backend", self.attn_backend, ATTN_BACKENDS)
        heads = self.heads
        if self.dim % heads:
            raise ConfigError(f"{owner}: num_heads={heads} does not divide dim={self.dim}")
        if self.pos_embed == "sincos2d":
            try:
                grid_side(self.num_queries, "num_queries")
            except ValueError as exc:
                raise ConfigError(f"{owner}: {exc}") from None
            if self.dim % 4:
                raise ConfigError(
                    f"{owner}: dim must be a multiple of 4 for pos_embed='sincos2d', got {self.dim}")

    @property
    def heads(self) -> int:
        """The head count in use (``num_heads``, or the released rule when it is None)."""
        return default_num_heads(self.dim) if self.num_heads is None else self.num_heads


class QueryCompressor(ConfigurableMixin, nn.Module):
    """Compress every tile's ``s`` tokens to ``num_queries`` tokens with one cross-attention layer.

    Args:
        dim: model width ``d`` (queries, attention, LayerNorms).
        num_queries: learnable queries per tile; a perfect square with ``pos_embed="sincos2d"``.
        num_heads: attention heads; ``None`` gives ``max(1, dim // 128)``; must divide ``dim``.
        kv_dim: input width; ``None`` or ``dim`` means no input projection, otherwise ``kv_proj``
            is a bias-free ``Linear(kv_dim, dim)`` (as released).
        out_dim: ``None`` (output width ``dim``, no projection) or the width of a final
            ``proj = Linear(dim, out_dim)`` after ``ln_post`` (the released ``use_post_proj``).
        pos_embed: ``"sincos2d"`` (fixed 2-D sin-cos positions on queries and keys) or ``"none"``.
        norm_eps: LayerNorm epsilon.
        mode: ``"paper"`` or ``"reference"``: how keys get positions (module docstring).
        check_finite: check in ``forward`` that the unpadded input is finite (one device sync).
        attn_backend: ``"auto"``, ``"xformers"``, ``"sdpa"`` or ``"math"``. It and
            ``check_finite`` can be changed after construction (``module.attn_backend = "math"``):
            the change goes into ``module.config``, so a save records what ran.
        device, dtype: where and in which dtype parameters and buffers are created (``"meta"``
            works; call :meth:`reset_parameters` after materialising).

    Raises:
        ConfigError: (a ``ValueError``) an argument is out of range or unknown, ``num_heads``
            does not divide ``dim``, ``num_queries`` is not a square or ``dim`` not a multiple of
            4 while 2-D positions are asked for (see :class:`QueryCompressorConfig`).
    """

    config_class = QueryCompressorConfig

    def __init__(
        self,
        *,
        dim: int = 1024,
        num_queries: int = 144,
        num_heads: int | None = None,
        kv_dim: int | None = None,
        out_dim: int | None = None,
        pos_embed: str = "sincos2d",
        norm_eps: float = 1e-6,
        mode: str = "paper",
        check_finite: bool = False,
        attn_backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = QueryCompressorConfig(
            dim=dim, num_queries=num_queries, num_heads=num_heads, kv_dim=kv_dim,
            out_dim=out_dim, pos_embed=pos_embed, norm_eps=norm_eps, mode=mode,
            check_finite=check_finite, attn_backend=attn_backend,
        )
        cfg = self.config
        dim, kv, out = cfg.dim, self.kv_dim, cfg.out_dim
        fk = {"device": device, "dtype": dtype}
        self.query = nn.Parameter(torch.empty(cfg.num_queries, dim, **fk))
        self.register_buffer("pos_embed", torch.empty(cfg.num_queries, dim, **fk)
                             if self.use_pos else None)
        self.kv_proj = nn.Linear(kv, dim, bias=False, **fk) if kv != dim else nn.Identity()
        self.ln_q = nn.LayerNorm(dim, eps=cfg.norm_eps, **fk)
        self.ln_kv = nn.LayerNorm(dim, eps=cfg.norm_eps, **fk)
        self.q_proj = nn.Linear(dim, dim, **fk)
        self.k_proj = nn.Linear(dim, dim, **fk)
        self.v_proj = nn.Linear(dim, dim, **fk)
        self.out_proj = nn.Linear(dim, dim, **fk)
        self.ln_post = nn.LayerNorm(dim, eps=cfg.norm_eps, **fk)
        self.proj = nn.Linear(dim, out, **fk) if out is not None else nn.Identity()
        self.reset_parameters()

    # ---- settings, read from the config (what is saved is what runs) ----------------------

    dim = config_field("dim", "Model width d.")
    num_queries = config_field("num_queries", "Queries per tile.")
    mode = config_field("mode", '"paper" or "reference".')
    num_heads = property(lambda self: self.config.heads, doc="Attention heads in use.")
    kv_dim = property(lambda self: self.config.kv_dim or self.config.dim, doc="Input width.")
    out_dim = property(lambda self: self.config.out_dim or self.config.dim, doc="Output width.")
    use_pos = property(lambda self: self.config.pos_embed == "sincos2d",
                       doc="Whether 2-D sin-cos positions are used.")
    attn_backend = config_setting("attn_backend", "The attention backend.")
    check_finite = config_setting("check_finite", "Whether ``forward`` checks its input.")

    # ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialise as released: queries trunc-normal(0.02); q/k/v Xavier-uniform over the
        stacked (3·d × d) matrix with zero bias (``nn.MultiheadAttention``'s rule); ``out_proj``
        default Linear init with zero bias; LayerNorms to identity; the fixed position table."""
        nn.init.trunc_normal_(self.query, std=0.02)
        bound = math.sqrt(6.0 / (self.dim + 3 * self.dim))
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(lin.bias)
        self.out_proj.reset_parameters()
        nn.init.zeros_(self.out_proj.bias)
        for mod in (self.kv_proj, self.ln_q, self.ln_kv, self.ln_post, self.proj):
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
        if self.pos_embed is not None:
            table = sincos_2d(grid_side(self.num_queries, "num_queries"), self.dim,
                              dtype=torch.float64)
            if self.mode == "reference":
                table = table.to(torch.float16)  # the released table is a float16 tensor
            self.pos_embed.copy_(table.to(self.pos_embed.device, self.pos_embed.dtype))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_queries={self.num_queries}, num_heads={self.num_heads}, "
                f"mode={self.mode!r}, attn_backend={self.attn_backend!r}")

    def key_positions(self, num_keys: int, *, device=None, dtype=None) -> Tensor:
        """The ``(s, d)`` positions added to the keys of an ``s``-token tile (module docstring).

        Raises:
            ValueError: positions are disabled, or ``num_keys`` is not a perfect square.
        """
        if self.pos_embed is None:
            raise ValueError("key_positions: this compressor was built with pos_embed='none'")
        side = grid_side(num_keys, "the number of tokens per tile (x.shape[1])")
        device = self.pos_embed.device if device is None else device
        dtype = self.pos_embed.dtype if dtype is None else dtype
        if self.mode == "reference":
            return interpolate_table_bicubic(self.pos_embed, side).to(device, dtype)
        q_side = grid_side(self.num_queries, "num_queries")
        return sincos_2d(side, self.dim, ref_side=q_side, device=device, dtype=dtype)

    def _validate(self, x: Tensor, key_mask: Tensor | None) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x must have rank 3 (tiles, tokens, kv_dim={self.kv_dim}), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[-1] != self.kv_dim:
            raise ValueError(f"x has feature width {x.shape[-1]}, expected kv_dim={self.kv_dim}")
        if x.shape[1] == 0:
            raise ValueError("x has no tokens per tile (x.shape[1] == 0): nothing to attend to")
        if not x.dtype.is_floating_point:
            raise ValueError(f"x must be floating point, got {x.dtype}")
        weight = next(self.parameters())
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"{type(self).__name__}: x is {x.dtype} but the module's weights are "
                             f"{weight.dtype}; cast one to the other or run under torch.autocast")
        if key_mask is not None:
            if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool:
                kind = key_mask.dtype if isinstance(key_mask, Tensor) else type(key_mask).__name__
                raise ValueError("key_mask must be a bool tensor (True = a valid token, False = "
                                 f"padding), got {kind}")
            if tuple(key_mask.shape) != tuple(x.shape[:2]):
                raise ValueError(f"key_mask must have shape (tiles, tokens) = "
                                 f"{tuple(x.shape[:2])}, got {tuple(key_mask.shape)}")

    def forward(self, x: Tensor, *, key_mask: Tensor | None = None, **removed: object) -> Tensor:
        """Compress all tiles in one batched call.

        Args:
            x: ``(p, s, kv_dim)`` tile features; ``s`` a perfect square with 2-D positions.
            key_mask: optional ``(p, s)`` bool, **True = a valid token** (transformers'
                ``attention_mask`` convention), False = padding that no query sees; whatever
                padding holds (NaN included) cannot reach the output or the gradients. The former
                ``key_padding_mask`` (True = padding) raises :class:`TypeError` naming this one.

        Returns:
            ``(p, num_queries, out_dim)`` (``dim`` when ``out_dim`` is None), in the
            computation dtype (the input's, or autocast's).

        Raises:
            ValueError: wrong type, rank or width of ``x``; bad ``key_mask``; ``s`` not a
                square with 2-D positions; non-finite unpadded input with ``check_finite``.
        """
        refuse_removed_keywords("QueryCompressor.forward", removed)
        self._validate(x, key_mask)
        if key_mask is not None:
            # zero padding before any arithmetic: a NaN there would poison LayerNorm's backward
            x = x.masked_fill(~key_mask[..., None], 0)
        if self.check_finite:
            bad = ~torch.isfinite(x)
            if bool(bad.any()):
                raise ValueError("x holds NaN or inf outside the padded positions "
                                 "(check_finite=True)")
        p, s, _ = x.shape
        pos_k = self.key_positions(s, device=x.device, dtype=self.query.dtype) if self.use_pos \
            else None

        kv = self.ln_kv(self.kv_proj(x))  # (p, s, d)
        qry = self.ln_q(self.query)
        if self.pos_embed is not None:
            qry = qry + self.pos_embed
        q = self.q_proj(qry)  # (q, d), once for all tiles
        k = self.k_proj(kv if pos_k is None else kv + pos_k)
        v = self.v_proj(kv)
        h, hd = self.num_heads, self.dim // self.num_heads
        out = attention(
            q.reshape(1, self.num_queries, h, hd).expand(p, -1, -1, -1),  # (p, q, h, k)
            k.reshape(p, s, h, hd),
            v.reshape(p, s, h, hd),
            key_mask=key_mask,
            backend=self.attn_backend,
        )
        out = self.out_proj(out.reshape(p, self.num_queries, self.dim))
        return self.proj(self.ln_post(out))
