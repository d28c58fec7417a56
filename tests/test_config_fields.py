"""Every config validates every field: one table of bad values per field, and a check that the
table names every field of every config (a new field without a bad value fails here)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from slime_adapters import (
    ConfigError,
    CosineTokenRouterConfig,
    DiversitySelectorConfig,
    NormSelectorConfig,
    QuestionTopKSelectorConfig,
    RandomSelectorConfig,
    SaliencySelectorConfig,
    SpatialSelectorConfig,
    NoisyMoEProjector,
    NoisyMoEProjectorConfig,
    QueryCompressor,
    QueryCompressorConfig,
    SliMEVisualAdapter,
    SliMEVisualAdapterConfig,
    SlicerConfig,
    SlicingError,
    load_module,
    save_module,
)

NAN, INF = math.nan, math.inf

# the budget of every baseline selector
BUDGET_BAD = {
    "keep_fraction": [0, 1.5, -0.1, NAN, INF, True, "0.5"],
    "keep_count": [0, -3, 2.5, True, "4"],
    "min_keep": [-1, 1.5, True, None],
}

BAD = {
    SlicerConfig: {
        "tile_size": [0, 1.5, True, "336"],
        "max_grid": [0, None, 2.0],
        "max_tiles": [0, 2.0, False],
        "policy": ["bogus", None, "Paper"],
        "pinpoints": [[(336, 672)], "336x672"],  # only with policy="pinpoints"
        "global_view": ["bogus", None],
        "fill": [(0, 0), (0, 0, 300), (0.5, 0, 0), (True, 0, 0), "black"],
        "alpha": ["bogus"],
        "mean": [(NAN, 0.4, 0.4), (INF, 0.4, 0.4), (0.5, 0.5), ("a", 0.4, 0.4), 0.5],
        "std": [(1.0, 0.0, 1.0), (NAN, 1.0, 1.0), (INF, 1.0, 1.0), (1.0, 1.0)],
        "max_pixels": [0, 1e8, True],
        "min_side": [0, 2.5, None],
        "max_aspect_ratio": [NAN, INF, 0.5, "100", True],
        "parallel_resize": ["no", 1, None],
    },
    QueryCompressorConfig: {
        "dim": [0, 1024.0, True, NAN],
        "num_queries": [0, 12, 2.0],
        "num_heads": [0, 5, 2.0],
        "kv_dim": [0, 1.5, "8"],
        "out_dim": [0, -1, "8"],
        "pos_embed": ["bogus", "learned"],
        "norm_eps": [0, -1e-6, NAN, INF, "1e-6", True],
        "mode": ["bogus", "released"],
        "check_finite": ["no", 0, None],
        "attn_backend": ["bogus", "flash", None],
    },
    NoisyMoEProjectorConfig: {
        "in_dim": [0, 16.0, True],
        "out_dim": [0, "4096"],
        "num_tokens": [0, 10, 576.0],
        "num_heads": [0, 3, 2.0],
        "noise": ["bogus", "gaussian"],
        "shared_mlp": ["no", 1, None],
        "balance_loss_coef": [INF, NAN, -1.0, True, "0.1"],
        "force_expert": [2, -1, True, "0", 0.0],
        "mode": ["bogus"],
        "check_finite": ["no"],
        "attn_backend": ["bogus"],
    },
    CosineTokenRouterConfig: {
        "gamma": [0, 1.5, NAN, INF, True, "0.9"],
        "noise_std": [INF, NAN, -0.1, "0.1"],
        "text_pool": ["bogus", "max"],
        "temperature": [0, -1.0, INF, NAN],
        "min_keep": [-1, 1.5, True],
        "max_keep": [0, 2.5, True],
        "legacy_softmax": ["no", 1, None],
        "crossing": ["bogus", "above"],
        "on_empty_text": ["bogus", "ignore"],
    },
    RandomSelectorConfig: {**BUDGET_BAD, "seed": [-1, 1.5, True, "0", None]},
    SpatialSelectorConfig: {**BUDGET_BAD, "stride": [0, -2, 2.0, True, "2"]},
    NormSelectorConfig: BUDGET_BAD,
    DiversitySelectorConfig: BUDGET_BAD,
    QuestionTopKSelectorConfig: {**BUDGET_BAD, "on_empty_text": ["bogus", None]},
    SaliencySelectorConfig: BUDGET_BAD,
    SliMEVisualAdapterConfig: {
        "projector": ["bogus", {}, None, QueryCompressorConfig()],
        "compressor": ["bogus", NoisyMoEProjectorConfig(), QueryCompressorConfig(dim=512)],
        "router": [3, None, QueryCompressorConfig(), {"gamma": 0.9}],
        "separator": ["bogus", "comma", None],
        "local_mlp": ["bogus", "separate"],
        "views": ["bogus", "Global", None],
    },
}

CASES = [(cls, name, value) for cls, fields in BAD.items() for name, values in fields.items()
         for value in values]


def test_the_table_names_every_field_of_every_config():
    for cls, fields in BAD.items():
        assert set(fields) == {f.name for f in dataclasses.fields(cls)}, cls.__name__
        cls()  # the defaults are valid


@pytest.mark.parametrize("cls, name, value", CASES,
                         ids=[f"{c.__name__}.{n}={v!r}" for c, n, v in CASES])
def test_every_config_refuses_a_bad_value_of_each_field(cls, name, value):
    with pytest.raises(ConfigError, match=rf"{cls.__name__}: .*{name}") as info:
        cls(**{name: value})
    if cls is SlicerConfig:
        assert isinstance(info.value, SlicingError)  # the slicer's own error type too


@pytest.mark.parametrize("cls, name, value", [c for c in CASES if isinstance(c[2], str)][:12])
def test_a_bad_value_read_from_json_is_refused(cls, name, value):
    data = {**cls().to_dict(), name: value}
    with pytest.raises(ConfigError, match=name):
        cls.from_json(json.dumps(data))


def test_unknown_choices_list_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"noise must be one of \('learned', 'reference'\), "
                                          r"got 'bogus'"):
        NoisyMoEProjectorConfig(noise="bogus")
    with pytest.raises(ConfigError, match=r"mode must be one of \('paper', 'reference'\)"):
        QueryCompressorConfig(mode="bogus")
    with pytest.raises(ConfigError, match=r"max_aspect_ratio must be a finite number >= 1, got "
                                          r"nan"):
        SlicerConfig(max_aspect_ratio=NAN)
    with pytest.raises(ConfigError, match=r"parallel_resize must be True or False, got 'no'"):
        SlicerConfig(parallel_resize="no")


def test_module_settings_go_through_the_config(tmp_path):
    proj = NoisyMoEProjector(in_dim=16, out_dim=8, num_tokens=4, num_heads=2)
    proj.force_expert = 0
    assert proj.config.force_expert == 0
    proj.attn_backend = "math"
    assert proj.config.attn_backend == proj.query_expert.config.attn_backend == "math"
    with pytest.raises(ConfigError, match="force_expert must be None, 0"):
        proj.force_expert = 2
    with pytest.raises(ConfigError, match="balance_loss_coef must be a finite number"):
        proj.balance_loss_coef = INF
    with pytest.raises(AttributeError):
        proj.mode = "reference"  # structural: read-only
    again = load_module(save_module(proj, tmp_path / "p"))
    assert again.force_expert == 0 and again.attn_backend == "math"  # what ran is what was saved
    x = torch.randn(1, 4, 16)
    assert torch.equal(again(x).gates, proj(x).gates)

    comp = QueryCompressor(dim=16, num_queries=4, num_heads=2)
    comp.check_finite = True
    assert comp.config.check_finite is True
    with pytest.raises(ConfigError, match="attn_backend must be one of"):
        comp.attn_backend = "flash"

    adapter = SliMEVisualAdapter(
        projector=NoisyMoEProjectorConfig(in_dim=16, out_dim=8, num_tokens=4, num_heads=2),
        compressor=QueryCompressorConfig(dim=16, num_queries=4, num_heads=2))
    adapter.projector.force_expert = 1
    adapter.views = "global"
    assert adapter.config.projector.force_expert == 1 and adapter.config.views == "global"
    with pytest.raises(ConfigError, match="views must be one of"):
        adapter.views = "tiles"
    loaded = load_module(save_module(adapter, tmp_path / "a"))
    assert loaded.config == adapter.config


def test_presets_set_the_switches_together():
    paper = SliMEVisualAdapterConfig.paper()
    assert paper == SliMEVisualAdapterConfig()
    rel = SliMEVisualAdapterConfig.released(
        legacy_softmax=True, projector={"in_dim": 16, "out_dim": 8, "num_tokens": 4},
        compressor={"dim": 16, "num_queries": 4}, router={"gamma": 0.9}, views="both")
    assert (rel.projector.mode, rel.projector.noise, rel.compressor.mode) == (
        "reference", "reference", "reference")
    assert (rel.router.text_pool, rel.router.crossing, rel.router.legacy_softmax,
            rel.router.gamma) == ("sum", "exceed", True, 0.9)
    assert (rel.separator, rel.local_mlp, rel.projector.shared_mlp) == (
        "embedding", "shared", True)
    assert SliMEVisualAdapterConfig.released().router.legacy_softmax is False
    with pytest.raises(ConfigError, match=r"released\(\) sets projector.mode='reference', got "
                                          r"'paper'"):
        SliMEVisualAdapterConfig.released(projector={"mode": "paper"})
    with pytest.raises(ConfigError, match=r"paper\(\) sets separator='learned'"):
        SliMEVisualAdapterConfig.paper(separator="embedding")
    with pytest.raises(ConfigError, match=r"released\(\).*unknown fields \['gama'\]"):
        SliMEVisualAdapterConfig.released(gama=0.9)
    with pytest.raises(ConfigError, match="legacy_softmax must be True or False"):
        SliMEVisualAdapterConfig.released(legacy_softmax="no")
    with pytest.raises(ConfigError, match=r"router: .*unexpected keyword argument 'gama'"):
        SliMEVisualAdapterConfig.paper(router={"gama": 0.9})


def test_a_selector_budget_is_at_most_one_of_fraction_count_and_stride():
    with pytest.raises(ConfigError, match=r"NormSelectorConfig: set at most one of keep_fraction, "
                                          r"keep_count \(the budget\), got keep_fraction, "
                                          r"keep_count"):
        NormSelectorConfig(keep_fraction=0.5, keep_count=3)
    with pytest.raises(ConfigError, match=r"SpatialSelectorConfig: set at most one of "
                                          r"keep_fraction, keep_count, stride .*got keep_count, "
                                          r"stride"):
        SpatialSelectorConfig(keep_count=3, stride=2)
    assert NormSelectorConfig().budget() == {"keep_fraction": 0.25}
    assert NormSelectorConfig(keep_count=7).budget() == {"keep_count": 7}
    assert SpatialSelectorConfig().effective_stride == 2
    assert SpatialSelectorConfig(keep_fraction=0.5).effective_stride is None


def test_the_adapter_takes_a_selector_config_saved_and_loaded(tmp_path):
    small = dict(projector=NoisyMoEProjectorConfig(in_dim=16, out_dim=8, num_tokens=4,
                                                   num_heads=2),
                 compressor=QueryCompressorConfig(dim=16, num_queries=4, num_heads=2))
    for router in (RandomSelectorConfig(keep_count=3, seed=4), SpatialSelectorConfig(stride=3),
                   NormSelectorConfig(keep_fraction=0.4), DiversitySelectorConfig(min_keep=2),
                   QuestionTopKSelectorConfig(on_empty_text="raise"), SaliencySelectorConfig()):
        cfg = SliMEVisualAdapterConfig(router=router, **small)
        assert SliMEVisualAdapterConfig.from_json(cfg.to_json()) == cfg
        adapter = SliMEVisualAdapter.from_config(cfg)
        assert type(adapter.router).config_class is type(router)
        assert load_module(save_module(adapter, tmp_path / router.kind)).config == cfg
        assert load_module(save_module(adapter.router, tmp_path / f"{router.kind}_alone")
                           ).config == router
        paper = SliMEVisualAdapterConfig.paper(router=router, **small)
        assert paper.router == router
    # a router dict is read as the config its kind names (none: the cosine router)
    assert SliMEVisualAdapterConfig.from_dict(
        {"router": {"kind": "norm_selector", "keep_count": 3}}).router == NormSelectorConfig(
        keep_count=3)
    assert SliMEVisualAdapterConfig.from_dict({"router": {"gamma": 0.5}}).router.gamma == 0.5
    with pytest.raises(ConfigError, match=r"router kind 'bogus' is unknown; kinds: \["):
        SliMEVisualAdapterConfig.from_dict({"router": {"kind": "bogus"}})
    with pytest.raises(ConfigError, match="router: .*gamma must be a finite number"):
        SliMEVisualAdapterConfig.from_dict({"router": {"gamma": "high"}})
