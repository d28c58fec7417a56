"""Plain, loop-based oracles for every component: slow, obvious and dtype-agnostic.

Tests and benchmarks compare the fast modules against these in float64. Nothing here is meant to
be fast: loops over samples, sequences and tokens are the point, since they make each formula
readable on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["attention_reference"]


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    seqlens: Sequence[int] | None = None,
    kv_seqlens: Sequence[int] | None = None,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """softmax(q·kᵀ·scale)·v per batch element, per packed sequence and per head, in q's dtype.

    Layout ``(b, m, h, k)`` as :func:`slime_adapters.ops.attention.attention`. Padded keys
    (``key_padding_mask`` True) are dropped before the product, so whatever they hold cannot
    reach the output; a query with no key left gets zeros.
    """
    b, m, h, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    out = q.new_zeros(b, m, h, v.shape[-1])
    if seqlens is not None:
        kv_seqlens = list(seqlens) if kv_seqlens is None else list(kv_seqlens)
        q0 = k0 = 0
        for lq, lk in zip(list(seqlens), kv_seqlens):
            if lq and lk:
                out[0, q0:q0 + lq] = attention_reference(
                    q[:, q0:q0 + lq], k[:, k0:k0 + lk], v[:, k0:k0 + lk], scale=scale
                )[0]
            q0, k0 = q0 + lq, k0 + lk
        return out
    for i in range(b):
        keep = slice(None) if key_padding_mask is None else ~key_padding_mask[i]
        ki, vi = k[i][keep], v[i][keep]  # (n', h, d)
        if ki.shape[0] == 0:
            continue
        for j in range(h):
            scores = (q[i, :, j] @ ki[:, j].T) * scale  # (m, n')
            out[i, :, j] = torch.softmax(scores, dim=-1) @ vi[:, j]
    return out


# ---- adapter (QueryCompressor, NoisyMoEProjector) oracles ----
# Loops over tiles / views, heads and experts with every formula written out (LayerNorm, GELU,
# softmax, sin-cos); only matrix products and, for the released bicubic key positions,
# F.interpolate itself are borrowed from torch. They read a module's parameters and config, never
# its methods.

__all__ += [
    "layer_norm_reference",
    "noisy_moe_reference",
    "query_compressor_reference",
    "sincos_2d_reference",
]

import math as _math  # noqa: E402

import torch.nn.functional as _F  # noqa: E402


def layer_norm_reference(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """(x − mean) / sqrt(var + eps) · weight + bias over the last axis (biased variance)."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _gelu_reference(x: Tensor) -> Tensor:
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


def _tensors(module, dtype: torch.dtype) -> dict[str, Tensor]:
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
                               key_padding_mask: Tensor | None = None) -> Tensor:
    """QueryCompressor, one tile and one head at a time, in x's dtype.

    Per tile: drop the padded tokens, ``kv = LN_kv(kv_proj x)``, keys ``kv + pos``, queries
    ``LN_q(query) + pos_embed``, softmax attention per head, ``out_proj``, ``LN_post``, ``proj``.
    Returns ``(p, num_queries, out_dim)``.
    """
    sd = _tensors(module, x.dtype)
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
        keep = torch.ones(s, dtype=torch.bool) if key_padding_mask is None \
            else ~key_padding_mask[i].cpu()
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


def _mlp_reference(sd: dict, prefix: str, x: Tensor) -> Tensor:
    hid = _gelu_reference(x @ sd[f"{prefix}.0.weight"].T + sd[f"{prefix}.0.bias"])
    return hid @ sd[f"{prefix}.2.weight"].T + sd[f"{prefix}.2.bias"]


