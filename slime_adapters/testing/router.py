"""Float64 loop oracle of the cosine token router (:class:`slime_adapters.router.CosineTokenRouter`) and of the released router: slow, obvious and dtype-agnostic.

Tests and benchmarks compare the fast module against it in float64; users who port the component
can hold their version to the same bar. Loops over samples, tiles, heads and tokens are the point:
each formula reads on its own.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["router_reference", "router_reference_released"]


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
