"""CUDA checks: attention backends and the whole adapter on a GPU against float64 CPU oracles.

Skipped as a whole without CUDA. On a CUDA machine every backend whose probe passes (sdpa,
xformers when its extension loads, math) is compared with the float64 loop oracle computed on the
CPU from the same bf16-rounded inputs: dense, key-padding-masked (NaN in the padding) and packed
input, forward and gradients; the adapter stack in bf16 on CUDA is compared with its float64 CPU
run, and its forward's host synchronisations are counted.

``SLIME_EXPECT_XFORMERS=1`` (set by ``benchmarks/gpu_session.sh`` when it installed the xformers
wheel) turns "xformers unusable in bf16" from a skip into a failure.
"""

from __future__ import annotations

import copy
import importlib
import os
import warnings

import pytest
import torch

from slime_adapters.ops.attention import (
    BACKENDS,
    ProbeCache,
    attention,
    backend_reasons,
    select_backend,
)
from slime_adapters.testing import attention_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

attn_mod = importlib.import_module("slime_adapters.ops.attention")

BF16 = torch.bfloat16
# relative to the oracle's largest magnitude: forward (the brief's bf16 tolerance) and gradients
TOL = {torch.bfloat16: (1e-2, 3e-2), torch.float32: (2e-3, 2e-3)}  # fp32: TF32 may be enabled
PACKED_LENS = [3, 77, 130, 1, 64]


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv(attn_mod.ENV_VAR, raising=False)


def _qkv(b, m, n, h, d, *, seed=0, device, dtype=BF16):
    """q, k, v drawn in float64 on the CPU, rounded to ``dtype`` on ``device``; and the float64
    CPU copies of those rounded values (what the oracle sees)."""
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, m, h, d), (b, n, h, d), (b, n, h, d))
    low = [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    return [t.to(device) for t in low], [t.double() for t in low]


def _rel_err(out, ref):
    """(worst |out − ref| / max |ref|, index of the worst element), on the CPU in float64."""
    ref = ref.detach().double().cpu()
    diff = (out.detach().double().cpu() - ref).abs()
    worst = int(diff.argmax())
    where = [int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape)]
    # an all-zero reference (the gradient of a one-key sequence) is compared absolutely
    scale = float(ref.abs().max()) or 1.0
    return float(diff.max()) / scale, where


def _assert_close(out, ref, tol, what):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    err, where = _rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g} at {where}"


def _usable_or_skip(backend, q, k, v, cache, **kw):
    reasons = backend_reasons(q, k, v, probe_cache=cache, **kw)[backend]
    if (reasons and backend == "xformers" and q.dtype == BF16
            and os.environ.get("SLIME_EXPECT_XFORMERS") == "1"):
        # only the probe's verdict is a failure: a static refusal of this input (a key padding
        # mask has no xformers path, by design) stays a skip
        probed = cache.reasons("xformers", q.device, q.dtype)
        if probed:
            pytest.fail(f"xformers was installed but its probe failed on {q.device}: {probed}")
    if reasons:
        pytest.skip(f"{backend} unusable on {q.device}/{q.dtype}: {'; '.join(reasons)}")


def _fwd_bwd(fn, leaves, grad):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    out.backward(grad.to(device=out.device, dtype=out.dtype))
    return out.detach(), [t.grad for t in leaves]


