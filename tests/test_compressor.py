"""QueryCompressor vs the float64 loop oracle; positions, padding, batching, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch

from slime_adapters.layers import interpolate_table_bicubic, sincos_2d
from slime_adapters.compressor import QueryCompressor, QueryCompressorConfig
from slime_adapters.testing import query_compressor_reference, sincos_2d_reference

F64 = torch.float64


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values for every parameter (LayerNorm weights and biases included), so that no
    term of the formula hides behind a zero or a one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype) * 0.5)
    return module


def _x(*shape, seed=1, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def _assert_close(out, ref, tol=1e-10):
    err = (out - ref).abs()
    worst = int(err.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
    assert err.max() <= tol * max(1.0, ref.abs().max().item()), (
        f"max error {err.max().item():.3g} at {idx}: got {out[idx].item()!r}, "
        f"oracle {ref[idx].item()!r}"
    )


# (tiles, tokens per tile, dim, heads, queries, kv_dim, out_dim, pos_embed)
CASES = [
    pytest.param(1, 16, 48, 3, 4, None, None, "sincos2d", id="1tile-3heads"),
    pytest.param(7, 25, 32, 2, 9, 20, 12, "sincos2d", id="7tiles-kvproj-outproj"),
    pytest.param(3, 9, 16, 1, 1, None, None, "sincos2d", id="1query"),
    pytest.param(2, 7, 20, 5, 5, 6, None, "none", id="nopos-5heads"),
]


@pytest.mark.parametrize("mode", ["paper", "reference"])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("p,s,dim,heads,nq,kv_dim,out_dim,pos", CASES)
def test_matches_oracle_float64(p, s, dim, heads, nq, kv_dim, out_dim, pos, backend, mode):
    m = QueryCompressor(dim=dim, num_queries=nq, num_heads=heads, kv_dim=kv_dim, out_dim=out_dim,
                        pos_embed=pos, mode=mode, attn_backend=backend, dtype=F64)
    _randomise(m)
    x = _x(p, s, kv_dim or dim)
    out = m(x)
    assert out.shape == (p, nq, out_dim or dim) and out.dtype == F64
    _assert_close(out, query_compressor_reference(m, x))


def test_sincos_table_matches_loop_oracle():
    for side, dim, ref in [(5, 16, None), (4, 8, 2), (3, 12, 5), (1, 4, None)]:
        _assert_close(sincos_2d(side, dim, ref_side=ref, dtype=F64),
                      sincos_2d_reference(side, dim, ref_side=ref), tol=1e-12)
    # first half encodes the column, second half the row (the released layout)
    t = sincos_2d(3, 8, dtype=F64)
    assert torch.equal(t[1, :4], t[4, :4]) and torch.equal(t[3, 4:], t[4, 4:])


def test_key_positions_per_mode():
    paper = QueryCompressor(dim=32, num_queries=16, dtype=F64)
    ref = QueryCompressor(dim=32, num_queries=16, mode="reference", dtype=F64)
    # equal grids: the keys carry exactly the query table
    torch.testing.assert_close(paper.key_positions(16), paper.pos_embed, rtol=0, atol=0)
    torch.testing.assert_close(ref.key_positions(16), ref.pos_embed, rtol=0, atol=0)
    # the released table is float16; paper mode keeps full precision
    torch.testing.assert_close(ref.pos_embed, sincos_2d(4, 32, dtype=F64).half().double())
    assert (paper.pos_embed - ref.pos_embed).abs().max() > 0
    # a finer key grid: exact sin-cos at the cell centres vs the released bicubic resize
    _assert_close(paper.key_positions(64), sincos_2d_reference(8, 32, ref_side=4), tol=1e-12)
    torch.testing.assert_close(ref.key_positions(64), interpolate_table_bicubic(ref.pos_embed, 8))
    assert not paper.pos_embed.requires_grad
    assert "pos_embed" not in dict(paper.named_parameters())
    assert "pos_embed" in paper.state_dict()


def test_tile_does_not_depend_on_batch_mates():
    m = _randomise(QueryCompressor(dim=24, num_queries=4, num_heads=3, dtype=F64))
    x = _x(7, 9, 24)
    full = m(x)
    for i in (0, 3, 6):
        torch.testing.assert_close(m(x[i:i + 1])[0], full[i], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m(x.flip(0)), full.flip(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_nan_in_padding_does_not_leak(backend):
    m = _randomise(QueryCompressor(dim=16, num_queries=4, num_heads=2, kv_dim=12,
                                   attn_backend=backend, dtype=F64))
    x = _x(3, 9, 12)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, 5:] = True
    mask[2, :2] = True
    poisoned = x.masked_fill(mask[..., None], float("nan")).requires_grad_(True)
    out = m(poisoned, key_mask=~mask)
    assert torch.isfinite(out).all()
    clean = m(x.masked_fill(mask[..., None], 123.0), key_mask=~mask)
    torch.testing.assert_close(out, clean, rtol=0, atol=0)
    _assert_close(out, query_compressor_reference(m, x, key_mask=~mask))
    out.square().sum().backward()
    assert torch.isfinite(poisoned.grad).all()
    assert (poisoned.grad[mask] == 0).all()
    for name, prm in m.named_parameters():
        assert torch.isfinite(prm.grad).all(), name


def test_fully_padded_tile_matches_oracle():
    m = _randomise(QueryCompressor(dim=8, num_queries=4, num_heads=2, dtype=F64))
    x = _x(2, 4, 8)
    mask = torch.tensor([[True] * 4, [False, True, False, False]])
    out = m(x, key_mask=~mask)
    assert torch.isfinite(out).all()
    _assert_close(out, query_compressor_reference(m, x, key_mask=~mask))


def test_every_parameter_gets_a_finite_gradient():
    m = _randomise(QueryCompressor(dim=16, num_queries=4, num_heads=2, kv_dim=8, out_dim=6))
    m(_x(3, 9, 8, dtype=torch.float32)).square().mean().backward()
    names = {n for n, _ in m.named_parameters()}
    assert names == {"query", "kv_proj.weight", "ln_q.weight", "ln_q.bias", "ln_kv.weight",
                     "ln_kv.bias", "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
                     "v_proj.weight", "v_proj.bias", "out_proj.weight", "out_proj.bias",
                     "ln_post.weight", "ln_post.bias", "proj.weight", "proj.bias"}
    for n, prm in m.named_parameters():
        assert prm.grad is not None, n
        assert torch.isfinite(prm.grad).all() and prm.grad.abs().sum() > 0, n


def test_state_dict_names_match_released_resampler():
    keys = set(QueryCompressor(dim=16, num_queries=4).state_dict())
    assert {"query", "pos_embed", "ln_q.weight", "ln_kv.bias", "ln_post.weight", "q_proj.weight",
            "k_proj.bias", "v_proj.weight", "out_proj.weight", "out_proj.bias"} <= keys
    assert not any(k.startswith(("kv_proj", "proj.")) for k in keys)  # identity when not needed
    assert QueryCompressor(dim=16, num_queries=4, kv_dim=8).kv_proj.bias is None  # as released


def test_defaults_config_roundtrip_and_meta(tmp_path):
    m = QueryCompressor(dim=256, num_queries=9, kv_dim=64, mode="reference")
    assert m.num_heads == 2 and m.config.num_heads is None
    assert QueryCompressor(dim=64, num_queries=4).num_heads == 1
    cfg = QueryCompressorConfig.from_json(m.config.to_json(tmp_path / "c.json"))
    assert cfg == m.config
    m2 = QueryCompressor.from_config(cfg, dtype=F64)
    assert m2.config == m.config and m2.query.dtype == F64
    meta = QueryCompressor(device="meta")
    assert meta.query.is_meta and meta.pos_embed.is_meta and meta.num_heads == 8
    assert all(t.is_meta for t in meta.state_dict().values())


def test_autocast_bf16_runs_and_stays_close():
    m = _randomise(QueryCompressor(dim=32, num_queries=4, num_heads=2))
    x = _x(2, 16, 32, dtype=torch.float32)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.shape == ref.shape
    assert ((out.float() - ref).abs().max() / ref.abs().max()) < 0.1


def test_attn_backend_is_an_instance_attribute():
    m = _randomise(QueryCompressor(dim=16, num_queries=4, num_heads=2, dtype=F64))
    x = _x(2, 9, 16)
    m.attn_backend = "math"
    a = m(x)
    m.attn_backend = "sdpa"
    torch.testing.assert_close(m(x), a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_queries": 12}, "num_queries must be a positive perfect square"),
    ({"dim": 18, "num_heads": 2}, "dim must be a multiple of 4"),
    ({"dim": 48, "num_heads": 5}, "num_heads=5 does not divide dim=48"),
    ({"mode": "released"}, "mode must be one of"),
    ({"pos_embed": "learned"}, "pos_embed must be one of"),
    ({"attn_backend": "flash"}, "attn_backend must be one of"),
    ({"dim": 0}, "dim must be an int >= 1, got 0"),
    ({"kv_dim": -3}, "kv_dim must be an int >= 1 or None"),
    ({"norm_eps": 0.0}, "norm_eps must be a finite number > 0"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QueryCompressor(**{"dim": 16, "num_queries": 4, **kwargs})


def test_non_square_queries_allowed_without_positions():
    assert QueryCompressor(dim=16, num_queries=12, pos_embed="none")(torch.randn(1, 5, 16)).shape \
        == (1, 12, 16)


def test_forward_errors():
    m = QueryCompressor(dim=16, num_queries=4, kv_dim=8)
    with pytest.raises(ValueError, match=r"x has feature width 16, expected kv_dim=8"):
        m(torch.randn(2, 9, 16))
    with pytest.raises(ValueError, match=r"x must have rank 3"):
        m(torch.randn(9, 8))
    with pytest.raises(ValueError, match=r"x must be a torch.Tensor"):
        m([[0.0] * 8])
    with pytest.raises(ValueError, match=r"tokens per tile \(x.shape\[1\]\) must be a positive "
                                         r"perfect square"):
        m(torch.randn(2, 10, 8))
    with pytest.raises(ValueError, match="no tokens per tile"):
        m(torch.randn(2, 0, 8))
    with pytest.raises(ValueError, match="x must be floating point"):
        m(torch.ones(2, 9, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="key_mask must be a bool tensor"):
        m(torch.randn(2, 9, 8), key_mask=torch.zeros(2, 9))
    with pytest.raises(ValueError, match=r"key_mask must have shape \(tiles, tokens\)"):
        m(torch.randn(2, 9, 8), key_mask=torch.zeros(2, 8, dtype=torch.bool))


def test_check_finite():
    m = QueryCompressor(dim=16, num_queries=4, check_finite=True)
    x = torch.randn(2, 9, 16)
    x[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"x holds NaN or inf .*check_finite=True"):
        m(x)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 3] = True
    assert torch.isfinite(m(x, key_mask=~mask)).all()  # padding is not checked
    m.check_finite = False
    assert torch.isnan(m(x)).any()  # unchecked: NaN flows through as in any nn.Module


def test_trunc_normal_query_init():
    # the released call, trunc_normal_(std=0.02) with torch's absolute ±2 bounds: N(0, 0.02²)
    q = QueryCompressor(dim=128, num_queries=144).query
    assert math.isclose(q.std().item(), 0.02, rel_tol=0.05) and abs(q.mean().item()) < 1e-3


def test_key_mask_is_true_for_valid_tokens_and_the_old_keyword_is_refused():
    m = _randomise(QueryCompressor(dim=8, num_queries=4, num_heads=2, dtype=F64))
    x = _x(1, 9, 8)
    valid = torch.zeros(1, 9, dtype=torch.bool)
    valid[0, :4] = True
    # True = valid: the output is the oracle's over the four valid tokens ...
    _assert_close(m(x, key_mask=valid), query_compressor_reference(m, x, key_mask=valid))
    # ... and the padding convention gives the documented result (the other five tokens)
    _assert_close(m(x, key_mask=~valid), query_compressor_reference(m, x, key_mask=~valid))
    assert not torch.allclose(m(x, key_mask=valid), m(x, key_mask=~valid))
    with pytest.raises(TypeError, match=r"QueryCompressor.forward\(\) no longer takes "
                                        r"key_padding_mask=; pass key_mask \(True = a valid key"):
        m(x, key_padding_mask=~valid)
