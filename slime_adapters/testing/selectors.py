"""Float64 loop oracles of the baseline token selectors (:mod:`slime_adapters.selectors`): one
image and one token at a time, every rule written out.

Each returns ``(keep_mask (b, n) bool, scores (b, n))`` like
:func:`~slime_adapters.testing.router.router_reference`; the budget is given as the selectors'
config fields (``keep_fraction`` / ``keep_count`` / ``min_keep``; neither fraction nor count:
0.25). Masks are True = valid.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "budget_count_reference",
    "contextual_tokens_reference",
    "diversity_selector_reference",
    "norm_selector_reference",
    "question_topk_reference",
    "random_selector_reference",
    "saliency_selector_reference",
    "spatial_selector_reference",
]

EPS = 1e-8


def budget_count_reference(num_valid: int, *, keep_fraction=None, keep_count=None,
                           min_keep: int = 1) -> int:
    """Tokens an image with ``num_valid`` valid tokens keeps."""
    if keep_count is not None:
        count = keep_count
    else:
        f = 0.25 if keep_fraction is None else keep_fraction
        count = math.floor(f * num_valid + 0.5)
    return min(max(count, min_keep), num_valid)


def _valid(image_mask: Tensor | None, b: int, n: int) -> list[list[int]]:
    return [[j for j in range(n) if image_mask is None or bool(image_mask[i, j])]
            for i in range(b)]


def _top(b: int, n: int, idx: list[list[int]], values: list[list[float]], counts: list[int],
         dtype, device) -> tuple[Tensor, Tensor]:
    """Keep, per image, the ``counts[i]`` tokens of ``idx[i]`` with the highest value (ties: the
    lower index); scores = the values, 0 elsewhere."""
    keep = torch.zeros(b, n, dtype=torch.bool, device=device)
    scores = torch.zeros(b, n, dtype=dtype, device=device)
    for i in range(b):
        order = sorted(range(len(idx[i])), key=lambda k: (-values[i][k], idx[i][k]))
        for k in order[:counts[i]]:
            keep[i, idx[i][k]] = True
        for k, j in enumerate(idx[i]):
            scores[i, j] = values[i][k]
    return keep, scores


def _unit(v: Tensor) -> Tensor:
    v = v.detach()
    return v / max(math.sqrt(float((v * v).sum())), EPS)


def _counts(idx, budget) -> list[int]:
    return [budget_count_reference(len(ix), **budget) for ix in idx]


def random_selector_reference(image_tokens: Tensor, *, image_mask=None, seed: int = 0,
                              **budget) -> tuple[Tensor, Tensor]:
    """Keys: ``torch.rand((b, n), float64)`` from a CPU generator seeded with ``seed``; keep the
    ``count`` valid tokens of highest key."""
    b, n, _ = image_tokens.shape
    keys = torch.rand((b, n), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    idx = _valid(image_mask, b, n)
    values = [[float(keys[i, j]) for j in idx[i]] for i in range(b)]
    return _top(b, n, idx, values, _counts(idx, budget), torch.float64, image_tokens.device)


def _bayer(size: int) -> list[list[int]]:
    """The ordered-dither matrix by its recursive definition M_2k = [[4M, 4M+2], [4M+3, 4M+1]]."""
    m = [[0]]
    while len(m) < size:
        k = len(m)
        big = [[0] * (2 * k) for _ in range(2 * k)]
        for r in range(k):
            for c in range(k):
                v = 4 * m[r][c]
                big[r][c], big[r][c + k] = v, v + 2
                big[r + k][c], big[r + k][c + k] = v + 3, v + 1
        m = big
    return m


def spatial_selector_reference(image_tokens: Tensor, raster, *, image_mask=None, stride=None,
                               **budget) -> tuple[Tensor, Tensor]:
    """``raster[i] = (rows, cols)``. ``stride`` k (or no budget at all: 2): keep the valid tokens
    of rows and columns multiple of k. A budget: keep ``count`` valid tokens of lowest Bayer rank
    in a 2^bits matrix, 2^bits >= the largest side in the batch; scores 1 − rank / 4^bits."""
    b, n, _ = image_tokens.shape
    raster = [tuple(int(v) for v in rc) for rc in raster]
    if stride is None and budget.get("keep_fraction") is None and budget.get("keep_count") is None:
        stride = 2
    side = max([max(r, c) for r, c in raster] + [1])
    bits = max(1, (side - 1).bit_length())
    bayer = _bayer(2 ** bits)
    idx, values, counts = [], [], []
    for i in range(b):
        rows, cols = raster[i]
        ix = [j for j in range(min(n, rows * cols))
              if image_mask is None or bool(image_mask[i, j])]
        vals = [1.0 - bayer[j // cols][j % cols] / 4 ** bits for j in ix]
        if stride is not None:
            ix = [j for j in ix if (j // cols) % stride == 0 and (j % cols) % stride == 0]
            vals = [1.0 - bayer[j // cols][j % cols] / 4 ** bits for j in ix]
            counts.append(len(ix))
        else:
            counts.append(budget_count_reference(len(ix), **budget))
        idx.append(ix)
        values.append(vals)
    return _top(b, n, idx, values, counts, torch.float64, image_tokens.device)


def norm_selector_reference(image_tokens: Tensor, *, image_mask=None,
                            **budget) -> tuple[Tensor, Tensor]:
    """Keep the ``count`` valid tokens of largest ‖v‖ (scores: the norms)."""
    b, n, _ = image_tokens.shape
    idx = _valid(image_mask, b, n)
    values = [[math.sqrt(float((image_tokens[i, j].double() ** 2).sum())) for j in idx[i]]
              for i in range(b)]
    return _top(b, n, idx, values, _counts(idx, budget), torch.float64, image_tokens.device)


def question_topk_reference(image_tokens: Tensor, text_embeds: Tensor, *, image_mask=None,
                            text_mask=None, on_empty_text: str = "keep_all",
                            **budget) -> tuple[Tensor, Tensor]:
    """Score = mean over valid question tokens of cos(v, e) with x̂ = x / max(‖x‖, 1e-8); keep
    the ``count`` best; a sample without question tokens keeps all (or raises ValueError)."""
    b, n, _ = image_tokens.shape
    idx = _valid(image_mask, b, n)
    values, counts = [], []
    for i in range(b):
        txt = [j for j in range(text_embeds.shape[1])
               if text_mask is None or bool(text_mask[i, j])]
        if not txt and on_empty_text == "raise":
            raise ValueError(f"sample {i} has no valid question token")
        e = [_unit(text_embeds[i, j].double()) for j in txt]
        row = []
        for j in idx[i]:
            v = _unit(image_tokens[i, j].double())
            row.append(sum(float(v @ ek) for ek in e) / len(e) if e else 0.0)
        values.append(row)
        counts.append(len(idx[i]) if not txt else budget_count_reference(len(idx[i]), **budget))
    return _top(b, n, idx, values, counts, torch.float64, image_tokens.device)


def saliency_selector_reference(image_tokens: Tensor, saliency: Tensor, *, image_mask=None,
                                **budget) -> tuple[Tensor, Tensor]:
    """Keep the ``count`` valid tokens of highest saliency."""
    b, n, _ = image_tokens.shape
    idx = _valid(image_mask, b, n)
    values = [[float(saliency[i, j]) for j in idx[i]] for i in range(b)]
    return _top(b, n, idx, values, _counts(idx, budget), torch.float64, image_tokens.device)


def diversity_selector_reference(image_tokens: Tensor, *, image_mask=None,
                                 **budget) -> tuple[Tensor, Tensor]:
    """Greedy max–min cosine distance (DivPrune), one image at a time on its full distance
    matrix: first the token farthest from its nearest neighbour, then repeatedly the token
    farthest from the kept set; ties to the lower index."""
    b, n, _ = image_tokens.shape
    keep = torch.zeros(b, n, dtype=torch.bool, device=image_tokens.device)
    scores = torch.zeros(b, n, dtype=torch.float64, device=image_tokens.device)
    for i, ix in enumerate(_valid(image_mask, b, n)):
        units = [_unit(image_tokens[i, j].double()) for j in ix]
        dist = [[1.0 - float(u @ w) for w in units] for u in units]
        count = budget_count_reference(len(ix), **budget)
        chosen: list[int] = []
        picked_score: dict[int, float] = {}
        for _ in range(count):
            best, best_val = None, -math.inf
            for a in range(len(ix)):
                if a in chosen:
                    continue
                if not chosen:
                    others = [dist[a][c] for c in range(len(ix)) if c != a]
                    val = min(others) if others else math.inf
                else:
                    val = min(dist[a][c] for c in chosen)
                if val > best_val:
                    best, best_val = a, val
            chosen.append(best)
            picked_score[best] = min(best_val, 2.0)
        for a, j in enumerate(ix):
            if a in picked_score:
                keep[i, j] = True
                scores[i, j] = picked_score[a]
            else:
                scores[i, j] = min([dist[a][c] for c in chosen] + [2.0])
    return keep, scores


def contextual_tokens_reference(image_tokens: Tensor, keep_mask: Tensor, num_contextual: int, *,
                                image_mask=None) -> list[Tensor]:
    """VisionZip's contextual tokens per image (``slime_adapters.selectors.saliency``): one
    ``(m_i, d)`` float64 tensor per image."""
    b, n, _ = image_tokens.shape
    out = []
    for i in range(b):
        dropped = [j for j in range(n) if (image_mask is None or bool(image_mask[i, j]))
                   and not bool(keep_mask[i, j])]
        step = max(1, len(dropped) // num_contextual)
        targets = [j for r, j in enumerate(dropped) if r % step == 0 and r // step < num_contextual]
        groups = {t: [t] for t in targets}
        for j in dropped:
            if j in groups:
                continue
            v = _unit(image_tokens[i, j].double())
            sims = [float(v @ _unit(image_tokens[i, t].double())) for t in targets]
            groups[targets[sims.index(max(sims))]].append(j)
        out.append(torch.stack([torch.stack([image_tokens[i, j].double() for j in groups[t]])
                                .mean(0) for t in targets]) if targets
                   else image_tokens.new_zeros(0, image_tokens.shape[2], dtype=torch.float64))
    return out