# ------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 7, 13, 3, 16), (4, 144, 576, 8, 128)])
def test_dense_matches_float64_oracle(backend, dtype, shape, device):
    (q, k, v), ref_in = _qkv(*shape, device=device, dtype=dtype)
    cache = ProbeCache()
    _usable_or_skip(backend, q, k, v, cache)
    grad = torch.randn(q.shape[:3] + v.shape[3:], generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)
    out, grads = _fwd_bwd(lambda a, b, c: attention(a, b, c, backend=backend, probe_cache=cache),
                          (q, k, v), grad)
    ref, ref_grads = _fwd_bwd(attention_reference, ref_in, grad)
    assert out.device.type == device.type and out.dtype == dtype
    tol_fwd, tol_grad = TOL[dtype]
    _assert_close(out, ref, tol_fwd, f"{backend} forward")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.device.type == device.type and g.dtype == dtype
        _assert_close(g, r, tol_grad, f"{backend} grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_mask_and_nan_in_padding(backend, device):
    (q, k, v), (q64, k64, v64) = _qkv(3, 20, 50, 4, 32, device=device)
    pad = torch.zeros(3, 50, dtype=torch.bool)
    pad[0, 31:] = True
    pad[1, :9] = True
    pad[2, 1::3] = True
    cache = ProbeCache()
    _usable_or_skip(backend, q, k, v, cache, key_mask=~pad.to(device))
    k_p, v_p = k.clone(), v.clone()
    k_p[pad.to(device)] = float("nan")
    v_p[pad.to(device)] = float("inf")
    out = attention(q, k_p, v_p, key_mask=~pad.to(device), backend=backend,
                    probe_cache=cache)
    assert torch.isfinite(out).all(), f"{backend}: NaN/inf in padding leaked into the output"
    ref = attention_reference(q64, k64, v64, key_mask=~pad)
    _assert_close(out, ref, TOL[BF16][0], f"{backend} masked forward")
    # the first sample equals attending to its 31 valid keys only
    alone = attention_reference(q64[:1], k64[:1, :31], v64[:1, :31])
    _assert_close(out[:1], alone, TOL[BF16][0], f"{backend} masked vs valid keys alone")


def test_xformers_refuses_a_key_mask(device):
    (q, k, v), _ = _qkv(1, 4, 6, 1, 16, device=device)
    reasons = backend_reasons(q, k, v, key_mask=torch.ones(1, 6, dtype=torch.bool,
                                                                       device=device),
                              probe_cache=ProbeCache())
    assert any("key_mask" in r for r in reasons["xformers"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_each_sequence_alone(backend, device):
    total = sum(PACKED_LENS)
    (q, k, v), (q64, k64, v64) = _qkv(1, total, total, 8, 64, device=device)
    cache = ProbeCache()
    _usable_or_skip(backend, q, k, v, cache, seqlens=PACKED_LENS)
    grad = torch.randn(1, total, 8, 64, generator=torch.Generator().manual_seed(2),
                       dtype=torch.float64)
    out, grads = _fwd_bwd(lambda a, b, c: attention(a, b, c, seqlens=PACKED_LENS,
                                                    backend=backend, probe_cache=cache),
                          (q, k, v), grad)
    start = 0
    for i, n in enumerate(PACKED_LENS):
        s = slice(start, start + n)
        alone, alone_grads = _fwd_bwd(attention_reference,
                                      (q64[:, s], k64[:, s], v64[:, s]), grad[:, s])
        _assert_close(out[:, s], alone, TOL[BF16][0], f"{backend} packed sequence {i}")
        for name, g, r in zip("qkv", grads, alone_grads):
            _assert_close(g[:, s], r, TOL[BF16][1], f"{backend} packed sequence {i} grad {name}")
        start += n


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequences_do_not_see_each_other(backend, device):
    """Replacing the other sequences' keys and values (by new numbers, then by NaN) leaves a
    sequence's output unchanged."""
    total = sum(PACKED_LENS)
    (q, k, v), _ = _qkv(1, total, total, 2, 32, device=device)
    cache = ProbeCache()
    _usable_or_skip(backend, q, k, v, cache, seqlens=PACKED_LENS)
    base = attention(q, k, v, seqlens=PACKED_LENS, backend=backend, probe_cache=cache)
    s = slice(PACKED_LENS[0], PACKED_LENS[0] + PACKED_LENS[1])  # the second sequence
    for fill in ("random", "nan"):
        k2, v2 = k.clone(), v.clone()
        others = torch.ones(total, dtype=torch.bool, device=device)
        others[s] = False
        if fill == "nan":
            k2[:, others], v2[:, others] = float("nan"), float("nan")
        else:
            k2[:, others] = torch.randn_like(k2[:, others]) * 10
            v2[:, others] = torch.randn_like(v2[:, others]) * 10
        out = attention(q, k2, v2, seqlens=PACKED_LENS, backend=backend, probe_cache=cache)
        assert torch.isfinite(out[:, s]).all(), f"{backend}: {fill} neighbours leaked"
        _assert_close(out[:, s], base[:, s], 1e-3, f"{backend} with {fill} neighbours")


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_with_an_empty_sequence(backend, device):
    lens = [5, 0, 11]
    (q, k, v), (q64, k64, v64) = _qkv(1, 16, 16, 2, 32, device=device)
    cache = ProbeCache()
    _usable_or_skip(backend, q, k, v, cache, seqlens=lens)
    out = attention(q, k, v, seqlens=lens, backend=backend, probe_cache=cache)
    _assert_close(out, attention_reference(q64, k64, v64, seqlens=lens), TOL[BF16][0],
                  f"{backend} packed with an empty sequence")


@pytest.mark.parametrize("packed", [False, True])
def test_auto_picks_a_probed_backend_and_says_which(packed, device):
    lens = [40, 24] if packed else None
    (q, k, v), _ = _qkv(1 if packed else 2, 64, 64, 4, 64, device=device)
    cache = ProbeCache()
    reasons = backend_reasons(q, k, v, seqlens=lens, probe_cache=cache)
    picked = select_backend(q, k, v, seqlens=lens, probe_cache=cache)
    usable = [b for b in BACKENDS if not reasons[b]]
    print(f"auto on {device}/bf16 {'packed' if packed else 'dense'}: {picked}; usable {usable}; "
          f"refused {({b: r for b, r in reasons.items() if r})}")
    assert picked in usable
    # the documented preference on CUDA: SDPA for dense input, xformers' block-diagonal mask
    # for packed input, each when its probe passed; math only when nothing else runs
    order = ("xformers", "sdpa", "math") if packed else ("sdpa", "xformers", "math")
    assert picked == next(b for b in order if b in usable)
    assert "sdpa" in usable, f"SDPA must run on CUDA bf16: {reasons['sdpa']}"
    if os.environ.get("SLIME_EXPECT_XFORMERS") == "1":
        assert "xformers" in usable, f"xformers installed but refused: {reasons['xformers']}"


# -------------------------------------------------------------------------------- adapter


def _adapter_pair(device, gamma):
    """A small released-configuration adapter rounded to bf16: the bf16 copy on ``device`` and
    a float64 CPU copy of the same rounded weights, with matching inputs."""
    from benchmarks import bench_stack

    torch.manual_seed(0)
    grids = [(3, 2), (1, 3), (1, 1)]
    cpu = torch.device("cpu")
    ref = bench_stack.build_adapter(64, 96, 36, 9, gamma, cpu, torch.float64)
    ref = ref.to(BF16).to(torch.float64)  # the rounded weights, held in float64
    fast = copy.deepcopy(ref).to(device=device, dtype=BF16)
    inputs = bench_stack.make_inputs(grids, 36, 64, 96, 8, cpu, BF16, 0)
    ref_in = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    fast_in = {k: v if k == "grids" else v.to(device) for k, v in inputs.items()}
    return fast, fast_in, ref, ref_in


def _run(adapter, inputs, gamma):
    return adapter(inputs["global_features"], inputs["tile_features"], grids=inputs["grids"],
                   text_embeds=inputs["text_embeds"], text_mask=inputs["text_mask"],
                   separator_embeds=inputs["separator_embeds"], router_gamma=gamma)


def test_adapter_bf16_on_cuda_matches_float64_cpu_and_has_finite_gradients(device):
    # γ = 1 keeps every local token, so no near-tie routing decision can differ between the runs
    fast, fast_in, ref, ref_in = _adapter_pair(device, 1.0)
    out = _run(fast, fast_in, 1.0)
    expected = _run(ref, ref_in, 1.0)
    assert out.packed.device.type == device.type and out.packed.dtype == BF16
    assert out.lengths.tolist() == expected.lengths.tolist() == [36 + 1 + 9 * n for n in (6, 3, 1)]
    _assert_close(out.packed, expected.packed, 2e-2, "adapter bf16 CUDA vs float64 CPU")

    weight = torch.randn(expected.packed.shape, generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64)
    (out.packed.float() * weight.to(device)).sum().backward()
    (expected.packed * weight).sum().backward()
    checked = 0
    for (name, p), (_, r) in zip(fast.named_parameters(), ref.named_parameters()):
        if r.grad is None:
            assert p.grad is None, f"{name} got a gradient on CUDA but not on the CPU"
            continue
        assert p.grad is not None, f"{name} has no gradient on CUDA"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient on CUDA"
        if name.endswith("k_proj.bias"):
            # softmax ignores a constant added to a row of scores, so the key bias's exact
            # gradient is zero: both runs hold rounding noise only
            continue
        _assert_close(p.grad, r.grad, 1e-1, f"adapter gradient of {name}")
        checked += 1
    assert checked >= 10


def test_adapter_routing_on_cuda_matches_cpu_in_float64(device):
    """Below γ = 1 the kept tokens must be the same on both devices (float64, so no tie flips)."""
    _, fast_in, ref, ref_in = _adapter_pair(device, 0.9)
    fast = copy.deepcopy(ref).to(device)
    fast_in = {k: v if k == "grids" else v.to(device) for k, v in ref_in.items()}
    out, expected = _run(fast, fast_in, 0.9), _run(ref, ref_in, 0.9)
    assert out.lengths.tolist() == expected.lengths.tolist()
    assert sum(out.lengths.tolist()) < 3 * 37 + 9 * 10  # the router dropped something
    assert torch.equal(out.aux.router.keep_mask.cpu(), expected.aux.router.keep_mask)
    _assert_close(out.packed, expected.packed, 1e-9, "adapter float64 CUDA vs CPU")


def test_adapter_forward_synchronises_with_the_host_at_most_once(device):
    """Counted with ``torch.cuda.set_sync_debug_mode("warn")``: every synchronising CUDA call
    (``.item()``, a blocking copy, ``nonzero`` ...) emits one warning. A first call probes the
    attention backends (which reads results back) and is not counted."""
    fast, fast_in, _, _ = _adapter_pair(device, 0.9)
    _run(fast, fast_in, 0.9)  # warm-up: backend probes, cuBLAS handles
    torch.cuda.synchronize()

    def count(fn):
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        return len(syncs), [f"{w.filename}:{w.lineno}" for w in syncs]

    # the instrument works: one .item() is one counted synchronisation
    n, where = count(lambda: torch.ones(3, device=device).sum().item())
    assert n == 1, f"sync debug mode counted {n} synchronisations for one .item(): {where}"
    with torch.no_grad():
        n, where = count(lambda: _run(fast, fast_in, 0.9))
    assert n <= 1, f"inference forward synchronised {n} times: {where}"
    n, where = count(lambda: _run(fast, fast_in, 0.9))
    assert n <= 1, f"training forward synchronised {n} times: {where}"
