"""CosineTokenRouter against its float64 loop oracles, selection edge cases, pack/pad, errors,
memory growth and torch.compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from slime_adapters.config import ConfigError
from slime_adapters.testing import router_reference, router_reference_released
from slime_adapters.router import (
    CosineTokenRouter,
    CosineTokenRouterConfig,
    RouterInputError,
    RouterOutput,
    pooled_cosine_scores,
)

GAMMAS = (0.5, 0.75, 0.9, 0.95, 1.0)
REPO = Path(__file__).resolve().parents[1]


def _batch(b, n, l, d, *, seed=0, dtype=torch.float64, image_keep=0.8, text_keep=0.7,
           poison=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    t = torch.randn(b, l, d, generator=g, dtype=torch.float64)
    # a shared direction gives the scores a spread, so that a low temperature is selective
    topic = torch.randn(b, 1, d, generator=g, dtype=torch.float64)
    x = x + topic * torch.rand(b, n, 1, generator=g, dtype=torch.float64)
    t = t + topic
    im = torch.rand(b, n, generator=g) < image_keep
    tm = torch.rand(b, l, generator=g) < text_keep
    im[:, 0] = True
    tm[:, 0] = True
    if poison:
        x = x.masked_fill(~im.unsqueeze(-1), float("nan"))
        t = t.masked_fill(~tm.unsqueeze(-1), float("nan"))
    return x.to(dtype), t.to(dtype), im, tm


def _assert_same_keep(out: RouterOutput, keep: torch.Tensor, probs: torch.Tensor, *, tol=1e-12):
    diff = (out.scores.double() - probs.double()).abs()
    worst = int(diff.argmax())
    assert float(diff.max()) <= tol, (
        f"scores differ by {float(diff.max()):.3e} at flat index {worst}: "
        f"{float(out.scores.flatten()[worst])} vs oracle {float(probs.flatten()[worst])}"
    )
    bad = (out.keep_mask != keep).nonzero().tolist()
    assert not bad, f"keep masks differ at (image, token) {bad[:10]}; kept {out.num_kept.tolist()}"
    assert out.num_kept.tolist() == keep.sum(1).tolist()


CASES = [
    # (b, n, l, d, options)
    (3, 37, 5, 16, dict(temperature=1.0)),
    (2, 144, 1, 32, dict(temperature=0.02)),
    (4, 61, 9, 8, dict(temperature=0.05, text_pool="sum")),
    (2, 50, 7, 16, dict(temperature=0.1, legacy_softmax=True)),
    (3, 40, 6, 16, dict(temperature=0.03, crossing="exceed", min_keep=4, max_keep=20)),
    (1, 1, 3, 8, dict(temperature=0.05)),
]


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_float64_oracle(gamma, case):
    b, n, l, d, opts = CASES[case]
    x, t, im, tm = _batch(b, n, l, d, seed=case)
    g = torch.Generator().manual_seed(99)
    noise = 0.05 * torch.randn(b, n, generator=g, dtype=torch.float64)
    router = CosineTokenRouter(gamma=gamma, **opts).eval()
    for kw in (dict(), dict(noise=noise)):
        out = router(x, t, image_mask=im, text_mask=tm, **kw)
        keep, probs = router_reference(x, t, image_mask=im, text_mask=tm, gamma=gamma, **opts, **kw)
        _assert_same_keep(out, keep, probs)
    # the per-call override equals a router configured with that gamma
    other = CosineTokenRouter(gamma=0.6, **opts).eval()(x, t, image_mask=im, text_mask=tm,
                                                          gamma=gamma)
    assert torch.equal(other.keep_mask, router(x, t, image_mask=im, text_mask=tm).keep_mask)


def test_float32_and_bfloat16_inputs_score_like_the_oracle():
    x, t, im, tm = _batch(3, 100, 6, 32, seed=5)
    router = CosineTokenRouter(temperature=0.05).eval()
    _, probs = router_reference(x, t, image_mask=im, text_mask=tm, temperature=0.05)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        out = router(x.to(dtype), t.to(dtype), image_mask=im, text_mask=tm)
        assert out.scores.dtype == torch.float32
        err = (out.scores.double() - probs).abs().max()
        assert float(err) < tol, f"{dtype}: worst score error {float(err):.3e}"


def test_scores_are_pooled_cosines_without_the_broadcast():
    x, t, _, tm = _batch(2, 30, 5, 16, seed=1)
    for pool in ("mean", "sum"):
        got = pooled_cosine_scores(x, t, text_mask=tm, text_pool=pool)
        for i in range(2):
            sim = torch.nn.functional.cosine_similarity(x[i][:, None], t[i][tm[i]][None], dim=-1)
            want = sim.sum(1) if pool == "sum" else sim.mean(1)
            assert torch.allclose(got[i], want, atol=1e-12), f"{pool}: {got[i] - want}"


def test_gamma_one_keeps_every_valid_token_even_if_cumsum_falls_short():
    # 41 identical tokens: the float32 cumsum of 41 probabilities 1/41 ends at 0.99999994
    x = torch.ones(1, 41, 8)
    t = torch.ones(1, 2, 8)
    out = CosineTokenRouter(gamma=1.0).eval()(x, t)
    assert float(torch.cumsum(out.scores, 1)[0, -1]) < 1.0
    assert int(out.num_kept) == 41 and bool(out.keep_mask.all())
    x, t, im, tm = _batch(4, 77, 5, 16, seed=2)
    out = CosineTokenRouter(gamma=1.0, temperature=0.01).eval()(x, t, image_mask=im, text_mask=tm)
    assert torch.equal(out.keep_mask, im)


def test_masked_tokens_never_kept_and_their_contents_never_matter():
    x, t, im, tm = _batch(3, 50, 6, 16, seed=3, poison=True)
    clean_x = torch.nan_to_num(x, nan=7.0)
    clean_t = torch.nan_to_num(t, nan=-3.0)
    router = CosineTokenRouter(gamma=0.9, temperature=0.05, min_keep=60).eval()
    out = router(x, t, image_mask=im, text_mask=tm)
    assert not bool((out.keep_mask & ~im).any()), "a masked image token was kept"
    assert torch.equal(out.keep_mask, im), "min_keep above the valid count keeps exactly the valid"
    assert bool(torch.isfinite(out.scores).all())
    router = CosineTokenRouter(gamma=0.9, temperature=0.05).eval()
    a = router(x, t, image_mask=im, text_mask=tm)
    c = router(clean_x, clean_t, image_mask=im, text_mask=tm)
    assert torch.equal(a.keep_mask, c.keep_mask) and torch.equal(a.scores, c.scores)


def test_all_masked_image_row_keeps_nothing():
    x, t, im, tm = _batch(2, 20, 4, 8, seed=4)
    im[1] = False
    out = CosineTokenRouter().eval()(x, t, image_mask=im, text_mask=tm)
    assert out.num_kept[1] == 0 and not bool(out.keep_mask[1].any())
    assert bool(torch.isfinite(out.scores).all()) and bool((out.scores[1] == 0).all())


def test_all_masked_question_keeps_all_by_default_and_raises_on_request():
    x, t, im, tm = _batch(3, 30, 4, 8, seed=6)
    tm[1] = False
    out = CosineTokenRouter(gamma=0.5, temperature=0.01).eval()(x, t, image_mask=im, text_mask=tm)
    assert torch.equal(out.keep_mask[1], im[1]), "empty question: all valid tokens kept"
    assert int(out.num_kept[0]) < int(im[0].sum()), "other samples still routed"
    keep, _ = router_reference(x, t, image_mask=im, text_mask=tm, gamma=0.5, temperature=0.01)
    assert torch.equal(out.keep_mask, keep)
    strict = CosineTokenRouter(on_empty_text="raise").eval()
    with pytest.raises(RouterInputError, match=r"text_mask: samples \[1\] have no valid question"):
        strict(x, t, image_mask=im, text_mask=tm)
    with pytest.raises(ValueError, match="no valid question token"):
        router_reference(x, t, image_mask=im, text_mask=tm, on_empty_text="raise")
    # a zero-length question is empty for every sample
    empty = CosineTokenRouter(gamma=0.5).eval()(x, t[:, :0], image_mask=im)
    assert torch.equal(empty.keep_mask, im)


def test_ties_break_by_raster_order_and_crossing_rules_differ_only_at_equality():
    x = torch.ones(1, 10, 4, dtype=torch.float64)
    t = torch.ones(1, 2, 4, dtype=torch.float64)
    out = CosineTokenRouter(gamma=0.45).eval()(x, t)
    assert out.keep_mask[0].tolist() == [True] * 5 + [False] * 5
    x4, t4 = x[:, :4], t
    reach = CosineTokenRouter(gamma=0.5, crossing="reach").eval()(x4, t4)
    exceed = CosineTokenRouter(gamma=0.5, crossing="exceed").eval()(x4, t4)
    assert reach.keep_mask[0].tolist() == [True, True, False, False]
    assert exceed.keep_mask[0].tolist() == [True, True, True, False]
    ref_sel = router_reference_released(x4[0], t4[0], torch.ones(2, dtype=torch.bool), topp=0.5)
    assert ref_sel.numel() == 3


def test_min_and_max_keep_clamp_the_count():
    x, t, im, tm = _batch(3, 60, 5, 16, seed=7)
    base = CosineTokenRouter(gamma=0.5, temperature=0.005).eval()(x, t, image_mask=im, text_mask=tm)
    assert int(base.num_kept.max()) < 5
    lo = CosineTokenRouter(gamma=0.5, temperature=0.005, min_keep=5).eval()(
        x, t, image_mask=im, text_mask=tm)
    assert lo.num_kept.tolist() == [5, 5, 5]
    hi = CosineTokenRouter(gamma=0.99, temperature=1.0, max_keep=3).eval()(
        x, t, image_mask=im, text_mask=tm)
    assert hi.num_kept.tolist() == [3, 3, 3]
    # the kept ones are the three most probable
    top3 = torch.where(im, hi.scores, -1.0).topk(3, dim=1).indices
    assert bool(hi.keep_mask.gather(1, top3).all())


@pytest.mark.parametrize("legacy", [False, True])
def test_matches_the_released_code_rule(legacy):
    g = torch.Generator().manual_seed(11 + legacy)
    b, n, l, d = 3, 48, 12, 16
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    t = torch.randn(b, l, d, generator=g, dtype=torch.float64) + x.mean(1, keepdim=True)
    tm = torch.rand(b, l, generator=g) < 0.8
    noise = 0.1 * torch.randn(b, n, generator=g, dtype=torch.float64)
    opts = dict(text_pool="sum", crossing="exceed", legacy_softmax=legacy, temperature=0.3)
    for gamma in (0.5, 0.75, 0.9, 0.95):
        router = CosineTokenRouter(gamma=gamma, **opts).eval()
        for kw in (dict(), dict(noise=noise)):
            out = router(x, t, text_mask=tm, **kw)
            keep, probs = router_reference(x, t, text_mask=tm, gamma=gamma, **opts, **kw)
            _assert_same_keep(out, keep, probs)
            for i in range(b):
                sel = router_reference_released(
                    x[i], t[i], tm[i], topp=gamma, temperature=0.3, legacy_softmax=legacy,
                    noise=None if not kw else noise[i])
                got = out.keep_mask[i].nonzero().flatten()
                assert torch.equal(got, sel), f"gamma={gamma} image {i}: {got} vs released {sel}"


def test_legacy_softmax_keeps_about_gamma_whatever_the_scores():
    x, t, _, _ = _batch(2, 576, 8, 32, seed=8)
    for gamma in (0.5, 0.9):
        out = CosineTokenRouter(gamma=gamma, legacy_softmax=True, text_pool="sum").eval()(x, t)
        frac = out.num_kept.double() / 576
        assert bool(((frac - gamma).abs() < 0.02).all()), frac


def test_training_noise_is_drawn_only_in_training():
    x, t, im, tm = _batch(2, 200, 5, 16, seed=9)
    router = CosineTokenRouter(gamma=0.5, temperature=0.02, noise_std=1.0)
    router.eval()
    a = router(x, t, image_mask=im, text_mask=tm)
    assert torch.equal(a.keep_mask, router(x, t, image_mask=im, text_mask=tm).keep_mask)
    router.train()
    torch.manual_seed(0)
    b = router(x, t, image_mask=im, text_mask=tm)
    torch.manual_seed(0)
    noise = torch.randn(2, 200, dtype=torch.float64) * (1.0 * 0.02)  # noise_std · T
    keep, probs = router_reference(x, t, image_mask=im, text_mask=tm, gamma=0.5, temperature=0.02,
                                   noise=noise)
    _assert_same_keep(b, keep, probs)
    assert not torch.equal(a.keep_mask, b.keep_mask)
    quiet = CosineTokenRouter(gamma=0.5, temperature=0.02, noise_std=0.0).train()
    assert torch.equal(quiet(x, t, image_mask=im, text_mask=tm).keep_mask, a.keep_mask)


def test_pack_and_pad_keep_raster_order():
    x, t, im, tm = _batch(4, 45, 5, 8, seed=10)
    x.requires_grad_(True)
    out = CosineTokenRouter(gamma=0.8, temperature=0.05).eval()(x, t, image_mask=im, text_mask=tm)
    packed = out.pack(x)
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.cu_seqlens.tolist() == [0] + torch.cumsum(out.num_kept, 0).tolist()
    assert torch.equal(packed.lengths, out.num_kept)
    padded = out.pad(x)
    assert padded.tokens.shape == (4, int(out.num_kept.max()), 8)
    for i in range(4):
        s, e = packed.cu_seqlens[i], packed.cu_seqlens[i + 1]
        pos = packed.positions[s:e]
        assert pos.tolist() == out.keep_mask[i].nonzero().flatten().tolist()  # increasing
        assert torch.equal(packed.tokens[s:e], x[i, pos])
        k = int(out.num_kept[i])
        assert torch.equal(padded.tokens[i, :k], x[i, pos])
        assert bool((padded.tokens[i, k:] == 0).all())
        assert padded.mask[i].tolist() == [True] * k + [False] * (padded.mask.shape[1] - k)
    packed.tokens.sum().backward()
    assert torch.equal(x.grad[..., 0] != 0, out.keep_mask), "gradient reaches exactly the kept"


def test_pad_and_pack_ignore_poisoned_masked_tokens():
    x, t, im, tm = _batch(3, 30, 4, 8, seed=14, poison=True)
    # image 1's first tokens are masked NaN, so its padded slots gather NaN tokens
    im[1, :25] = False
    x[1, :25] = float("nan")
    out = CosineTokenRouter(gamma=0.6, temperature=1.0).eval()(x, t, image_mask=im, text_mask=tm)
    assert int(out.num_kept[1]) < int(out.num_kept.max())
    padded = out.pad(x)
    assert bool(torch.isfinite(padded.tokens).all()), "NaN leaked into padded slots"
    assert bool(torch.isfinite(out.pack(x).tokens).all())


def test_static_output_shapes():
    x, t, im, tm = _batch(2, 33, 3, 8, seed=12, dtype=torch.float32)
    for gamma in (0.5, 1.0):
        out = CosineTokenRouter(gamma=gamma).eval()(x, t, image_mask=im, text_mask=tm)
        assert out.keep_mask.shape == (2, 33) and out.keep_mask.dtype == torch.bool
        assert out.num_kept.shape == (2,) and out.num_kept.dtype == torch.long
        assert out.scores.shape == (2, 33) and out.scores.dtype == torch.float32


def test_config_round_trip_and_meta_construction(tmp_path):
    router = CosineTokenRouter(gamma=0.75, text_pool="sum", temperature=0.1, max_keep=99,
                               legacy_softmax=True, crossing="exceed", device="meta")
    assert list(router.parameters()) == [] and list(router.buffers()) == []
    path = tmp_path / "router.json"
    router.config.to_json(path)
    assert json.loads(path.read_text())["kind"] == "cosine_token_router"
    again = CosineTokenRouter.from_config(CosineTokenRouterConfig.from_json(path))
    assert again.config == router.config
    with pytest.raises(ConfigError, match="temperature must be a finite number > 0"):
        CosineTokenRouterConfig.from_dict({"temperature": 0})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(gamma=0.0), r"gamma must be a finite number > 0 and <= 1, got 0.0"),
        (dict(gamma=1.5), r"gamma must be a finite number > 0 and <= 1, got 1.5"),
        (dict(noise_std=-1.0), "noise_std must be a finite number >= 0"),
        (dict(text_pool="max"), "text_pool must be one of"),
        (dict(temperature=0.0), "temperature must be a finite number > 0"),
        (dict(min_keep=-1), "min_keep must be an int >= 0"),
        (dict(max_keep=0), "max_keep must be an int >= 1 or None"),
        (dict(min_keep=5, max_keep=3), "max_keep must be an int >= 5 or None"),
        (dict(crossing="above"), "crossing must be one of"),
        (dict(on_empty_text="ignore"), "on_empty_text must be one of"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CosineTokenRouter(**kwargs)


def test_bad_inputs_raise():
    router = CosineTokenRouter().eval()
    x, t = torch.randn(2, 10, 8), torch.randn(2, 4, 8)
    cases = [
        (dict(image_tokens=x[0]), "image_tokens must have rank 3"),
        (dict(text_embeds=[1.0]), "text_embeds must be a torch.Tensor"),
        (dict(image_tokens=x.long()), "image_tokens must be floating point"),
        (dict(text_embeds=torch.randn(3, 4, 8)), r"text_embeds must be \(b=2, l, d=8\)"),
        (dict(text_embeds=torch.randn(2, 4, 6)), r"text_embeds must be \(b=2, l, d=8\)"),
        (dict(image_mask=torch.ones(2, 10)), "image_mask must be a bool tensor"),
        (dict(image_mask=torch.ones(2, 9, dtype=torch.bool)),
         r"image_mask must have shape \(2, 10\)"),
        (dict(text_mask=torch.ones(2, 5, dtype=torch.bool)), r"text_mask must have shape \(2, 4\)"),
        (dict(noise=torch.randn(2, 11)), r"noise must have shape \(2, 10\)"),
        (dict(noise=torch.ones(2, 10, dtype=torch.long)), "noise must be a floating-point"),
        (dict(gamma=2.0), "gamma must be a number"),
    ]
    for kw, match in cases:
        args = dict(image_tokens=x, text_embeds=t)
        args.update(kw)
        with pytest.raises(RouterInputError, match=match):
            router(args.pop("image_tokens"), args.pop("text_embeds"), **args)
    out = router(x, t)
    with pytest.raises(RouterInputError, match=r"image_tokens has shape \(2, 9, 8\) but the"):
        out.pack(x[:, :9])
    with pytest.raises(RouterInputError, match=r"image_tokens must be a \(b, n, d\) tensor"):
        out.pad(x[0])


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    from slime_adapters.router import CosineTokenRouter

    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()

    def vm():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[0]) * resource.getpagesize()

    torch.set_num_threads(1)
    n, l, d = 8192, 512, 4096
    router = CosineTokenRouter(gamma=0.9, temperature=0.05, text_pool=sys.argv[1])
    router(torch.randn(1, 64, 32), torch.randn(1, 8, 32))  # warm up allocator and kernels
    x = torch.randn(1, n, d)
    t = torch.randn(1, l, d)
    im = torch.ones(1, n, dtype=torch.bool)
    tm = torch.ones(1, l, dtype=torch.bool)
    # a regression to an n*l*d intermediate (68 GB) fails fast instead of swapping the machine
    limit = vm() + (3 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    def hwm():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM"))

    # reset the peak to the current RSS first: on a loaded machine the kernel may have dropped
    # library pages since the lifetime peak, which would count as growth
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = rss()
    out = router(x, t, image_mask=im, text_mask=tm)
    peak = hwm()
    print(json.dumps({"growth": peak - before, "inputs": (x.numel() + t.numel()) * 4,
                      "kept": int(out.num_kept)}))
    """
)


