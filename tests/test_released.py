"""Released SliME weights: import from every layout, outputs vs a port of the released forward
(built on nn.MultiheadAttention), bit-exact export, and every error path."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from slime_adapters.adapter import SliMEVisualAdapter
from slime_adapters.checkpoint import (
    CheckpointError,
    export_released,
    import_released,
    save_released,
)
from slime_adapters.compressor import QueryCompressor
from slime_adapters.projector import NoisyMoEProjector

F64 = torch.float64
V, L, N, M, HEADS = 32, 48, 16, 4, 2  # vision width, LLM width, global tokens, queries, heads
PROJ, SAMP = "model.mm_projector.", "model.sampler.post_qformer."


def _resampler(g, queries, dtype):
    def r(*shape):
        return (torch.randn(*shape, generator=g, dtype=F64) * 0.5).to(dtype)
    out = {"query": r(queries, V), "pos_embed": r(queries, V),
           "attn.in_proj_weight": r(3 * V, V), "attn.in_proj_bias": r(3 * V),
           "attn.out_proj.weight": r(V, V), "attn.out_proj.bias": r(V)}
    for ln in ("ln_q", "ln_kv", "ln_post"):
        out[f"{ln}.weight"], out[f"{ln}.bias"] = 1 + r(V), r(V)
    return out


def released_state(seed=0, dtype=F64):
    """Random tensors with exactly the released names and (tiny) shapes."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.randn(*shape, generator=g, dtype=F64) * 0.5).to(dtype)
    state = {f"{PROJ}w_gate": r(V, 2), f"{PROJ}w_noise": r(V, 2),
             f"{PROJ}mean": torch.zeros(1, dtype=dtype), f"{PROJ}std": torch.ones(1, dtype=dtype),
             f"{PROJ}projection.0.weight": r(L, V), f"{PROJ}projection.0.bias": r(L),
             f"{PROJ}projection.2.weight": r(L, L), f"{PROJ}projection.2.bias": r(L)}
    state |= {f"{PROJ}attn.{k}": t for k, t in _resampler(g, N, dtype).items()}
    state |= {f"{SAMP}{k}": t for k, t in _resampler(g, M, dtype).items()}
    return state


def _part(state, prefix):
    return {k: v for k, v in state.items() if k.startswith(prefix)}


# ---------------------------------------------------------- a port of the released forward


