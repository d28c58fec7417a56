"""SliMEVisualAdapter: layout, lengths, batching against the per-image oracle, views, errors."""

from __future__ import annotations

import pytest
import torch

from slime_adapters.adapter import (
    SliMEVisualAdapter,
    SliMEVisualAdapterConfig,
    local_raster_index,
)
from slime_adapters.compressor import QueryCompressorConfig
from slime_adapters.testing import adapter_reference
from slime_adapters.projector import NoisyMoEProjectorConfig
from slime_adapters.router import CosineTokenRouterConfig

DV, DL, S, NQ = 24, 40, 16, 4


def _adapter(separator="learned", gamma=0.6, local_mlp="shared", dtype=torch.float64, **router):
    torch.manual_seed(0)
    cfg = SliMEVisualAdapterConfig(
        projector=NoisyMoEProjectorConfig(in_dim=DV, out_dim=DL, num_tokens=S, num_heads=2),
        compressor=QueryCompressorConfig(dim=DV, num_queries=NQ, num_heads=2),
        router=CosineTokenRouterConfig(gamma=gamma, **router),
        separator=separator,
        local_mlp=local_mlp,
    )
    return SliMEVisualAdapter.from_config(cfg, dtype=dtype).eval()


def _inputs(grids, seed=0, L=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    b = len(grids)
    p = sum(c * r for c, r in grids)
    glob = torch.randn(b, S, DV, generator=g, dtype=dtype)
    tiles = torch.randn(p, S, DV, generator=g, dtype=dtype)
    text = torch.randn(b, L, DL, generator=g, dtype=dtype)
    mask = torch.ones(b, L, dtype=torch.bool)
    mask[0, -2:] = False
    return glob, tiles, text, mask


def test_raster_index_matches_row_major_tile_layout():
    grids = torch.tensor([[2, 3], [1, 1], [3, 1]])
    image, pos = local_raster_index(grids, 2)
    assert image.tolist()[:24] == [0] * 24 and image.tolist()[24:28] == [1] * 4
    # image 0: 2 cols x 3 rows of 2x2 tokens -> a 6 x 4 raster; tile 1 (row 0, col 1) token (1, 0)
    # lands on raster row 1, col 2 -> position 1 * 4 + 2
    assert pos[1 * 4 + 2].item() == 1 * 4 + 2
    for img in range(3):
        sel = pos[image == img]
        assert sorted(sel.tolist()) == list(range(sel.numel()))  # a permutation of the raster


@pytest.mark.parametrize("grids", [[(1, 1)], [(1, 1), (7, 1)], [(2, 2), (1, 7), (3, 1)]])
@pytest.mark.parametrize("separator", ["learned", "none"])
def test_batched_equals_per_image_oracle(grids, separator):
    adapter = _adapter(separator=separator)
    glob, tiles, text, mask = _inputs(grids)
    with torch.no_grad():
        out = adapter(glob, tiles, grids=grids, text_embeds=text, text_mask=mask)
        ref = adapter_reference(adapter, glob, tiles, grids, text_embeds=text, text_mask=mask)
    parts = out.split()
    assert len(parts) == len(ref)
    for got, want in zip(parts, ref):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    sep = 1 if separator != "none" else 0
    kept = out.aux.num_kept
    assert out.lengths.tolist() == [S + sep + int(k) for k in kept]
    assert out.cu_seqlens.tolist() == [0] + torch.cumsum(out.lengths, 0).tolist()
    assert out.aux.num_local.tolist() == [c * r * NQ for c, r in grids]
    assert out.num_global == S and out.num_separator == sep


def test_router_selects_a_strict_subset_and_gamma_one_keeps_all():
    adapter = _adapter(gamma=0.5, temperature=0.05)
    grids = [(2, 2), (3, 1)]
    glob, tiles, text, mask = _inputs(grids, seed=4)
    with torch.no_grad():
        some = adapter(glob, tiles, grids=grids, text_embeds=text, text_mask=mask)
        all_ = adapter(glob, tiles, grids=grids, text_embeds=text, text_mask=mask,
                       router_gamma=1.0)
        no_text = adapter(glob, tiles, grids=grids, router_gamma=1.0)
    assert (some.aux.num_kept < some.aux.num_local).all()
    assert torch.equal(all_.aux.num_kept, all_.aux.num_local)
    torch.testing.assert_close(no_text.packed, all_.packed)


def test_image_without_tiles_is_global_only():
    adapter = _adapter()
    grids = [(0, 0), (2, 1)]
    glob, tiles, text, mask = _inputs(grids)
    with torch.no_grad():
        out = adapter(glob, tiles, grids=grids, text_embeds=text, text_mask=mask)
        ref = adapter_reference(adapter, glob, tiles, grids, text_embeds=text, text_mask=mask)
    assert out.aux.num_kept[0].item() == 0
    assert out.lengths[0].item() == S + 1
    for got, want in zip(out.split(), ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("views", ["global", "local"])
def test_single_view(views):
    adapter = _adapter()
    grids = [(1, 2), (2, 1)]
    glob, tiles, text, mask = _inputs(grids)
    with torch.no_grad():
        out = adapter(glob, tiles, grids=grids, text_embeds=text, text_mask=mask, views=views)
        ref = adapter_reference(adapter, glob, tiles, grids, text_embeds=text, text_mask=mask,
                                views=views)
    for got, want in zip(out.split(), ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if views == "global":
        assert out.lengths.tolist() == [S, S] and out.aux.router is None
    else:
        assert out.num_global == 0 and out.num_separator == 0 and out.aux.moe is None


def test_embedding_separator_and_own_mlp():
    adapter = _adapter(separator="embedding", local_mlp="own")
    grids = [(1, 1), (2, 1)]
    glob, tiles, text, mask = _inputs(grids)
    comma = torch.randn(DL, dtype=torch.float64)
    with torch.no_grad():
        out = adapter(glob, tiles, grids=grids, text_embeds=text, text_mask=mask,
                      separator_embeds=comma)
        ref = adapter_reference(adapter, glob, tiles, grids, text_embeds=text, text_mask=mask,
                                separator_embeds=comma)
    for got, want in zip(out.split(), ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[S], comma)
    assert adapter.local_mlp is not None
    with pytest.raises(ValueError, match="separator_embeds"):
        adapter(glob, tiles, grids=grids, text_embeds=text, text_mask=mask)


def test_gradients_flow_to_every_submodule():
    adapter = _adapter(dtype=torch.float32).train()
    grids = [(2, 1), (1, 1)]
    glob, tiles, text, mask = _inputs(grids, dtype=torch.float32)
    out = adapter(glob, tiles, grids=grids, text_embeds=text, text_mask=mask)
    (out.packed.square().mean() + out.aux.aux_loss).backward()
    for name in ("projector.mlp.0.weight", "compressor.query", "separator",
                 "projector.query_expert.query", "projector.w_gate"):
        grad = dict(adapter.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all(), name


def test_config_round_trip_and_meta_device():
    adapter = _adapter()
    cfg = SliMEVisualAdapterConfig.from_json(adapter.config.to_json())
    assert cfg == adapter.config
    meta = SliMEVisualAdapter.from_config(cfg, device="meta")
    assert all(p.is_meta for p in meta.parameters())


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda a, g, t, x, m: a(None, t, grids=[(1, 1), (2, 1)], text_embeds=x, text_mask=m),
         "needs global_features"),
        (lambda a, g, t, x, m: a(g, None, grids=[(1, 1), (2, 1)], text_embeds=x, text_mask=m),
         "needs tile_features"),
        (lambda a, g, t, x, m: a(g, t, grids=[(1, 1)], text_embeds=x, text_mask=m),
         "grids describe 1 images but global_features has 2"),
        (lambda a, g, t, x, m: a(g, t[:2], grids=[(1, 1), (2, 1)], text_embeds=x, text_mask=m),
         "has 2 tiles but the grids need 3"),
        (lambda a, g, t, x, m: a(g, t, grids=[(1, 1), (2, 1)], tiles_per_image=[1, 1],
                                 text_embeds=x, text_mask=m), "disagrees"),
        (lambda a, g, t, x, m: a(g, t, grids=[(1, 1), (2, 1)]), "needs text_embeds"),
        (lambda a, g, t, x, m: a(g, t, grids=[(1, 1), (2, 1)], text_embeds=x, views="tiles"),
         "views must be one of"),
        (lambda a, g, t, x, m: a(g[0], t, grids=[(1, 1), (2, 1)], text_embeds=x),
         r"global_features must be \(b, s, dv\)"),
        (lambda a, g, t, x, m: a(g, t, grids=[1, 2], text_embeds=x), r"grids must be \(b, 2\)"),
    ],
)
def test_bad_input(call, match):
    adapter = _adapter()
    glob, tiles, text, mask = _inputs([(1, 1), (2, 1)])
    with pytest.raises(ValueError, match=match):
        call(adapter, glob, tiles, text, mask)


def test_bad_construction():
    with pytest.raises(ValueError, match="separator must be one of"):
        SliMEVisualAdapter(separator="comma")
    with pytest.raises(ValueError, match="must equal the projector's in_dim"):
        SliMEVisualAdapter(projector=NoisyMoEProjectorConfig(in_dim=32, out_dim=64, num_tokens=16),
                           compressor=QueryCompressorConfig(dim=48, num_queries=4))
    with pytest.raises(ValueError, match="perfect square"):
        SliMEVisualAdapter(projector=NoisyMoEProjectorConfig(in_dim=32, out_dim=64, num_tokens=16),
                           compressor=QueryCompressorConfig(dim=32, num_queries=6,
                                                            pos_embed="none"))


def test_router_gamma_is_checked_without_text_too():
    adapter = _adapter()
    glob, tiles, _, _ = _inputs([(1, 1)])
    for bad in (1.5, float("nan"), 0.0):
        with pytest.raises(ValueError, match="router_gamma must be a number in"):
            adapter(glob, tiles, grids=[(1, 1)], router_gamma=bad)


def test_meta_construction_then_reset_parameters_initialises_the_separator():
    meta = SliMEVisualAdapter.from_config(_adapter().config, device="meta")
    real = meta.to_empty(device="cpu")
    for module in real.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    assert 0.005 < real.separator.std().item() < 0.05
