"""Attention backends against the float64 loop oracle, packing, padding, probing and errors."""

from __future__ import annotations

import importlib

import pytest
import torch

from slime_adapters.ops.attention import (
    AttentionInputError,
    BackendUnavailableError,
    ProbeCache,
    attention,
    backend_reasons,
    select_backend,
)
from slime_adapters.testing import attention_reference

# the package re-exports the function under the module's name; fetch the module itself
attn_mod = importlib.import_module("slime_adapters.ops.attention")
backends_mod = importlib.import_module("slime_adapters.ops.backends")

CPU_BACKENDS = ("sdpa", "math")


def _qkv(b, m, n, h, d, dv=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, m, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, n, h, dv or d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _rel_err(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv(attn_mod.ENV_VAR, raising=False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "shape", [(2, 7, 13, 3, 16), (3, 144, 576, 2, 8), (1, 1, 1, 1, 4), (2, 5, 9, 5, 24, 12)]
)
def test_backend_matches_oracle_float64(backend, shape):
    q, k, v = _qkv(*shape)
    out = attention(q, k, v, backend=backend)
    ref = attention_reference(q, k, v)
    assert out.shape == ref.shape
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_backend_reduced_precision_within_tolerance(backend, dtype, tol):
    q64, k64, v64 = _qkv(2, 33, 47, 4, 32)
    ref = attention_reference(q64, k64, v64)
    out = attention(q64.to(dtype), k64.to(dtype), v64.to(dtype), backend=backend)
    assert out.dtype == dtype
    # bf16 inputs are themselves rounded: compare to the oracle on the rounded inputs
    ref = attention_reference(*(t.to(dtype).double() for t in (q64, k64, v64)))
    assert _rel_err(out, ref) <= tol


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scale_argument(backend):
    q, k, v = _qkv(1, 6, 8, 2, 8)
    out = attention(q, k, v, scale=0.37, backend=backend)
    torch.testing.assert_close(out, attention_reference(q, k, v, scale=0.37))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lens", [[3, 5, 1, 7], [12], [4, 0, 6]])
def test_packed_equals_each_sequence_alone(backend, lens):
    total = sum(lens)
    q, k, v = _qkv(1, total, total, 3, 8)
    out = attention(q, k, v, seqlens=lens, backend=backend)
    start = 0
    for n in lens:
        alone = attention_reference(q[:, start:start + n], k[:, start:start + n], v[:, start:start + n])
        torch.testing.assert_close(out[:, start:start + n], alone, rtol=1e-10, atol=1e-10)
        start += n


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_cross_attention_with_kv_seqlens(backend):
    q_lens, kv_lens = [2, 5, 3], [7, 1, 4]
    q, _, _ = _qkv(1, sum(q_lens), 1, 2, 8, seed=1)
    _, k, v = _qkv(1, 1, sum(kv_lens), 2, 8, seed=2)
    out = attention(q, k, v, seqlens=q_lens, kv_seqlens=kv_lens, backend=backend)
    ref = attention_reference(q, k, v, seqlens=q_lens, kv_seqlens=kv_lens)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # tensors as lengths give the same result
    out_t = attention(q, k, v, seqlens=torch.tensor(q_lens), kv_seqlens=torch.tensor(kv_lens),
                      backend=backend)
    torch.testing.assert_close(out_t, out)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_sequences_do_not_see_each_other(backend):
    lens = [4, 6]
    q, k, v = _qkv(1, 10, 10, 2, 8)
    base = attention(q, k, v, seqlens=lens, backend=backend)
    k2, v2 = k.clone(), v.clone()
    k2[:, 4:] = float("nan")  # poison the second sequence entirely
    v2[:, 4:] = float("nan")
    out = attention(q, k2, v2, seqlens=lens, backend=backend)
    torch.testing.assert_close(out[:, :4], base[:, :4])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_in_padding_does_not_leak(backend):
    q, k, v = _qkv(3, 5, 11, 2, 8)
    pad = torch.zeros(3, 11, dtype=torch.bool)
    pad[0, 7:] = True
    pad[2, :3] = True
    k_p, v_p = k.clone(), v.clone()
    k_p[pad] = float("nan")
    v_p[pad] = float("inf")
    out = attention(q, k_p, v_p, key_mask=~pad, backend=backend)
    assert torch.isfinite(out).all()
    ref = attention_reference(q, k, v, key_mask=~pad)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # and equals attending to the valid keys only
    torch.testing.assert_close(out[0], attention_reference(q[:1], k[:1, :7], v[:1, :7])[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fully_padded_row_gives_zeros(backend):
    q, k, v = _qkv(2, 3, 4, 1, 8)
    pad = torch.zeros(2, 4, dtype=torch.bool)
    pad[1] = True
    out = attention(q, k, v, key_mask=~pad, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[0], attention_reference(q[:1], k[:1], v[:1])[0])


def test_gradients_agree_between_backends():
    q, k, v = _qkv(2, 9, 10, 2, 8)
    grads = {}
    for backend in CPU_BACKENDS:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        attention(*leaves, backend=backend).square().sum().backward()
        grads[backend] = [t.grad for t in leaves]
    for a, b in zip(grads["sdpa"], grads["math"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------- selection


def test_auto_on_cpu_picks_sdpa_and_xformers_reports_why():
    q, k, v = _qkv(1, 4, 4, 1, 8, dtype=torch.float32)
    cache = ProbeCache()
    assert select_backend(q, k, v, probe_cache=cache) == "sdpa"
    reasons = backend_reasons(q, k, v, probe_cache=cache)
    assert reasons["sdpa"] == [] and reasons["math"] == []
    assert reasons["xformers"] and any("cpu" in r.lower() for r in reasons["xformers"])


def test_explicit_xformers_on_cpu_raises_with_reason():
    q, k, v = _qkv(1, 4, 4, 1, 8, dtype=torch.float32)
    with pytest.raises(BackendUnavailableError, match=r"xformers.*CUDA only"):
        attention(q, k, v, backend="xformers")


def test_auto_skips_backend_whose_probe_failed(monkeypatch):
    """A backend that imports but whose probe fails is never chosen by auto."""
    q, k, v = _qkv(1, 4, 4, 1, 8, dtype=torch.float32)

    def broken(p):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setitem(backends_mod.IMPLS, "sdpa", broken)
    cache = ProbeCache()
    assert select_backend(q, k, v, probe_cache=cache) == "math"
    out = attention(q, k, v, probe_cache=cache)
    torch.testing.assert_close(out.double(), attention_reference(q, k, v).double(),
                               rtol=1e-5, atol=1e-6)
    assert "no kernel image" in cache.reasons("sdpa", q.device, q.dtype)[0]
    with pytest.raises(BackendUnavailableError, match="no kernel image"):
        attention(q, k, v, backend="sdpa", probe_cache=cache)


def test_probe_rejects_backend_with_wrong_results(monkeypatch):
    monkeypatch.setitem(backends_mod.IMPLS, "sdpa", lambda p: backends_mod.IMPLS["math"](p) + 1.0)
    q, k, v = _qkv(1, 4, 4, 1, 8, dtype=torch.float32)
    cache = ProbeCache()
    assert "disagrees" in backend_reasons(q, k, v, probe_cache=cache)["sdpa"][0]
    assert select_backend(q, k, v, probe_cache=cache) == "math"


def test_probe_is_cached_per_device_and_dtype(monkeypatch):
    calls = []
    real = backends_mod._probe_one
    monkeypatch.setattr(backends_mod, "_probe_one", lambda *a: calls.append(a) or real(*a))
    cache = ProbeCache()
    for dtype in (torch.float32, torch.float32, torch.float64, torch.float64):
        q, k, v = _qkv(1, 3, 3, 1, 8, dtype=dtype)
        attention(q, k, v, probe_cache=cache)
    assert [c[2] for c in calls] == [torch.float32, torch.float64]
    cache.clear()
    attention(q, k, v, probe_cache=cache)
    assert len(calls) == 3


def test_env_override(monkeypatch):
    q, k, v = _qkv(1, 3, 3, 1, 8)
    monkeypatch.setenv(attn_mod.ENV_VAR, "math")
    assert select_backend(q, k, v) == "math"
    monkeypatch.setenv(attn_mod.ENV_VAR, "xformers")
    with pytest.raises(BackendUnavailableError, match="xformers"):
        attention(q, k, v)
    monkeypatch.setenv(attn_mod.ENV_VAR, "flash9")
    with pytest.raises(ValueError, match="SLIME_ADAPTERS_ATTN='flash9'"):
        attention(q, k, v)
    # an explicit backend wins over the environment
    assert select_backend(q, k, v, backend="sdpa") == "sdpa"


def test_unknown_backend_name():
    q, k, v = _qkv(1, 3, 3, 1, 8)
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'"):
        attention(q, k, v, backend="cuda")


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda q, k, v: (q[0], k, v), "q must have rank 4"),
        (lambda q, k, v: (q, k[..., None], v), "k must have rank 4"),
        (lambda q, k, v: (q, k[:, :, :1], v[:, :, :1]), "head counts differ"),
        (lambda q, k, v: (q, k[..., :4], v), "head widths differ"),
        (lambda q, k, v: (q, k, v[:, :3]), "k and v token counts differ"),
        (lambda q, k, v: (q[:1], k, v), "batch sizes differ"),
        (lambda q, k, v: (q, k.float(), v), "dtypes differ"),
        (lambda q, k, v: (q.long(), k.long(), v.long()), "must be floating point"),
        (lambda q, k, v: (q.tolist(), k, v), "q must be a torch.Tensor"),
        (lambda q, k, v: (q, k[:, :0], v[:, :0]), "no tokens"),
    ],
)
def test_bad_shapes_raise_clear_errors(mutate, match):
    q, k, v = _qkv(2, 5, 6, 2, 8)
    with pytest.raises(AttentionInputError, match=match):
        attention(*mutate(q, k, v))


def test_bad_packed_arguments():
    q, k, v = _qkv(1, 6, 6, 1, 8)
    with pytest.raises(AttentionInputError, match="sums to 5"):
        attention(q, k, v, seqlens=[2, 3])
    with pytest.raises(AttentionInputError, match="batch size 1"):
        attention(*_qkv(2, 6, 6, 1, 8), seqlens=[6])
    with pytest.raises(AttentionInputError, match="non-negative"):
        attention(q, k, v, seqlens=[8, -2])
    with pytest.raises(AttentionInputError, match="kv_seqlens given without seqlens"):
        attention(q, k, v, kv_seqlens=[6])
    with pytest.raises(AttentionInputError, match="2 sequences but kv_seqlens has 1"):
        attention(q, k, v, seqlens=[3, 3], kv_seqlens=[6])
    with pytest.raises(AttentionInputError, match=r"sequences \[1\] have queries but no keys"):
        attention(q, k, v, seqlens=[3, 3], kv_seqlens=[6, 0])
    with pytest.raises(AttentionInputError, match="exclusive"):
        attention(q, k, v, seqlens=[6], key_mask=torch.ones(1, 6, dtype=torch.bool))
    with pytest.raises(AttentionInputError, match="integer tensor"):
        attention(q, k, v, seqlens=torch.tensor([3.0, 3.0]))
    # lengths given as tensors are checked too (a negative one would corrupt memory)
    with pytest.raises(AttentionInputError, match="non-negative"):
        attention(q, k, v, seqlens=torch.tensor([-1, 7]))
    with pytest.raises(AttentionInputError, match="sums to 5"):
        attention(q, k, v, seqlens=torch.tensor([2, 3]))
    with pytest.raises(AttentionInputError, match="kv_seqlens sums to 4"):
        attention(q, k, v, seqlens=[3, 3], kv_seqlens=torch.tensor([2, 2]))


def test_bad_padding_mask():
    q, k, v = _qkv(2, 5, 6, 2, 8)
    with pytest.raises(AttentionInputError, match="key_mask must be a bool tensor"):
        attention(q, k, v, key_mask=torch.zeros(2, 6))
    with pytest.raises(AttentionInputError, match=r"shape \(batch, keys\) = \(2, 6\)"):
        attention(q, k, v, key_mask=torch.zeros(2, 5, dtype=torch.bool))


def test_probe_verdict_does_not_depend_on_the_callers_autocast():
    q, k, v = _qkv(1, 12, 12, 2, 16, dtype=torch.float32)
    cache = ProbeCache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attention(q, k, v, probe_cache=cache)
    assert cache.reasons("sdpa", q.device, torch.float32) == []
    assert select_backend(q, k, v, probe_cache=cache) == "sdpa"


def test_meta_tensors_run_without_a_probe():
    q, k, v = (t.to("meta") for t in _qkv(2, 5, 7, 2, 8, dtype=torch.float32))
    cache = ProbeCache()
    out = attention(q, k, v, probe_cache=cache)
    assert out.is_meta and out.shape == (2, 5, 2, 8)
    assert select_backend(q, k, v, probe_cache=cache) == "sdpa"


def test_math_backend_keeps_bfloat16_products_in_float32():
    """At the model's shapes (144 queries × 576 keys, head width 128) the math backend in bf16
    stays within bf16's output rounding of the float64 oracle on the same (rounded) inputs; scores
    rounded to bf16 before the softmax were off by about 2e-2."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 4, 128, generator=g, dtype=torch.float64).bfloat16()
               for n in (144, 576, 576))
    ref = attention_reference(q.double(), k.double(), v.double())
    out = attention(q, k, v, backend="math")
    assert out.dtype == torch.bfloat16
    rel = float((out.double() - ref).abs().max() / ref.abs().max())
    assert rel < 5e-3, rel


# ---- one mask convention: True = a valid key ---------------------------------------------------
@pytest.mark.parametrize("fn", [attention, select_backend, backend_reasons])
def test_the_removed_padding_keyword_names_its_replacement(fn):
    q, k, v = _qkv(1, 2, 3, 1, 4)
    pad = torch.zeros(1, 3, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"no longer takes key_padding_mask=; pass key_mask "
                                        r"\(True = a valid key.*key_mask=~key_padding_mask"):
        fn(q, k, v, key_padding_mask=pad)
    with pytest.raises(TypeError, match="unexpected keyword argument 'mask'"):
        fn(q, k, v, mask=pad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_padding_convention_mask_gets_the_documented_result(backend):
    """A caller who passes True = padding gets exactly the documented True = valid result: the
    queries see the other keys (and a row of all-False gets zeros), never a silent mixture."""
    q, k, v = _qkv(2, 3, 6, 1, 8)
    valid = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    right = attention(q, k, v, key_mask=valid, backend=backend)
    torch.testing.assert_close(right[0], attention_reference(q[:1], k[:1, :4], v[:1, :4])[0])
    wrong = attention(q, k, v, key_mask=~valid, backend=backend)  # the padding convention
    torch.testing.assert_close(wrong[0], attention_reference(q[:1], k[:1, 4:], v[:1, 4:])[0])
    assert torch.equal(wrong[1], torch.zeros_like(wrong[1]))  # no valid key: zeros
    assert not torch.allclose(wrong[0], right[0])
