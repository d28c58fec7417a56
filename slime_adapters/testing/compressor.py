"""Float64 loop oracle of the query compressor (:class:`slime_adapters.compressor.QueryCompressor`) and its building blocks (LayerNorm, GELU, 2-D sin-cos positions): slow, obvious and dtype-agnostic.

Tests and benchmarks compare the fast module against it in float64; users who port the component
can hold their version to the same bar. Loops over samples, tiles, heads and tokens are the point:
each formula reads on its own.
"""

from __future__ import annotations

import math as _math

import torch
import torch.nn.functional as _F
from torch import Tensor

__all__ = [
    "gelu_reference",
    "layer_norm_reference",
    "query_compressor_reference",
    "sincos_2d_reference",
    "module_tensors",
]


def layer_norm_reference(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """(x − mean) / sqrt(var + eps) · weight + bias over the last axis (biased variance)."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu_reference(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / _math.sqrt(2.0)))


def sincos_2d_reference(side: int, dim: int, *, ref_side: int | None = None,
                        dtype: torch.dtype = torch.float64) -> Tensor:
    """(side², dim) table, token by token: [sin/cos(col·ω), sin/cos(row·ω)],
    ω_i = 10000^(−4i/dim), coordinates (i + 0.5)·ref_side/side − 0.5 when ``ref_side`` is
    given."""
    quarter = dim // 4
    omega = torch.tensor([1.0 / 10000 ** (i / quarter) for i in range(quarter)],
                         dtype=torch.float64)
    out = torch.zeros(side * side, dim, dtype=torch.float64)

    def coord(i: int) -> float:
        return float(i) if ref_side is None else (i + 0.5) * ref_side / side - 0.5

    for r in range(side):
        for c in range(side):
            col, row = coord(c) * omega, coord(r) * omega
            out[r * side + c] = torch.cat([col.sin(), col.cos(), row.sin(), row.cos()])
    return out.to(dtype)


def module_tensors(module, dtype: torch.dtype) -> dict[str, Tensor]:
    """Parameters (still attached to autograd, so the oracle can be differentiated) and buffers."""
    named = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return {k: v.to(dtype) for k, v in named.items()}


def _compressor_key_pos(module, s: int, dtype: torch.dtype) -> Tensor:
    side, q_side = _math.isqrt(s), _math.isqrt(module.num_queries)
    if module.mode == "reference":
        table = module.pos_embed.detach()
        if side == q_side:
            return table.to(dtype)
        grid = table.to(torch.promote_types(table.dtype, torch.float32))
        grid = grid.reshape(1, q_side, q_side, -1).permute(0, 3, 1, 2)
        out = _F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
        return out.permute(0, 2, 3, 1).reshape(s, -1).to(table.dtype).to(dtype)
    return sincos_2d_reference(side, module.dim, ref_side=q_side, dtype=dtype)


def query_compressor_reference(module, x: Tensor, *,
                               key_mask: Tensor | None = None) -> Tensor:
    """QueryCompressor, one tile and one head at a time, in x's dtype.

    Per tile: drop the padded tokens (``key_mask`` False; True = a valid token), ``kv = LN_kv(kv_proj x)``, keys ``kv + pos``, queries
    ``LN_q(query) + pos_embed``, softmax attention per head, ``out_proj``, ``LN_post``, ``proj``.
    Returns ``(p, num_queries, out_dim)``.
    """
    sd = module_tensors(module, x.dtype)
    eps = module.config.norm_eps
    p, s, _ = x.shape
    h, d = module.num_heads, module.dim
    hd = d // h
    pos_k = _compressor_key_pos(module, s, x.dtype) if module.pos_embed is not None else None
    qry = layer_norm_reference(sd["query"], sd["ln_q.weight"], sd["ln_q.bias"], eps)
    if module.pos_embed is not None:
        qry = qry + sd["pos_embed"]
    out = x.new_zeros(p, module.num_queries, module.out_dim)
    for i in range(p):
        keep = torch.ones(s, dtype=torch.bool) if key_mask is None else key_mask[i].cpu()
        xi = x[i][keep]
        if "kv_proj.weight" in sd:
            xi = xi @ sd["kv_proj.weight"].T
        kv = layer_norm_reference(xi, sd["ln_kv.weight"], sd["ln_kv.bias"], eps)
        keys = kv if pos_k is None else kv + pos_k[keep]
        heads = []
        for j in range(h):
            sl = slice(j * hd, (j + 1) * hd)
            qj = qry @ sd["q_proj.weight"][sl].T + sd["q_proj.bias"][sl]
            kj = keys @ sd["k_proj.weight"][sl].T + sd["k_proj.bias"][sl]
            vj = kv @ sd["v_proj.weight"][sl].T + sd["v_proj.bias"][sl]
            if kj.shape[0] == 0:  # every token padded: no key to attend to
                heads.append(qj.new_zeros(qj.shape[0], hd))
                continue
            scores = qj @ kj.T / _math.sqrt(hd)
            w = torch.exp(scores - scores.max(-1, keepdim=True).values)
            heads.append((w / w.sum(-1, keepdim=True)) @ vj)
        o = torch.cat(heads, -1) @ sd["out_proj.weight"].T + sd["out_proj.bias"]
        o = layer_norm_reference(o, sd["ln_post.weight"], sd["ln_post.bias"], eps)
        if "proj.weight" in sd:
            o = o @ sd["proj.weight"].T + sd["proj.bias"]
        out[i] = o
    return out