def noisy_moe_reference(module, x: Tensor, *, force_expert: int | None = None,
                        noise_sample: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """NoisyMoEProjector view by view with two separate expert outputs (no W2 fusion).

    Training mode needs ``noise_sample`` (b, s, 2): the oracle draws no random numbers.
    Returns ``(tokens (b, s, out_dim), gates (b, s, 2), aux_loss)`` in x's dtype.
    """
    sd = _tensors(module, x.dtype)
    expert = module.force_expert if force_expert is None else force_expert
    q_prefix = "mlp" if module.query_mlp is None else "query_mlp"
    b, s, _ = x.shape
    tokens = x.new_zeros(b, s, module.out_dim)
    gates = x.new_zeros(b, s, 2)
    for i in range(b):
        if expert == 1:
            g = x.new_tensor([0.0, 1.0]).expand(s, 2)
        elif expert == 0:
            g = x.new_tensor([1.0, 0.0]).expand(s, 2)
        else:
            logits = x[i] @ sd["w_gate"]
            if module.training:
                if noise_sample is None:
                    raise ValueError("noisy_moe_reference: training mode needs noise_sample")
                raw = x[i] @ sd["w_noise"] if module.noise == "learned" else logits
                scale = torch.log1p(torch.exp(raw))
                if module.noise == "reference":
                    scale = scale + 0.01
                logits = logits + noise_sample[i].to(x.dtype) * scale
            e = torch.exp(logits - logits.max(-1, keepdim=True).values)
            g = e / e.sum(-1, keepdim=True)
            if module.mode == "reference":
                g = g / (g.sum(-1, keepdim=True) + 1e-6)
        gates[i] = g
        out = x.new_zeros(s, module.out_dim)
        if expert != 1:
            out = out + g[:, :1] * _mlp_reference(sd, "mlp", x[i])
        if expert != 0:
            q = query_compressor_reference(module.query_expert, x[i:i + 1])[0]
            out = out + g[:, 1:] * _mlp_reference(sd, q_prefix, q)
        tokens[i] = out
    aux = x.new_zeros(())
    if module.balance_loss_coef > 0 and expert is None:
        mean = gates.mean(dim=(0, 1))
        aux = module.balance_loss_coef * 2 * (mean[0] ** 2 + mean[1] ** 2)
    return tokens, gates, aux

# ---- router oracles ----

__all__ += ["router_reference", "router_reference_released"]


def router_reference(
    image_tokens: Tensor,
    text_embeds: Tensor,
    *,
    image_mask: Tensor | None = None,
    text_mask: Tensor | None = None,
    gamma: float = 0.95,
    noise: Tensor | None = None,
    text_pool: str = "mean",
    temperature: float = 1.0,
    min_keep: int = 1,
    max_keep: int | None = None,
    legacy_softmax: bool = False,
    crossing: str = "reach",
    on_empty_text: str = "keep_all",
) -> tuple[Tensor, Tensor]:
    """:class:`~slime_adapters.router.CosineTokenRouter`'s rule, one image and one token at a time.

    Per image: drop the masked tokens, take the full (n', l') cosine matrix by broadcasting (the
    released code's math), pool it over the question, optionally apply the legacy softmax(·/0.5),
    add ``noise``, softmax(·/temperature), then walk the tokens by descending probability (lower
    index first on ties) adding probabilities until the sum reaches (``"reach"``: ≥) or exceeds
    (``"exceed"``: >) γ. Returns ``(keep_mask (b, n) bool, probs (b, n))`` in the input dtype.
    Raises ValueError for an empty question when ``on_empty_text="raise"``.
    """
    b, n, _ = image_tokens.shape
    dtype = torch.promote_types(image_tokens.dtype, text_embeds.dtype)
    keep = torch.zeros(b, n, dtype=torch.bool, device=image_tokens.device)
    probs_out = torch.zeros(b, n, dtype=dtype, device=image_tokens.device)
    for i in range(b):
        img_ok = [True] * n if image_mask is None else image_mask[i].tolist()
        txt_ok = [True] * text_embeds.shape[1] if text_mask is None else text_mask[i].tolist()
        img_idx = [j for j in range(n) if img_ok[j]]
        txt_idx = [j for j in range(text_embeds.shape[1]) if txt_ok[j]]
        if not txt_idx and on_empty_text == "raise":
            raise ValueError(f"sample {i} has no valid question token")
        if not img_idx:
            continue
        v = image_tokens[i, img_idx].to(dtype)
        if txt_idx:
            e = text_embeds[i, txt_idx].to(dtype)
            sim = torch.nn.functional.cosine_similarity(v[:, None, :], e[None, :, :], dim=-1)
            s = sim.sum(dim=1) if text_pool == "sum" else sim.mean(dim=1)
        else:
            s = v.new_zeros(len(img_idx))
        if legacy_softmax:
            s = torch.softmax(s / 0.5, dim=0)
        if noise is not None:
            s = s + noise[i, img_idx].to(dtype)
        p = torch.softmax(s / temperature, dim=0)
        p_list = p.tolist()
        order = sorted(range(len(img_idx)), key=lambda j: (-p_list[j], j))
        if gamma >= 1.0 or not txt_idx:
            count = len(img_idx)
        else:
            count, total = 0, 0.0
            for j in order:
                total += p_list[j]
                count += 1
                if (total >= gamma) if crossing == "reach" else (total > gamma):
                    break
        count = max(count, min_keep)
        if max_keep is not None:
            count = min(count, max_keep)
        count = min(count, len(img_idx))
        for j in order[:count]:
            keep[i, img_idx[j]] = True
        probs_out[i, img_idx] = p
    return keep, probs_out


def router_reference_released(
    local_features: Tensor,
    text_embedding: Tensor,
    attn_mask: Tensor | None,
    *,
    topp: float,
    temperature: float = 1.0,
    legacy_softmax: bool = False,
    noise: Tensor | None = None,
) -> Tensor:
    """The released SliME router for ONE image, as its code computes it (our transcription).

    ``local_features`` (n, d), ``text_embedding`` (l, d), ``attn_mask`` (l,) (True/1 = valid).
    Released code: ``TextGuidedRouterCosine`` then ``TextGuidedSampler.forward`` in
    ``llava/model/multimodal_resampler/builder.py``. The (n, l) cosine matrix is built by
    broadcasting to (n, l, d); with a mask (always given by ``encode_images``, whose text is every
    non-padding prompt token except the image placeholders: system prompt, question and, in
    training, the answer) masked entries are zeroed and the rest **summed**, else averaged. Commit
    e008540 then applied ``softmax(scores / 0.5)`` (the legacy softmax, commented out in later
    commits); training adds ``randn * 0.1`` (here: ``noise``); then softmax(·/temp), an (unstable)
    descending sort, a cumsum, and the kept count is ``(cumsum <= topp).sum() + 1`` capped at n.
    Returns the kept indices, ascending.
    """
    sim = torch.nn.functional.cosine_similarity(
        local_features.unsqueeze(1), text_embedding.unsqueeze(0), dim=-1
    )
    if attn_mask is not None:
        s = sim.masked_fill(~attn_mask.bool().unsqueeze(0), 0.0).sum(dim=-1)
    else:
        s = sim.mean(dim=-1)
    if legacy_softmax:
        s = torch.softmax(s / 0.5, dim=-1)
    if noise is not None:
        s = s + noise
    p = torch.softmax(s / temperature, dim=-1)
    sorted_p, sorted_idx = torch.sort(p, descending=True)
    cum = torch.cumsum(sorted_p, dim=0)
    count = int((cum <= topp).sum())
    if count < sorted_idx.numel():
        selected = sorted_idx[:count + 1]
    else:
        selected = torch.arange(sorted_idx.numel(), device=sorted_idx.device)
    return selected.sort().values

# ---- slicing oracles ----
__all__ += ["slice_image_reference"]


def slice_image_reference(
    rgb,
    plan,
    *,
    global_view: str,
    fill: tuple[int, int, int],
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[Tensor, Tensor]:
    """The slicer's rendering, the slow obvious way, in float64: ``(global_view, tiles)``.

    ``rgb`` is an RGB PIL image (already decoded and oriented), ``plan`` its
    :class:`~slime_adapters.slicing.SlicePlan`. Builds the canvas with PIL (new + paste), crops
    each tile with ``Image.crop`` in a row-major loop, and normalises every pixel
    ``(x/255 − mean)/std`` in float64. Global view ``"pad"``: the image resized so its longer side
    is the tile size (rounded half up), centred on a fill square; ``"resize"``: stretched.
    Returns ``(3, t, t)`` and ``(p, 3, t, t)`` float64 tensors.
    """
    import numpy as np
    from PIL import Image

    t = plan.tile_size
    bicubic = Image.Resampling.BICUBIC

    def normalise(image) -> Tensor:
        pixels = np.asarray(image, dtype=np.float64) / 255.0  # (t, t, 3)
        out = torch.empty(3, t, t, dtype=torch.float64)
        for ch in range(3):
            out[ch] = torch.from_numpy((pixels[:, :, ch] - mean[ch]) / std[ch])
        return out

    canvas = Image.new("RGB", plan.canvas_size, fill)
    canvas.paste(rgb.resize(plan.resized_size, bicubic), plan.offset)
    cols, rows = plan.grid
    tiles = []
    for r in range(rows):
        for c in range(cols):
            tiles.append(normalise(canvas.crop((c * t, r * t, (c + 1) * t, (r + 1) * t))))

    if global_view == "resize":
        view = rgb.resize((t, t), bicubic)
    else:
        w, h = rgb.size
        longer = max(w, h)
        size = (max(1, round(w * t / longer + 1e-9)), max(1, round(h * t / longer + 1e-9)))
        view = Image.new("RGB", (t, t), fill)
        view.paste(rgb.resize(size, bicubic), ((t - size[0]) // 2, (t - size[1]) // 2))
    return normalise(view), torch.stack(tiles)

# ---- adapter and splice oracles ----


def splice_reference(
    input_embeds: Tensor,
    input_ids: Tensor,
    image_token_id: int,
    packed: Tensor,
    lengths: Tensor,
    *,
    labels: Tensor | None = None,
    attention_mask: Tensor | None = None,
    ignore_index: int = -100,
    padding_side: str = "right",
    drop_padding: bool = False,
) -> dict[str, Tensor | None]:
    """Per-sample, per-token loop version of ``splice_into_embeddings``."""
    images = list(torch.split(packed, [int(n) for n in lengths]))
    rows_e, rows_m, rows_l = [], [], []
    k = 0
    for r in range(input_ids.shape[0]):
        e, m, lab = [], [], []
        for c in range(input_ids.shape[1]):
            if int(input_ids[r, c]) == image_token_id:
                for tok in images[k]:
                    e.append(tok)
                    m.append(1)
                    lab.append(ignore_index)
                k += 1
            elif drop_padding and int(attention_mask[r, c]) == 0:
                continue
            else:
                e.append(input_embeds[r, c])
                m.append(1 if attention_mask is None else int(attention_mask[r, c]))
                padded = attention_mask is not None and int(attention_mask[r, c]) == 0
                lab.append(ignore_index if labels is None or padded else int(labels[r, c]))
        rows_e.append(e)
        rows_m.append(m)
        rows_l.append(lab)
    width = max(len(e) for e in rows_e)
    d = input_embeds.shape[-1]
    out_e = input_embeds.new_zeros(len(rows_e), width, d)
    out_m = torch.zeros(len(rows_e), width, dtype=torch.long)
    out_l = torch.full((len(rows_e), width), ignore_index, dtype=torch.long)
    for r, (e, m, lab) in enumerate(zip(rows_e, rows_m, rows_l)):
        s = width - len(e) if padding_side == "left" else 0
        for j, (tok, mv, lv) in enumerate(zip(e, m, lab)):
            out_e[r, s + j] = tok
            out_m[r, s + j] = mv
            out_l[r, s + j] = lv
    return {"inputs_embeds": out_e, "attention_mask": out_m,
            "labels": None if labels is None else out_l}


__all__ += ["splice_reference"]


def adapter_reference(
    adapter,
    global_features: Tensor | None,
    tile_features: Tensor | None,
    grids: Sequence[tuple[int, int]],
    *,
    text_embeds: Tensor | None = None,
    text_mask: Tensor | None = None,
    separator_embeds: Tensor | None = None,
    views: str = "both",
    force_expert: int | None = None,
    router_gamma: float | None = None,
) -> list[Tensor]:
    """Per-image version of ``SliMEVisualAdapter.forward``: one image at a time through the
    adapter's own sub-modules, tiles pasted onto the raster one by one. Returns one
    ``(n_i, dl)`` tensor per image."""
    side = adapter.tokens_side
    mlp = adapter.projector.mlp if adapter.local_mlp is None else adapter.local_mlp
    outs, first_tile = [], 0
    for i, (cols, rows) in enumerate(grids):
        parts = []
        if views != "local":
            parts.append(adapter.projector(global_features[i:i + 1],
                                           force_expert=force_expert).tokens[0])
        if views == "both" and adapter.config.separator != "none":
            if adapter.config.separator == "learned":
                parts.append(adapter.separator[None].to(parts[0].dtype))
            else:
                sep = separator_embeds if separator_embeds.dim() == 1 else separator_embeds[i]
                parts.append(sep[None].to(parts[0].dtype))
        if views != "global":
            tiles = tile_features[first_tile:first_tile + cols * rows]
            local = mlp(adapter.compressor(tiles))  # (cols·rows, q, dl)
            raster = local.new_zeros(rows * side, cols * side, local.shape[-1])
            for t in range(cols * rows):
                r, c = divmod(t, cols)
                raster[r * side:(r + 1) * side, c * side:(c + 1) * side] = local[t].reshape(
                    side, side, -1)
            raster = raster.reshape(rows * cols * side * side, local.shape[-1])
            gamma = adapter.router.config.gamma if router_gamma is None else router_gamma
            if text_embeds is None and gamma >= 1.0:
                keep = torch.ones(raster.shape[0], dtype=torch.bool)
            else:
                routed = adapter.router(
                    raster[None], text_embeds[i:i + 1],
                    text_mask=None if text_mask is None else text_mask[i:i + 1], gamma=router_gamma)
                keep = routed.keep_mask[0]
            parts.append(raster[keep])
            first_tile += cols * rows
        outs.append(torch.cat(parts, dim=0))
    return outs


__all__ += ["adapter_reference"]
