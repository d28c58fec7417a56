"""Every baseline selector drops into SliMEVisualAdapter: the adapter's packed output is exactly
``[global] + [separator] + [the oracle's kept local tokens in raster order]`` per image."""

from __future__ import annotations

import pytest
import torch

import slime_adapters as sa
from slime_adapters.router import RouterInputError
from slime_adapters.testing import selectors as ref

DV, DL, S, NQ = 16, 12, 9, 4
GRIDS = [(2, 1), (1, 1), (1, 3), (0, 0)]  # (cols, rows); the last image has no tile

ROUTERS = {
    "random": (sa.RandomSelectorConfig(keep_fraction=0.4, seed=3),
               lambda x, **k: ref.random_selector_reference(x, seed=3, keep_fraction=0.4,
                                                            image_mask=k["mask"])),
    "spatial": (sa.SpatialSelectorConfig(keep_count=3),
                lambda x, **k: ref.spatial_selector_reference(x, k["raster"], keep_count=3,
                                                              image_mask=k["mask"])),
    "spatial_stride": (sa.SpatialSelectorConfig(stride=2),
                       lambda x, **k: ref.spatial_selector_reference(x, k["raster"], stride=2,
                                                                     image_mask=k["mask"])),
    "norm": (sa.NormSelectorConfig(keep_count=2),
             lambda x, **k: ref.norm_selector_reference(x, keep_count=2, image_mask=k["mask"])),
    "diversity": (sa.DiversitySelectorConfig(keep_fraction=0.5),
                  lambda x, **k: ref.diversity_selector_reference(x, keep_fraction=0.5,
                                                                  image_mask=k["mask"])),
    "question_topk": (sa.QuestionTopKSelectorConfig(keep_count=3),
                      lambda x, **k: ref.question_topk_reference(
                          x, k["text"], keep_count=3, image_mask=k["mask"],
                          text_mask=k["text_mask"])),
    "saliency": (sa.SaliencySelectorConfig(keep_count=2),
                 lambda x, **k: ref.saliency_selector_reference(x, k["saliency"], keep_count=2,
                                                                image_mask=k["mask"])),
}


def _adapter(router, separator="learned"):
    torch.manual_seed(0)
    cfg = sa.SliMEVisualAdapterConfig(
        projector=sa.NoisyMoEProjectorConfig(in_dim=DV, out_dim=DL, num_tokens=S, num_heads=2),
        compressor=sa.QueryCompressorConfig(dim=DV, num_queries=NQ, num_heads=2),
        router=router, separator=separator)
    return sa.SliMEVisualAdapter.from_config(cfg, dtype=torch.float64).eval()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    p = sum(c * r for c, r in GRIDS)
    glob = torch.randn(len(GRIDS), S, DV, generator=g, dtype=torch.float64)
    tiles = torch.randn(p, S, DV, generator=g, dtype=torch.float64)
    text = torch.randn(len(GRIDS), 5, DL, generator=g, dtype=torch.float64)
    tmask = torch.ones(len(GRIDS), 5, dtype=torch.bool)
    tmask[0, -2:] = False
    patch_sal = torch.rand(p, S, generator=g, dtype=torch.float64)
    return glob, tiles, text, tmask, patch_sal


def _rasters(adapter, tiles, per_tile_sal):
    """Each image's local tokens (and saliency) pasted tile by tile onto its raster, padded."""
    side = adapter.tokens_side
    local = adapter.encode_local(tiles).detach()
    n_max = max(c * r for c, r in GRIDS) * NQ
    x = torch.zeros(len(GRIDS), n_max, DL, dtype=torch.float64)
    sal = torch.zeros(len(GRIDS), n_max, dtype=torch.float64)
    mask = torch.zeros(len(GRIDS), n_max, dtype=torch.bool)
    first = 0
    for i, (cols, rows) in enumerate(GRIDS):
        for t in range(cols * rows):
            r, c = divmod(t, cols)
            for a in range(side):
                for b in range(side):
                    pos = (r * side + a) * (cols * side) + c * side + b
                    x[i, pos] = local[first + t, a * side + b]
                    sal[i, pos] = per_tile_sal[first + t, a * side + b]
                    mask[i, pos] = True
        first += cols * rows
    return x, sal, mask, [(rows * side, cols * side) for cols, rows in GRIDS]


@pytest.mark.parametrize("name", sorted(ROUTERS))
@pytest.mark.parametrize("separator", ["learned", "none"])
def test_every_selector_drops_into_the_adapter_with_the_same_packing(name, separator):
    config, oracle = ROUTERS[name]
    adapter = _adapter(config, separator)
    glob, tiles, text, tmask, patch_sal = _inputs()
    sal_kw = {"tile_saliency": patch_sal} if name == "saliency" else {}
    out = adapter(glob, tiles, grids=GRIDS, text_embeds=text, text_mask=tmask, **sal_kw)
    per_tile = sa.selectors.pool_saliency(patch_sal, adapter.tokens_side)
    x, sal, mask, raster = _rasters(adapter, tiles, per_tile)
    keep, _ = oracle(x, mask=mask, raster=raster, text=text, text_mask=tmask, saliency=sal)
    assert torch.equal(out.aux.router.keep_mask, keep)
    glob_tokens = adapter.projector(glob).tokens
    for i, got in enumerate(out.split()):
        parts = [glob_tokens[i]]
        if separator == "learned":
            parts.append(adapter.separator[None])
        parts.append(x[i][keep[i]])
        torch.testing.assert_close(got, torch.cat(parts), rtol=0, atol=1e-12)
    assert out.lengths.tolist() == [S + (separator == "learned") + int(k) for k in keep.sum(1)]


def test_adapter_selector_errors_and_keep_all():
    glob, tiles, text, tmask, patch_sal = _inputs(1)
    norm = _adapter(sa.NormSelectorConfig(keep_count=1))
    with pytest.raises(ValueError, match="tile_saliency is read by a SaliencySelector only, not "
                                         "by NormSelector"):
        norm(glob, tiles, grids=GRIDS, tile_saliency=patch_sal)
    cosine = _adapter(sa.CosineTokenRouterConfig(gamma=0.9))
    with pytest.raises(ValueError, match="not by CosineTokenRouter"):
        cosine(glob, tiles, grids=GRIDS, text_embeds=text, tile_saliency=patch_sal)
    sal = _adapter(sa.SaliencySelectorConfig(keep_count=1))
    with pytest.raises(ValueError, match="tile_saliency has 5 tiles but the grids need 6"):
        sal(glob, tiles, grids=GRIDS, tile_saliency=patch_sal[:5])
    with pytest.raises(RouterInputError, match=r"SaliencySelector needs saliency"):
        sal(glob, tiles, grids=GRIDS)
    with pytest.raises(RouterInputError, match="QuestionTopKSelector is question-aware"):
        _adapter(sa.QuestionTopKSelectorConfig())(glob, tiles, grids=GRIDS)
    with pytest.raises(RouterInputError, match="NormSelector keeps a fixed budget"):
        norm(glob, tiles, grids=GRIDS, router_gamma=0.9)
    # question-agnostic selectors need no question; γ = 1 keeps every local token
    assert norm(glob, tiles, grids=GRIDS).aux.num_kept.tolist() == [1, 1, 1, 0]
    full = norm(glob, tiles, grids=GRIDS, router_gamma=1.0)
    assert torch.equal(full.aux.num_kept, full.aux.num_local)