@pytest.mark.slow
def test_peak_memory_is_linear_not_n_l_d():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for pool in ("mean", "sum"):
        proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, pool], capture_output=True,
                              text=True, env=env, timeout=240, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-2000:]
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        # forward's own allocations: (n, d) float32 copies at most, far below n*l*d*4 = 68 GB
        assert res["growth"] < 400 * 2**20, f"{pool}: peak grew by {res['growth'] / 2**20:.0f} MiB"
        assert 0 < res["kept"] <= 8192


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SLIME_ADAPTERS_SKIP_COMPILE") == "1",
                    reason="SLIME_ADAPTERS_SKIP_COMPILE=1")
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x, t, im, tm = _batch(2, 24, 5, 8, seed=13, dtype=torch.float32)
    router = CosineTokenRouter(gamma=0.8, temperature=0.05).eval()
    compiled = torch.compile(router, fullgraph=True, dynamic=False)
    got = compiled(x, t, image_mask=im, text_mask=tm)
    want = router(x, t, image_mask=im, text_mask=tm)
    assert torch.equal(got.keep_mask, want.keep_mask)
    assert torch.equal(got.num_kept, want.num_kept)
    assert torch.allclose(got.scores, want.scores, atol=1e-6)
    # training mode (drawn noise) traces without a break too
    router.train()
    trained = compiled(x, t, image_mask=im, text_mask=tm)
    assert trained.keep_mask.shape == (2, 24)
