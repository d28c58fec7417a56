"""CosineTokenRouter's split API used by the adapter: scores of packed tokens, selection from
scores. Each must agree with the one-call ``forward`` / ``pooled_cosine_scores``."""

from __future__ import annotations

import pytest
import torch

from slime_adapters.router import CosineTokenRouter, RouterInputError
from slime_adapters.router_scores import (
    cosine_scores_to,
    pooled_cosine_scores,
    pooled_text_direction,
)


def _problem(seed=0, b=3, n=10, l=4, d=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    t = torch.randn(b, l, d, generator=g, dtype=torch.float64)
    tm = torch.arange(l)[None] < torch.tensor([4, 2, 0])[:, None]  # sample 2: empty question
    im = torch.arange(n)[None] < torch.tensor([10, 7, 5])[:, None]
    return x, t, tm, im


@pytest.mark.parametrize("pool", ["mean", "sum"])
def test_packed_scores_equal_pooled_cosine_scores(pool):
    x, t, tm, _ = _problem()
    ref = pooled_cosine_scores(x, t, text_mask=tm, text_pool=pool)
    direction = pooled_text_direction(t, text_mask=tm, text_pool=pool)
    owner = torch.arange(3).repeat_interleave(10)
    got = cosine_scores_to(x.reshape(-1, 8), direction, owner).reshape(3, 10)
    err = (got - ref).abs()
    assert direction.dtype == torch.float64 and err.max() <= 1e-12, (err.max(), err.argmax())


@pytest.mark.parametrize("gamma", [0.3, 0.9, 1.0])
def test_route_scores_equals_forward(gamma):
    x, t, tm, im = _problem(1)
    router = CosineTokenRouter(text_pool="sum", crossing="exceed").eval()
    ref = router(x, t, image_mask=im, text_mask=tm, gamma=gamma)
    scores = pooled_cosine_scores(x, t, text_mask=tm, text_pool="sum")
    got = router.route_scores(scores, image_mask=im, empty_text=router.empty_text(t, tm),
                              gamma=gamma)
    assert torch.equal(got.keep_mask, ref.keep_mask) and torch.equal(got.num_kept, ref.num_kept)
    assert torch.equal(got.num_kept[2], im[2].sum())  # empty question keeps every valid token


def test_empty_text_raises_when_asked_and_route_scores_checks_gamma():
    x, t, tm, _ = _problem()
    with pytest.raises(RouterInputError, match=r"samples \[2\] have no valid question token"):
        CosineTokenRouter(on_empty_text="raise").empty_text(t, tm)
    with pytest.raises(RouterInputError, match="gamma must be a number in"):
        CosineTokenRouter().route_scores(torch.zeros(2, 3), gamma=1.5)