def released_resampler(sd, x, heads=HEADS):
    """The released ``Resampler.forward`` (sequence-first nn.MultiheadAttention), float64."""
    mha = nn.MultiheadAttention(V, heads, dtype=F64)
    mha.load_state_dict({"in_proj_weight": sd["attn.in_proj_weight"],
                         "in_proj_bias": sd["attn.in_proj_bias"],
                         "out_proj.weight": sd["attn.out_proj.weight"],
                         "out_proj.bias": sd["attn.out_proj.bias"]})

    def ln(name, t):
        return F.layer_norm(t, (V,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)
    pos = sd["pos_embed"]
    src, tgt = math.isqrt(pos.shape[0]), math.isqrt(x.shape[1])
    # get_abs_pos: bicubic, align_corners=False (its float32 detour is a half-precision matter)
    pos_k = F.interpolate(pos.reshape(1, src, src, -1).permute(0, 3, 1, 2), size=(tgt, tgt),
                          mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)
    kv = ln("ln_kv", x).permute(1, 0, 2)  # (s, p, d)
    q = ln("ln_q", sd["query"]).unsqueeze(1).repeat(1, x.shape[0], 1)
    out = mha(q + pos.unsqueeze(1), kv + pos_k.unsqueeze(1), kv, need_weights=False)[0]
    return ln("ln_post", out.permute(1, 0, 2))


def released_gated_block(sd, x):
    """The released ``GatedBlock.forward`` in eval mode (top-2 of 2 experts, renormalised)."""
    def projection(t):
        h = F.gelu(F.linear(t, sd["projection.0.weight"], sd["projection.0.bias"]))
        return F.linear(h, sd["projection.2.weight"], sd["projection.2.bias"])
    attn = {k[len("attn."):]: v for k, v in sd.items() if k.startswith("attn.")}
    experts = [projection(x), projection(released_resampler(attn, x))]
    b, c, d = x.shape
    probs = torch.softmax(x.reshape(b * c, d) @ sd["w_gate"], dim=1)
    top, idx = probs.topk(2, dim=1)
    gates = torch.zeros_like(probs).scatter(1, idx, top / (top.sum(1, keepdim=True) + 1e-6))
    return (torch.stack(experts, -1) @ gates.reshape(b, c, 2, 1)).squeeze(-1)


def _plain(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _assert_close(out, ref, tol=1e-10):
    err = (out - ref).abs()
    idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    assert err.max() <= tol * max(1.0, ref.abs().max().item()), (
        f"max error {err.max().item():.3g} at {idx}: got {out[idx].item()!r}, oracle "
        f"{ref[idx].item()!r}")


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ------------------------------------------------------------------------------ importing


@pytest.fixture
def state():
    return released_state()


def test_full_model_safetensors_matches_the_released_forward(state, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({**state, "model.layers.0.mlp.weight": torch.ones(3, 2),
               "lm_head.weight": torch.ones(5, 2), "model.sampler.selector.w": torch.ones(2)},
              str(path))
    w = import_released(path, num_heads=HEADS, vision_dim=V, llm_dim=L)
    assert w.sources == (str(path),)
    proj, comp = w.projector.eval(), w.compressor.eval()
    assert (proj.mode, proj.noise, comp.mode) == ("reference", "reference", "reference")
    assert (proj.in_dim, proj.out_dim, proj.num_tokens, comp.num_queries) == (V, L, N, M)
    assert comp.num_heads == HEADS and proj.query_expert.num_heads == HEADS
    x = _x(3, N, V)
    with torch.no_grad():
        _assert_close(proj(x).tokens, released_gated_block(_plain(state, PROJ), x))
        tiles = _x(5, 16, V, seed=2)  # 4x4 keys, 2x2 queries: positions resized bicubically
        _assert_close(comp(tiles), released_resampler(_plain(state, SAMP), tiles))


def test_imported_equals_modules_set_by_hand(state, tmp_path):
    """The q/k/v split against modules whose weights are copied directly from the tensors."""
    torch.save(_part(state, PROJ), tmp_path / "mm_projector.bin")
    torch.save(_part(state, SAMP), tmp_path / "sampler.bin")
    w = import_released(tmp_path, num_heads=HEADS)
    assert w.sources == (str(tmp_path / "mm_projector.bin"), str(tmp_path / "sampler.bin"))
    hand_p = NoisyMoEProjector(in_dim=V, out_dim=L, num_tokens=N, num_heads=HEADS,
                               noise="reference", mode="reference", dtype=F64).eval()
    hand_c = QueryCompressor(dim=V, num_queries=M, num_heads=HEADS, mode="reference",
                             dtype=F64).eval()
    with torch.no_grad():
        for module, prefix in ((hand_p.query_expert, PROJ + "attn."), (hand_c, SAMP)):
            wq, wk, wv = state[prefix + "attn.in_proj_weight"].split(V)
            bq, bk, bv = state[prefix + "attn.in_proj_bias"].split(V)
            for lin, wt, bs in ((module.q_proj, wq, bq), (module.k_proj, wk, bk),
                                (module.v_proj, wv, bv)):
                lin.weight.copy_(wt)
                lin.bias.copy_(bs)
            module.out_proj.weight.copy_(state[prefix + "attn.out_proj.weight"])
            module.out_proj.bias.copy_(state[prefix + "attn.out_proj.bias"])
            for name in ("query", "pos_embed", "ln_q.weight", "ln_q.bias", "ln_kv.weight",
                         "ln_kv.bias", "ln_post.weight", "ln_post.bias"):
                target = (module.get_buffer(name) if name == "pos_embed"
                          else module.get_parameter(name))
                target.copy_(state[prefix + name])
        for i in (0, 2):
            hand_p.mlp[i].weight.copy_(state[f"{PROJ}projection.{i}.weight"])
            hand_p.mlp[i].bias.copy_(state[f"{PROJ}projection.{i}.bias"])
        hand_p.w_gate.copy_(state[PROJ + "w_gate"])
        hand_p.w_noise.copy_(state[PROJ + "w_noise"])
        x, tiles = _x(2, N, V), _x(3, 16, V, seed=3)
        assert torch.equal(w.projector.eval()(x).tokens, hand_p(x).tokens)
        assert torch.equal(w.compressor.eval()(tiles), hand_c(tiles))
    # training mode: the released noise rule with a fixed ε agrees too
    hand_p.train()
    eps = _x(2, N, 2, seed=4)
    with torch.no_grad():
        assert torch.equal(w.projector.train()(x, noise_sample=eps).tokens,
                           hand_p(x, noise_sample=eps).tokens)


@pytest.mark.parametrize("dtype", [F64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_export_reproduces_the_original_dict_bit_exactly(dtype, tmp_path):
    state = released_state(seed=5, dtype=dtype)
    torch.save(state, tmp_path / "adapter.bin")
    w = import_released(tmp_path / "adapter.bin")
    assert w.projector.w_gate.dtype == dtype
    out = export_released(w)
    assert sorted(out) == sorted(state)
    for k in state:
        assert out[k].dtype == state[k].dtype and torch.equal(out[k], state[k]), k
    # the composed adapter exports the same dict
    adapter = w.adapter()
    assert all(torch.equal(export_released(adapter)[k], state[k]) for k in state)
    assert sorted(export_released(adapter, prefix="")) == sorted(k[len("model."):] for k in state)


@pytest.mark.parametrize("name", ["x.safetensors", "x.bin", "released_dir"])
def test_save_released_round_trips(state, tmp_path, name):
    w = import_released(state)
    path = save_released(w, tmp_path / name)
    if name == "released_dir":
        assert sorted(os.listdir(path)) == ["mm_projector.bin", "sampler.bin"]
        assert sorted(torch.load(path / "sampler.bin", weights_only=True)) == \
            sorted(_part(state, SAMP))
    assert not [p for p in tmp_path.rglob("*.tmp")]
    again = export_released(import_released(path))
    assert sorted(again) == sorted(state) and all(torch.equal(again[k], state[k]) for k in state)


def test_prefixes_bare_keys_and_single_parts(state):
    bare_p = _plain(state, PROJ)
    short_c = {"sampler.post_qformer." + k: v for k, v in _plain(state, SAMP).items()}
    w = import_released(bare_p)
    assert w.compressor is None and isinstance(w.projector, NoisyMoEProjector)
    assert w.projector.query_expert.num_heads == 1  # the released rule: max(1, 32 // 128)
    w = import_released(short_c)
    assert w.projector is None and w.compressor.num_queries == M
    w = import_released(_plain(state, SAMP), part="sampler")
    assert torch.equal(export_released(w.compressor)[SAMP + "query"], state[SAMP + "query"])
    assert sorted(export_released(w.compressor, prefix="")) == sorted(short_c)
    assert sorted(export_released(import_released(bare_p).projector)) == sorted(_part(state, PROJ))


def test_parameter_only_projector_gets_released_buffers_and_mixed_dtypes(tmp_path):
    state = released_state(seed=7, dtype=torch.bfloat16)
    del state[PROJ + "mean"], state[PROJ + "std"]  # the released trainer saves parameters only
    state[SAMP + "pos_embed"] = state[SAMP + "pos_embed"].to(torch.float16)
    w = import_released(state)
    assert w.projector.mean.dtype == torch.bfloat16 and float(w.projector.std) == 1.0
    assert w.compressor.pos_embed.dtype == torch.bfloat16
    out = export_released(w)
    assert float(out[PROJ + "mean"]) == 0.0 and out[PROJ + "std"].dtype == torch.bfloat16
    w = import_released(state, dtype=torch.float32)
    assert {p.dtype for p in w.projector.state_dict().values()} == {torch.float32}


def test_kv_proj_and_post_proj_are_linear_weights(state):
    g = torch.Generator().manual_seed(9)
    state = dict(state)
    sampler = _plain(state, SAMP)
    sampler["kv_proj.weight"] = torch.randn(V, 20, generator=g, dtype=F64)  # Linear(20 -> V)
    sampler["proj.weight"] = torch.randn(V, V, generator=g, dtype=F64)
    sampler["proj.bias"] = torch.randn(V, generator=g, dtype=F64)
    w = import_released(sampler, part="sampler", num_heads=HEADS)
    comp = w.compressor
    assert (comp.kv_dim, comp.out_dim) == (20, V)
    x = _x(2, 16, 20, seed=8)
    ref = released_resampler(sampler, F.linear(x, sampler["kv_proj.weight"]))
    with torch.no_grad():
        _assert_close(comp(x), F.linear(ref, sampler["proj.weight"], sampler["proj.bias"]))


def test_adapter_composes_as_released(state):
    w = import_released(state, num_heads=HEADS)
    adapter = w.adapter().eval()
    assert adapter.config.separator == "embedding" and adapter.router.config.text_pool == "sum"
    assert adapter.projector.w_gate.data_ptr() == w.projector.w_gate.data_ptr()  # no copy
    g, tiles, sep = _x(2, N, V), _x(3, 16, V, seed=2), _x(L, seed=3)
    with torch.no_grad():
        out = adapter(g, tiles, grids=[(1, 1), (2, 1)], separator_embeds=sep, router_gamma=1.0)
        glob = released_gated_block(_plain(state, PROJ), g)
        proj = _plain(state, PROJ)
        comp = released_resampler(_plain(state, SAMP), tiles)
        local = F.linear(F.gelu(F.linear(comp, proj["projection.0.weight"],
                                         proj["projection.0.bias"])),
                         proj["projection.2.weight"], proj["projection.2.bias"])  # (3, 4, L)
        # image 1: two tiles side by side, each a 2x2 query grid -> raster rows of 4 tokens
        raster1 = local[1:].reshape(2, 2, 2, L).permute(1, 0, 2, 3).reshape(2 * M, L)
        ref = torch.cat([glob[0], sep[None], local[0], glob[1], sep[None], raster1])
    assert out.lengths.tolist() == [N + 1 + M, N + 1 + 2 * M]
    _assert_close(out.packed, ref)


# ---------------------------------------------------------------------------------- errors


def test_missing_unexpected_and_foreign_keys(state, tmp_path):
    broken = {k: v for k, v in state.items() if not k.endswith("attn.in_proj_bias")}
    with pytest.raises(CheckpointError, match=r"missing keys \['model\.mm_projector\.attn\.attn\."
                                              r"in_proj_bias'\]"):
        import_released(broken)
    extra = {**state, PROJ + "attn.extra": torch.ones(1)}
    with pytest.raises(CheckpointError, match=r"unexpected keys \['model\.mm_projector\.attn\."
                                              r"extra'\]"):
        import_released(extra)
    assert import_released(extra, strict=False).projector is not None
    torch.save({**_part(state, PROJ), "model.layers.0.w": torch.ones(1)},
               tmp_path / "mm_projector.bin")
    with pytest.raises(CheckpointError, match=r"mm_projector\.bin.*unexpected keys "
                                              r"\['model\.layers\.0\.w'\]"):
        import_released(tmp_path / "mm_projector.bin")
    assert import_released(tmp_path / "mm_projector.bin", strict=False).compressor is None
    with pytest.raises(CheckpointError, match=r"given twice"):
        import_released({**state, "mm_projector.w_gate": state[PROJ + "w_gate"]})
    with pytest.raises(CheckpointError, match=r"no released SliME weights"):
        import_released({"model.layers.0.w": torch.ones(1)})
    half = {k: v for k, v in _plain(state, SAMP).items()}
    half["proj.bias"] = torch.ones(V, dtype=F64)
    with pytest.raises(CheckpointError, match=r"without their partner \['model\.sampler\."
                                              r"post_qformer\.proj\.bias'\]"):
        import_released(half, part="sampler")


def test_shape_mismatches_name_both_shapes(state):
    bad = {**state, PROJ + "w_noise": torch.ones(V, 3, dtype=F64),
           SAMP + "attn.in_proj_weight": torch.ones(3 * V, V - 1, dtype=F64)}
    with pytest.raises(CheckpointError) as info:
        import_released(bad)
    msg = str(info.value)
    assert "model.mm_projector.w_noise: file (32, 3) vs expected (32, 2)" in msg
    with pytest.raises(CheckpointError, match=r"post_qformer\.attn\.in_proj_weight: file "
                                              r"\(96, 31\) vs expected \(96, 32\)"):
        import_released(_part(bad, SAMP))
    with pytest.raises(CheckpointError, match=r"projector shapes give no valid module.*num_tokens"):
        import_released({**state, PROJ + "attn.query": torch.ones(15, V, dtype=F64)})
    with pytest.raises(CheckpointError, match=r"query must be a matrix, got shape \(4,\)"):
        import_released({**state, SAMP + "query": torch.ones(4, dtype=F64)})
    with pytest.raises(CheckpointError, match=r"vision_dim=64 but the NoisyMoEProjector "
                                              r"weights have 32"):
        import_released(state, vision_dim=64)
    with pytest.raises(CheckpointError, match=r"llm_dim=8 but"):
        import_released(state, llm_dim=8)
    with pytest.raises(CheckpointError, match=r"not floating point: \['model\.mm_projector\.std'"):
        import_released({**state, PROJ + "std": torch.ones(1, dtype=torch.long)})


class _Payload:
    def __reduce__(self):
        return (os.getpid, ())


def test_bad_files(state, tmp_path):
    missing = tmp_path / "nope.bin"
    with pytest.raises(CheckpointError, match=r"nope\.bin' does not exist"):
        import_released(missing)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.bin' is empty \(0 bytes\)"):
        import_released(tmp_path / "empty.bin")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.safetensors' is empty"):
        import_released(tmp_path / "empty.safetensors")
    (tmp_path / "junk.bin").write_bytes(b"\x00not a pickle at all" * 10)
    with pytest.raises(CheckpointError, match=r"junk\.bin'.*(not a readable torch weights file|"
                                              r"refused by torch\.load\(weights_only=True\))"):
        import_released(tmp_path / "junk.bin")
    torch.save({"w": torch.ones(1), "x": _Payload()}, tmp_path / "code.bin")
    with pytest.raises(CheckpointError, match=r"code\.bin' was refused by torch\.load\("
                                              r"weights_only=True\): it needs arbitrary code"):
        import_released(tmp_path / "code.bin")
    torch.save(torch.ones(3), tmp_path / "tensor.bin")
    with pytest.raises(CheckpointError, match=r"tensor\.bin' holds a Tensor, not a state dict"):
        import_released(tmp_path / "tensor.bin")
    torch.save({"w_gate": torch.ones(1), "note": [1]}, tmp_path / "mixed.bin")
    with pytest.raises(CheckpointError, match=r"not name -> tensor: \['note'\]"):
        import_released(tmp_path / "mixed.bin")
    good = tmp_path / "good.safetensors"
    save_file(state, str(good))
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors' is not a readable safetensors"):
        import_released(tmp_path / "cut.safetensors")
    (tmp_path / "dir").mkdir()
    with pytest.raises(CheckpointError, match=r"holds neither mm_projector\.bin, sampler\.bin"):
        import_released(tmp_path / "dir")
    with pytest.raises(CheckpointError, match=r"source must be a path or a state dict, got int"):
        import_released(3)
    with pytest.raises(ValueError, match=r"part must be None or one of"):
        import_released(state, part="llm")
    with pytest.raises(ValueError, match=r"num_heads must be None or a positive int, got 0"):
        import_released(state, num_heads=0)
    with pytest.raises(CheckpointError, match=r"sampler shapes give no valid module: "
                                              r"QueryCompressorConfig: num_heads=3 does not divide dim=32"):
        import_released(_part(state, SAMP), num_heads=3)


@pytest.mark.filterwarnings("ignore:export_released:UserWarning")
def test_export_and_adapter_errors(state):
    only_proj = import_released(_part(state, PROJ))
    with pytest.raises(CheckpointError, match=r"needs both modules; compressor "
                                              r"\(sampler\.post_qformer\) missing"):
        only_proj.adapter()
    learned = SliMEVisualAdapter(projector=only_proj.projector.config,
                                 compressor=import_released(_part(state, SAMP)).compressor.config)
    with pytest.raises(CheckpointError, match=r"no learned separator and no separate local MLP"):
        export_released(learned)
    own = NoisyMoEProjector(in_dim=V, out_dim=L, num_tokens=N, shared_mlp=False)
    with pytest.raises(CheckpointError, match=r"'query_mlp\.0\.weight' has no place in the "
                                              r"released layout \(a separate query-expert MLP\)"):
        export_released(own)
    with pytest.raises(CheckpointError, match=r"cannot export a Linear"):
        export_released(nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match=r"nothing for the released \['pos_embed'\]"):
        export_released(QueryCompressor(dim=V, num_queries=M, pos_embed="none"))
    with pytest.raises(CheckpointError, match=r"meta device have no values: \['k_proj.bias'"):
        export_released(QueryCompressor(dim=V, num_queries=M, device="meta"))
    # a paper-mode projector exports with the released buffers filled in
    paper = export_released(NoisyMoEProjector(in_dim=V, out_dim=L, num_tokens=N))
    assert float(paper[PROJ + "std"]) == 1.0 and sorted(paper) == sorted(_part(state, PROJ))


def test_exporting_a_paper_mode_module_warns():
    from slime_adapters.compressor import QueryCompressor
    from slime_adapters.checkpoint import export_released

    paper = QueryCompressor(dim=32, num_queries=4, num_heads=2, mode="paper")
    with pytest.warns(UserWarning, match="mode='paper'"):
        out = export_released(paper)
    assert any(k.endswith("post_qformer.query") for k in out)
