"""NoisyMoEProjector vs the float64 loop oracle: fusion, forced experts, gates, gradients."""

from __future__ import annotations

import pytest
import torch

from slime_adapters.projector import MoEOutput, NoisyMoEProjector, NoisyMoEProjectorConfig
from slime_adapters.testing import noisy_moe_reference

F64 = torch.float64


def _randomise(module: torch.nn.Module, seed: int = 0, gate_scale: float = 0.5):
    """Random values everywhere (gate and noise weights included, else the gates sit at 0.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = gate_scale if name in ("w_gate", "w_noise") else 0.3
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype) * scale)
    return module


def _x(*shape, seed=1, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def _eps(b, s, seed=2):
    return torch.randn(b, s, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _assert_close(out, ref, tol=1e-10):
    err = (out - ref).abs()
    idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    assert err.max() <= tol * max(1.0, ref.abs().max().item()), (
        f"max error {err.max().item():.3g} at {idx}: got {out[idx].item()!r}, "
        f"oracle {ref[idx].item()!r}"
    )


def _proj(**kw):
    base = {"in_dim": 48, "out_dim": 20, "num_tokens": 9, "num_heads": 3, "dtype": F64}
    return _randomise(NoisyMoEProjector(**{**base, **kw})).eval()  # nn.Module starts in train mode


# (views, tokens, in_dim, heads, out_dim, shared_mlp, mode, noise)
CASES = [
    pytest.param(1, 4, 48, 3, 20, True, "paper", "learned", id="1view-3heads-shared"),
    pytest.param(3, 9, 16, None, 12, False, "paper", "learned", id="3views-separate-mlp"),
    pytest.param(2, 16, 24, 2, 8, True, "reference", "reference", id="reference"),
    pytest.param(2, 1, 8, 1, 5, True, "reference", "learned", id="1token-mixed"),
]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-fixed-noise"])
@pytest.mark.parametrize("b,s,d,heads,o,shared,mode,noise", CASES)
def test_matches_oracle_float64(b, s, d, heads, o, shared, mode, noise, train):
    m = _proj(in_dim=d, out_dim=o, num_tokens=s, num_heads=heads, shared_mlp=shared, mode=mode,
              noise=noise, balance_loss_coef=0.3).train(train)
    x, eps = _x(b, s, d), _eps(b, s)
    out = m(x, noise_sample=eps)
    assert isinstance(out, MoEOutput)
    assert out.tokens.shape == (b, s, o) and out.gates.shape == (b, s, 2)
    tokens, gates, aux = noisy_moe_reference(m, x, noise_sample=eps)
    _assert_close(out.tokens, tokens)
    _assert_close(out.gates, gates, tol=1e-12)
    _assert_close(out.aux_loss, aux, tol=1e-12)
    _assert_close(out.gate_mean, gates.mean(dim=(0, 1)), tol=1e-12)
    assert not out.gate_mean.requires_grad


def test_noise_only_in_training_and_depends_on_rule():
    m = _proj()
    x = _x(2, 9, 48)
    eval_gates = m.eval()(x, noise_sample=_eps(2, 9)).gates
    torch.testing.assert_close(eval_gates, m(x).gates, rtol=0, atol=0)  # sample ignored in eval
    m.train()
    a, b = m(x, noise_sample=_eps(2, 9, seed=3)).gates, m(x, noise_sample=_eps(2, 9, seed=4)).gates
    assert (a - b).abs().max() > 1e-3
    ref_rule = _proj(noise="reference").train()
    with torch.no_grad():
        ref_rule.w_noise.fill_(100.0)  # never read by the released rule
    torch.testing.assert_close(ref_rule(x, noise_sample=_eps(2, 9)).gates,
                               noisy_moe_reference(ref_rule, x, noise_sample=_eps(2, 9))[1])
    torch.manual_seed(0)
    drawn = m(x).gates  # fresh noise when no sample is given
    assert (drawn - eval_gates).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["paper", "reference"])
@pytest.mark.parametrize("train", [False, True])
def test_fused_w2_equals_two_products(mode, train):
    m = _proj(mode=mode, noise="reference" if mode == "reference" else "learned").train(train)
    x, eps = _x(3, 9, 48), _eps(3, 9)
    fused = m(x, noise_sample=eps).tokens
    m.fuse_w2 = False
    unfused = m(x, noise_sample=eps).tokens
    _assert_close(fused, unfused, tol=1e-12)


def test_force_expert_zero_is_the_mlp_alone_and_skips_the_query_expert():
    m = _proj()
    calls = []
    m.query_expert.register_forward_pre_hook(lambda mod, args: calls.append(1))
    x = _x(2, 9, 48)
    out = m(x, force_expert=0)
    assert not calls
    torch.testing.assert_close(out.tokens, m.mlp(x), rtol=0, atol=0)
    assert (out.gates[..., 0] == 1).all() and (out.gates[..., 1] == 0).all()
    assert out.aux_loss.item() == 0 and out.gate_mean.tolist() == [1.0, 0.0]
    m.force_expert = 0  # the constructor's setting, overridable per call
    assert not calls and torch.equal(m(x).tokens, out.tokens)
    m(x, force_expert=1)
    assert calls == [1]


@pytest.mark.parametrize("shared", [True, False])
def test_force_expert_one(shared):
    m = _proj(shared_mlp=shared, force_expert=1)
    x = _x(2, 9, 48)
    out = m(x)
    q_mlp = m.mlp if shared else m.query_mlp
    torch.testing.assert_close(out.tokens, q_mlp(m.query_expert(x)), rtol=0, atol=0)
    assert out.gate_mean.tolist() == [0.0, 1.0]
    _assert_close(out.tokens, noisy_moe_reference(m, x)[0])


def test_zero_initialised_gate_starts_even_and_gates_sum_to_one():
    m = NoisyMoEProjector(in_dim=16, out_dim=8, num_tokens=4, num_heads=2, dtype=F64).eval()
    out = m(_x(3, 4, 16))
    assert torch.equal(out.gates, torch.full_like(out.gates, 0.5))
    assert out.gate_mean.tolist() == [0.5, 0.5]
    r = _proj().train()
    g = r(_x(3, 9, 48), noise_sample=_eps(3, 9)).gates
    _assert_close(g.sum(-1), torch.ones_like(g[..., 0]), tol=1e-14)
    assert (g.min() > 0) and (g.max() < 1)
    # the released renormalisation p / (Σp + 1e-6)
    rr = _proj(mode="reference")
    g = rr(_x(3, 9, 48)).gates
    _assert_close(g.sum(-1), torch.full_like(g[..., 0], 1 / (1 + 1e-6)), tol=1e-14)


def test_balance_loss_formula_and_gradient():
    m = NoisyMoEProjector(in_dim=16, out_dim=8, num_tokens=4, num_heads=2,
                          balance_loss_coef=0.25, dtype=F64).eval()
    x = _x(2, 4, 16)
    out = m(x)
    assert out.aux_loss.item() == pytest.approx(0.25)  # balanced: c · 2 · (0.25 + 0.25)
    with torch.no_grad():
        m.w_gate.copy_(torch.randn(16, 2, dtype=F64))
    out = m(x)
    p = out.gates.mean(dim=(0, 1))
    assert out.aux_loss.item() == pytest.approx(0.25 * 2 * (p * p).sum().item(), rel=1e-12)
    assert out.aux_loss.item() > 0.25
    out.aux_loss.backward()
    assert m.w_gate.grad.abs().sum() > 0
    assert NoisyMoEProjector(in_dim=16, out_dim=8, num_tokens=4)(x.float()).aux_loss.item() == 0


def test_gradients_joint_and_forced():
    m = _proj(balance_loss_coef=0.1, dtype=torch.float32).train()
    x = _x(2, 9, 48, dtype=torch.float32)
    out = m(x)
    (out.tokens.square().mean() + out.aux_loss).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name

    m.zero_grad(set_to_none=True)
    m(x, force_expert=0).tokens.square().mean().backward()
    for name, p in m.named_parameters():
        if name.startswith(("query_expert.", "w_gate", "w_noise")):
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name

    m.zero_grad(set_to_none=True)
    m(x, force_expert=1).tokens.square().mean().backward()
    assert all(p.grad is not None for p in m.query_expert.parameters())
    assert m.w_gate.grad is None

    r = _proj(noise="reference", dtype=torch.float32).train()
    r(x).tokens.square().mean().backward()
    assert r.w_noise.grad is None and r.w_gate.grad is not None  # W_noise unused, as released


def test_separate_query_mlp_gets_gradients():
    m = _proj(shared_mlp=False, dtype=torch.float32).train()
    m(_x(2, 9, 48, dtype=torch.float32)).tokens.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.query_mlp.parameters())


def test_gate_math_float32_under_autocast():
    m = _proj(dtype=torch.float32).train()
    x = _x(2, 9, 48, dtype=torch.float32)
    ref = m(x, noise_sample=_eps(2, 9)).gates
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, noise_sample=_eps(2, 9))
    assert out.gates.dtype == torch.float32 and out.tokens.dtype == torch.bfloat16
    torch.testing.assert_close(out.gates, ref, rtol=1e-6, atol=1e-6)  # no bf16 rounding inside


def test_view_does_not_depend_on_batch_mates():
    m = _proj()
    x = _x(4, 9, 48)
    full = m(x).tokens
    torch.testing.assert_close(m(x[2:3]).tokens[0], full[2], rtol=1e-12, atol=1e-12)


def test_names_roles_and_reference_buffers():
    paper = NoisyMoEProjector(in_dim=16, out_dim=8, num_tokens=4)
    keys = set(paper.state_dict())
    assert {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "w_gate", "w_noise",
            "query_expert.query", "query_expert.pos_embed", "query_expert.q_proj.weight"} <= keys
    assert "mean" not in keys and not any(k.startswith("query_mlp") for k in keys)
    assert paper.w_gate.shape == (16, 2)
    assert (paper.w_gate == 0).all() and (paper.w_noise == 0).all()
    ref = NoisyMoEProjector(in_dim=16, out_dim=8, num_tokens=4, mode="reference", shared_mlp=False)
    assert ref.mean.tolist() == [0.0] and ref.std.tolist() == [1.0]
    assert "mean" not in dict(ref.named_parameters())
    assert any(k.startswith("query_mlp.2") for k in ref.state_dict())
    assert ref.query_expert.mode == "reference" and ref.query_expert.num_queries == 4


def test_config_roundtrip_meta_and_backend(tmp_path):
    m = NoisyMoEProjector(in_dim=32, out_dim=8, num_tokens=16, noise="reference",
                          balance_loss_coef=0.5, force_expert=1, mode="reference")
    cfg = NoisyMoEProjectorConfig.from_json(m.config.to_json(tmp_path / "p.json"))
    assert cfg == m.config and NoisyMoEProjector.from_config(cfg).config == cfg
    meta = NoisyMoEProjector(device="meta", dtype=torch.bfloat16)
    assert meta.mlp[2].weight.shape == (4096, 4096) and meta.mlp[2].weight.is_meta
    assert meta.w_gate.dtype == torch.bfloat16 and meta.query_expert.query.shape == (576, 1024)
    m.attn_backend = "math"
    assert m.query_expert.attn_backend == "math"


def test_reset_parameters_restores_even_gates():
    m = _proj()
    m.reset_parameters()
    assert (m.w_gate == 0).all() and (m.w_noise == 0).all()
    assert torch.equal(m(_x(1, 9, 48)).gates, torch.full((1, 9, 2), 0.5, dtype=F64))


@pytest.mark.parametrize("kwargs,match", [
    ({"num_tokens": 10}, "num_tokens must be a positive perfect square"),
    ({"noise": "gaussian"}, "noise must be one of"),
    ({"mode": "released"}, "mode must be one of"),
    ({"force_expert": 2}, "force_expert must be None, 0"),
    ({"force_expert": True}, "force_expert must be None, 0"),
    ({"balance_loss_coef": -1.0}, "balance_loss_coef must be a finite number >= 0"),
    ({"in_dim": 0}, "in_dim must be an int >= 1"),
    ({"num_heads": 5}, "num_heads=5 does not divide dim=16"),
    ({"attn_backend": "flash"}, "attn_backend must be one of"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoisyMoEProjector(**{"in_dim": 16, "out_dim": 8, "num_tokens": 4, **kwargs})


def test_forward_errors():
    m = NoisyMoEProjector(in_dim=16, out_dim=8, num_tokens=4, num_heads=2)
    with pytest.raises(ValueError, match=r"x has feature width 12, expected in_dim=16"):
        m(torch.randn(2, 4, 12))
    with pytest.raises(ValueError, match=r"x must have rank 3"):
        m(torch.randn(4, 16))
    with pytest.raises(ValueError, match=r"x has 9 tokens per view, expected num_tokens=4"):
        m(torch.randn(2, 9, 16))
    with pytest.raises(ValueError, match=r"x must be a torch.Tensor"):
        m(None)
    with pytest.raises(ValueError, match="force_expert must be None, 0"):
        m(torch.randn(2, 4, 16), force_expert=3)
    with pytest.raises(ValueError, match=r"noise_sample must be a tensor of shape \(2, 4, 2\)"):
        m(torch.randn(2, 4, 16), noise_sample=torch.randn(2, 4))
    x = torch.randn(2, 4, 16)
    x[0, 1, 2] = float("inf")
    m.check_finite = True
    with pytest.raises(ValueError, match=r"x holds NaN or inf \(check_finite=True\)"):
        m(x)


def test_meta_then_materialise():
    """Built on the meta device (no memory), materialised, re-initialised: a working module."""
    m = NoisyMoEProjector(in_dim=16, out_dim=8, num_tokens=4, num_heads=2, mode="reference",
                          device="meta")
    m = m.to_empty(device="cpu")
    m.reset_parameters()
    ref = NoisyMoEProjector(in_dim=16, out_dim=8, num_tokens=4, num_heads=2, mode="reference")
    torch.testing.assert_close(m.query_expert.pos_embed, ref.query_expert.pos_embed)
    assert m.mean.item() == 0.0 and m.std.item() == 1.0
    out = m.eval()(torch.randn(2, 4, 16))
    assert torch.isfinite(out.tokens).all()
    assert torch.allclose(out.gates, torch.full_like(out.gates, 0.5 / (1 + 1e-6)))
