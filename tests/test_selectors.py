"""Baseline token selectors: each equals its float64 loop oracle on awkward batches, keeps its
budget, and its errors name the problem."""

from __future__ import annotations

import pytest
import torch

import slime_adapters as sa
from slime_adapters.router import RouterInputError
from slime_adapters.selectors import SELECTORS, bayer_index, budget_counts, match_mean_budget
from slime_adapters.testing import selectors as ref

D = 6
BUDGETS = [dict(keep_fraction=0.3), dict(keep_count=5), dict(keep_fraction=0.05, min_keep=2),
           dict(keep_count=3, min_keep=0), {}]


def _batch(seed, b=4, n=13, l=5, dup=False):
    """Tokens with masked slots holding NaN, a one-token image, an image with no valid token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, D, generator=g, dtype=torch.float64)
    x = x * (0.2 + torch.rand(b, n, 1, generator=g, dtype=torch.float64))
    if dup:
        x[0, 3] = x[0, 5]  # an exact duplicate: ties break to the lower index
    t = torch.randn(b, l, D, generator=g, dtype=torch.float64)
    mask = torch.rand(b, n, generator=g) > 0.25
    mask[1] = False
    mask[1, 4] = True  # one-token image
    if b > 3:
        mask[3] = False  # no valid token at all
    x = torch.where(mask[..., None], x, torch.nan)
    tmask = torch.ones(b, l, dtype=torch.bool)
    tmask[0, -2:] = False
    return x, t, mask, tmask


def _check(out, keep, scores):
    assert torch.equal(out.keep_mask, keep)
    assert torch.equal(out.num_kept, keep.sum(1))
    torch.testing.assert_close(out.scores, scores, rtol=0, atol=1e-10)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_norm_diversity_saliency_equal_their_oracles(budget, seed):
    x, t, mask, _ = _batch(seed, dup=True)
    sal = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed + 9),
                     dtype=torch.float64)
    _check(sa.RandomSelector(seed=seed, **budget)(x, image_mask=mask),
           *ref.random_selector_reference(x, image_mask=mask, seed=seed, **budget))
    _check(sa.NormSelector(**budget)(x, t, image_mask=mask),
           *ref.norm_selector_reference(x, image_mask=mask, **budget))
    _check(sa.DiversitySelector(**budget)(x, image_mask=mask),
           *ref.diversity_selector_reference(x, image_mask=mask, **budget))
    _check(sa.SaliencySelector(**budget)(x, image_mask=mask, saliency=sal),
           *ref.saliency_selector_reference(x, sal, image_mask=mask, **budget))


@pytest.mark.parametrize("budget", BUDGETS)
def test_question_topk_equals_its_oracle_and_keeps_all_without_a_question(budget):
    x, t, mask, tmask = _batch(2)
    tmask[2] = False  # sample 2 has no question: all its valid tokens are kept
    out = sa.QuestionTopKSelector(**budget)(x, t, image_mask=mask, text_mask=tmask)
    _check(out, *ref.question_topk_reference(x, t, image_mask=mask, text_mask=tmask, **budget))
    assert out.num_kept[2] == mask[2].sum()
    with pytest.raises(RouterInputError, match=r"samples \[2\] have no valid question token"):
        sa.QuestionTopKSelector(on_empty_text="raise", **budget)(x, t, image_mask=mask,
                                                                 text_mask=tmask)


RASTERS = [[(3, 4), (1, 1), (2, 6), (0, 0)], [(4, 3), (5, 2), (1, 13), (2, 2)]]


@pytest.mark.parametrize("raster", RASTERS)
@pytest.mark.parametrize("budget", [dict(stride=1), dict(stride=3), {}, *BUDGETS[:4]])
def test_spatial_equals_its_oracle(raster, budget):
    x, _, mask, _ = _batch(3)
    out = sa.SpatialSelector(**budget)(x, image_mask=mask, raster=torch.tensor(raster))
    _check(out, *ref.spatial_selector_reference(x, raster, image_mask=mask, **budget))
    assert not out.keep_mask[:, 13:].any()


def test_spatial_is_every_kth_token_in_rows_and_columns():
    x = torch.randn(2, 96, 3)
    raster = torch.tensor([[8, 12], [4, 4]])
    grid = torch.zeros(2, 96, dtype=torch.bool)
    for i, (rows, cols) in enumerate(raster.tolist()):
        for k in range(rows * cols):
            grid[i, k] = (k // cols) % 2 == 0 and (k % cols) % 2 == 0
    assert torch.equal(sa.SpatialSelector(stride=2)(x, raster=raster).keep_mask, grid)
    # an exact budget of a quarter in ordered-dither order is the same lattice
    quarter = sa.SpatialSelector(keep_fraction=0.25)(x, image_mask=torch.arange(96) < raster.prod(1)
                                                     [:, None], raster=raster)
    assert torch.equal(quarter.keep_mask, grid)
    every4 = sa.SpatialSelector(keep_count=6)(x, raster=torch.tensor([[8, 12], [8, 12]]))
    pos = every4.keep_mask[0].nonzero().flatten()
    assert [(int(p) // 12, int(p) % 12) for p in pos] == [(r, c) for r in (0, 4) for c in
                                                          (0, 4, 8)]
    # Bayer ranks of a 4x4 matrix
    r, c = torch.arange(4)[:, None].expand(4, 4), torch.arange(4)[None].expand(4, 4)
    assert bayer_index(r, c, 2).tolist() == [[0, 8, 2, 10], [12, 4, 14, 6], [3, 11, 1, 9],
                                             [15, 7, 13, 5]]


def test_random_is_seeded_and_leaves_the_global_rng_alone():
    x = torch.randn(3, 40, 4)
    state = torch.get_rng_state()
    a = sa.RandomSelector(keep_count=7, seed=5)(x)
    torch.manual_seed(123)
    b = sa.RandomSelector(keep_count=7, seed=5)(x)
    assert torch.equal(a.keep_mask, b.keep_mask) and a.num_kept.tolist() == [7, 7, 7]
    torch.set_rng_state(state)
    before = torch.get_rng_state()
    sa.RandomSelector(keep_count=7, seed=5)(x)
    assert torch.equal(torch.get_rng_state(), before)
    other = sa.RandomSelector(keep_count=7, seed=6)(x)
    assert not torch.equal(a.keep_mask, other.keep_mask)
    g = torch.Generator().manual_seed(5)
    first = sa.RandomSelector(keep_count=7)(x, generator=g)
    assert torch.equal(first.keep_mask, a.keep_mask)  # the same draw as seed=5
    assert not torch.equal(sa.RandomSelector(keep_count=7)(x, generator=g).keep_mask,
                           first.keep_mask)  # the caller's generator advanced


def test_gamma_one_keeps_every_valid_token_and_any_other_gamma_is_refused():
    x, t, mask, tmask = _batch(4)
    kwargs = dict(image_mask=mask, raster=[(3, 4), (1, 13), (2, 6), (1, 1)],
                  saliency=torch.rand(mask.shape, dtype=torch.float64))
    for name, cls in SELECTORS.items():
        out = cls()(x, t, gamma=1.0, **kwargs)
        on = mask & (torch.arange(13) < torch.tensor([12, 13, 12, 1])[:, None]) if (
            name == "spatial") else mask
        assert torch.equal(out.keep_mask, on), name
        with pytest.raises(RouterInputError, match=rf"{cls.__name__} keeps a fixed budget: "
                                                   r"gamma may only be None .* got 0.9"):
            cls()(x, t, gamma=0.9, **kwargs)


def test_float32_input_gives_float32_scores_and_the_same_selection():
    x, t, mask, _ = _batch(5)
    x = torch.where(mask[..., None], x, 0.0)
    for cls in (sa.NormSelector, sa.DiversitySelector, sa.QuestionTopKSelector):
        o64, o32 = cls()(x, t, image_mask=mask), cls()(x.float(), t.float(), image_mask=mask)
        assert o32.scores.dtype == torch.float32 and o64.scores.dtype == torch.float64
        assert torch.equal(o32.keep_mask, o64.keep_mask), cls.__name__


def test_budget_counts_and_matching_a_target_mean():
    n = torch.tensor([0, 1, 10, 11, 576])
    assert budget_counts(n, keep_fraction=0.25).tolist() == [0, 1, 3, 3, 144]
    assert budget_counts(n, keep_count=4, min_keep=2).tolist() == [0, 1, 4, 4, 4]
    assert budget_counts(n, keep_fraction=0.01, min_keep=0).tolist() == [0, 0, 0, 0, 6]
    with pytest.raises(ValueError, match="exactly one of keep_fraction and keep_count"):
        budget_counts(n)
    num = [576, 1152, 144, 2880]
    for target in (3.0, 100.0, 371.25, 1000.0):
        f = match_mean_budget(num, target)["keep_fraction"]
        got = budget_counts(torch.tensor(num), keep_fraction=f).double().mean().item()
        assert abs(got - target) <= 1.0, (target, got)
        c = match_mean_budget(num, target, by="count")["keep_count"]
        best = min(range(1, 2881), key=lambda k: (abs(sum(min(k, v) for v in num) / 4 - target),
                                                  k))
        assert c == best
    assert match_mean_budget(num, 10 ** 6) == {"keep_fraction": 1.0}
    with pytest.raises(ValueError, match="by must be 'fraction' or 'count', got 'ratio'"):
        match_mean_budget(num, 3.0, by="ratio")
    with pytest.raises(ValueError, match="num_valid holds no image"):
        match_mean_budget([], 3.0)
    for bad in (0, -1.0, float("nan"), True, "3"):
        with pytest.raises(ValueError, match="target_mean must be a finite number > 0"):
            match_mean_budget(num, bad)


def _err(match, fn):
    with pytest.raises(RouterInputError, match=match):
        fn()


def test_every_input_error_names_the_problem():
    x, t, mask, tmask = _batch(6, b=2, n=6)
    s = sa.NormSelector()
    _err("image_tokens must be a torch.Tensor, got list", lambda: s([[1.0]]))
    _err(r"image_tokens must have rank 3 \(b, tokens, d\), got shape \(6, 6\)", lambda: s(x[0]))
    _err("image_tokens must be floating point, got torch.int64", lambda: s(x.long()))
    _err(r"text_embeds must be \(b=2, l, d=6\)", lambda: s(x, t[:1]))
    _err("text_embeds must have rank 3", lambda: s(x, t[0]))
    _err("text_embeds must be a torch.Tensor, got list", lambda: s(x, [[1.0]]))
    _err(r"image_mask must be a bool tensor \(True = valid\), got torch.int64",
         lambda: s(x, image_mask=mask.long()))
    _err(r"image_mask must have shape \(2, 6\), got \(2, 5\)", lambda: s(x, image_mask=mask[:, :5]))
    _err(r"text_mask must have shape \(2, 5\)", lambda: s(x, t, text_mask=tmask[:, :2]))
    _err("QuestionTopKSelector is question-aware: it needs text_embeds",
         lambda: sa.QuestionTopKSelector()(x))
    sp = sa.SpatialSelector()
    _err(r"SpatialSelector needs raster \(b, 2\)", lambda: sp(x))
    _err(r"raster must have shape \(2, 2\) as \(rows, cols\), got \(2, 3\)",
         lambda: sp(x, raster=[(1, 2, 3), (1, 2, 3)]))
    _err("raster must hold integers, got dtype torch.float32",
         lambda: sp(x, raster=torch.ones(2, 2)))
    _err(r"rows·cols <= n = 6, got \[\[2, 4\], \[1, 1\]\]", lambda: sp(x, raster=[(2, 4), (1, 1)]))
    _err("rows·cols <= n", lambda: sp(x, raster=[(-1, 2), (1, 1)]))
    sal = sa.SaliencySelector()
    _err(r"SaliencySelector needs saliency \(b, n\)", lambda: sal(x))
    _err("saliency must be a floating-point tensor", lambda: sal(x, saliency=mask))
    _err(r"saliency must have shape \(2, 6\), got \(2, 5\)",
         lambda: sal(x, saliency=torch.rand(2, 5)))
    _err("generator must be a CPU torch.Generator", lambda: sa.RandomSelector()(x, generator=3))
    _err("gamma may only be None", lambda: s(x, gamma=True))


def test_contextual_tokens_equal_their_oracle():
    x, _, mask, _ = _batch(7, b=4, n=17)
    x = torch.where(mask[..., None], x, 0.0)
    sal = torch.rand(mask.shape, dtype=torch.float64)
    out = sa.SaliencySelector(keep_fraction=0.3)(x, image_mask=mask, saliency=sal)
    for m in (1, 2, 5):
        ctx = sa.contextual_tokens(x, out, m, image_mask=mask)
        want = ref.contextual_tokens_reference(x, out.keep_mask, m, image_mask=mask)
        assert ctx.tokens.shape == (4, m, D)
        for i, w in enumerate(want):
            assert int(ctx.mask[i].sum()) == w.shape[0]
            torch.testing.assert_close(ctx.tokens[i][ctx.mask[i]], w, rtol=0, atol=1e-12)
    _err("num_contextual must be an int >= 1, got 0", lambda: sa.contextual_tokens(x, out, 0))
    _err(r"image_tokens must be \(b, n, d\) with \(b, n\) = \(4, 17\)",
         lambda: sa.contextual_tokens(x[:, :3], out, 2))


def test_cls_attention_and_pooled_saliency():
    attn = torch.rand(3, 2, 17, 17, dtype=torch.float64)
    layers = (torch.rand_like(attn), attn, torch.rand_like(attn))
    cls_row = sa.cls_attention(layers)  # the penultimate layer
    assert torch.equal(cls_row, (attn[:, 0, 0, 1:] + attn[:, 1, 0, 1:]) / 2)
    pooled = sa.selectors.pool_saliency(cls_row, 2)
    grid = cls_row.reshape(3, 4, 4)
    want = torch.stack([grid[:, r:r + 2, c:c + 2].mean((1, 2)) for r in (0, 2) for c in (0, 2)], 1)
    torch.testing.assert_close(pooled, want, rtol=0, atol=1e-15)
    assert sa.selectors.pool_saliency(pooled, 2) is pooled
    _err("the tuple of per-layer maps is empty", lambda: sa.cls_attention(()))
    _err(r"attentions must be \(p, heads, 1 \+ s, 1 \+ s\)",
         lambda: sa.cls_attention(torch.rand(3, 17, 17)))
    _err("tile saliency must be a floating-point", lambda: sa.selectors.pool_saliency(
        torch.ones(3, 16, dtype=torch.long), 2))
    _err("neither the 4 local tokens nor a square patch grid",
         lambda: sa.selectors.pool_saliency(torch.rand(3, 15), 2))


def test_build_router_takes_every_router_config_and_refuses_others():
    from slime_adapters.selectors import ROUTER_CONFIGS, build_router

    for cfg_cls in ROUTER_CONFIGS:
        module = build_router(cfg_cls())
        assert module.config == cfg_cls()
    with pytest.raises(sa.ConfigError, match="router must be one of CosineTokenRouterConfig, "
                                             "RandomSelectorConfig.*got QueryCompressorConfig"):
        build_router(sa.QueryCompressorConfig())
