"""Speed and memory of NoisyMoEProjector and QueryCompressor (+ MLP) against their loop oracles.

Scenario of SPEC §4: 4 images (1024×768, 300×3000, 640×480, 500×400) → 4 global views of
576 tokens through the MoE projector, and their 19 tiles × 576 tokens compressed to 144 queries
each and sent through the projector's MLP. Widths: the full Dv=1024 / Dl=4096 on CUDA (bf16),
reduced Dv=256 / Dl=512 on CPU (fp32) unless ``--vision-dim`` / ``--llm-dim`` say otherwise;
``--tiny`` shrinks everything for the smoke test.

The oracles (:mod:`slime_adapters.testing`) are per-view / per-tile, per-head loops with the
formulas written out: a faithful per-sample port of the released math. Each is checked against
the fast module before anything is timed; then both are timed in the same run
(``torch.utils.benchmark``, warm-up, median; ``--rounds`` round-robin repetitions so that load
from other processes hits every case alike, median over rounds), forward and forward+backward,
with the memory the backward pass keeps (saved activations, every device) and the allocator's
peak (CUDA only).
Results go to ``benchmarks/results/bench_adapters-<device>-torch<version>-<commit>.json``
(or ``--out DIR``); the speed-up ratios are printed last.

    python -m benchmarks.bench_adapters            # CPU: reduced widths, 1-2 min on 2 cores
    python -m benchmarks.bench_adapters --tiny     # seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils import benchmark

from slime_adapters.compressor import QueryCompressor
from slime_adapters.testing import noisy_moe_reference, query_compressor_reference
from slime_adapters.projector import NoisyMoEProjector

# SPEC §4, released code's own math on one H200, bf16, milliseconds
SPEC_REFERENCE_MS = {
    "moe_projector": {"fwd": 8.3, "fwd_bwd": 19.5},
    "compress_mlp": {"fwd": 23.2, "fwd_bwd": 27.3},
}
SCENARIO_TILES = 19  # the 4 SPEC §4 images sliced with the paper policy


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="default: bfloat16 on CUDA, float32 elsewhere")
    ap.add_argument("--vision-dim", type=int, default=None, help="Dv (CUDA 1024, CPU 256)")
    ap.add_argument("--llm-dim", type=int, default=None, help="Dl (CUDA 4096, CPU 512)")
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--tiles", type=int, default=SCENARIO_TILES)
    ap.add_argument("--tokens", type=int, default=576, help="tokens per view / tile")
    ap.add_argument("--queries", type=int, default=144, help="compressor queries per tile")
    ap.add_argument("--mode", choices=["paper", "reference"], default="reference")
    ap.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin repetitions (median kept)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes for a smoke test")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.tiny:
        args.vision_dim = args.vision_dim or 32
        args.llm_dim = args.llm_dim or 48
        args.views, args.tiles, args.tokens, args.queries = 2, 3, 16, 4
    args.vision_dim = args.vision_dim or (1024 if cuda else 256)
    args.llm_dim = args.llm_dim or (4096 if cuda else 512)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.min_run_time = args.min_run_time or (0.05 if args.tiny else 0.6)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    return args


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or "nogit"
    except (OSError, subprocess.SubprocessError):
        return "nogit"


def _device_name(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu{torch.get_num_threads()}t-{platform.machine()}"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def _saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of ``fn()``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _median_ms(fn: Callable[[], object], min_run_time: float, *, warm_up: bool = True) -> float:
    for _ in range(2 if warm_up else 0):  # probes, allocator, kernel selection
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def _build(args, device):
    kw = {"device": device, "dtype": torch.float32}
    proj = NoisyMoEProjector(in_dim=args.vision_dim, out_dim=args.llm_dim, num_tokens=args.tokens,
                             mode=args.mode, noise=args.mode if args.mode == "reference"
                             else "learned", **kw)
    comp = QueryCompressor(dim=args.vision_dim, num_queries=args.queries, mode=args.mode, **kw)
    with torch.no_grad():  # a trained-looking gate, so that both experts matter
        proj.w_gate.normal_(0.0, 0.05)
        proj.w_noise.normal_(0.0, 0.05)
    gen = torch.Generator(device="cpu").manual_seed(0)
    views = torch.randn(args.views, args.tokens, args.vision_dim, generator=gen).to(device)
    tiles = torch.randn(args.tiles, args.tokens, args.vision_dim, generator=gen).to(device)
    noise = torch.randn(args.views, args.tokens, 2, generator=gen).to(device)
    return proj, comp, views, tiles, noise


def _workloads(proj, comp, views, tiles, noise):
    """name → (fast forward, oracle forward); each returns the tensor the loss is taken of."""
    return {
        "moe_projector": (
            lambda: proj(views, noise_sample=noise).tokens,
            lambda: noisy_moe_reference(proj, views, noise_sample=noise)[0],
        ),
        "compress_mlp": (
            lambda: proj.mlp(comp(tiles)),
            lambda: noisy_moe_reference(proj, query_compressor_reference(comp, tiles),
                                        force_expert=0)[0],
        ),
    }


def _check(args, proj, comp, views, tiles, noise) -> dict[str, float]:
    """Fast == oracle before timing, both against the float64 oracle run on the same (already
    rounded) weights and inputs: the fast module in float64 (tight) and in the timed dtype."""
    errs = {}
    p64, c64 = copy.deepcopy(proj).double(), copy.deepcopy(comp).double()
    work64 = _workloads(p64, c64, views.double(), tiles.double(), noise.double())
    work = _workloads(proj, comp, views, tiles, noise)
    for name, (fast, oracle) in work64.items():
        with torch.no_grad():
            ref = oracle()
            errs[f"{name}_float64"] = _rel_err(fast(), ref)
            low = str(args.dtype).removeprefix("torch.")
            errs[f"{name}_{low}"] = _rel_err(work[name][0](), ref)
    limit = {torch.float32: 1e-4}.get(args.dtype, 5e-2)
    for key, err in errs.items():
        tol = 1e-9 if key.endswith("float64") else limit
        if not err <= tol:
            raise SystemExit(f"fast module disagrees with the oracle: {key} relative error "
                             f"{err:.3g} > {tol}")
    return errs


def run(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    device = torch.device(args.device)
    proj, comp, views, tiles, noise = _build(args, device)
    proj.train()  # fixed noise sample, so fast and oracle see the same gates
    proj, comp = proj.to(args.dtype), comp.to(args.dtype)
    views, tiles = views.to(args.dtype), tiles.to(args.dtype)
    checks = _check(args, proj, comp, views, tiles, noise)
    params = list(proj.parameters()) + list(comp.parameters())

    cases = {}
    for name, (fast, oracle) in _workloads(proj, comp, views, tiles, noise).items():
        for impl, fwd in (("fast", fast), ("oracle", oracle)):
            def fwd_nograd(fwd=fwd):
                with torch.no_grad():
                    return fwd()

            def fwd_bwd(fwd=fwd):
                for p in params:
                    p.grad = None
                fwd().float().square().mean().backward()

            cases[(name, impl)] = (fwd, fwd_nograd, fwd_bwd)
    # Round robin: a machine shared with other work slows whatever runs at that moment, so
    # every case is measured once per round and the median over rounds is kept.
    times: dict[tuple, dict[str, list[float]]] = {c: {"fwd": [], "fwd_bwd": []} for c in cases}
    for r in range(args.rounds):
        for case, (_, fwd_nograd, fwd_bwd) in cases.items():
            for key, fn in (("fwd", fwd_nograd), ("fwd_bwd", fwd_bwd)):
                times[case][key].append(
                    _median_ms(fn, args.min_run_time / args.rounds, warm_up=r == 0))
    rows = []
    for (name, impl), (fwd, fwd_nograd, fwd_bwd) in cases.items():
        t = times[(name, impl)]
        rows.append({
            "work": name, "impl": impl,
            "fwd_ms": statistics.median(t["fwd"]), "fwd_bwd_ms": statistics.median(t["fwd_bwd"]),
            "fwd_ms_rounds": t["fwd"], "fwd_bwd_ms_rounds": t["fwd_bwd"],
            "peak_bytes_fwd": _peak_bytes(fwd_nograd, device),
            "peak_bytes_fwd_bwd": _peak_bytes(fwd_bwd, device),
            "saved_bytes": _saved_bytes(fwd),
        })
    by = {(r["work"], r["impl"]): r for r in rows}
    ratios = {f"{w}_{k}": by[(w, "oracle")][f"{k}_ms"] / by[(w, "fast")][f"{k}_ms"]
              for w in SPEC_REFERENCE_MS for k in ("fwd", "fwd_bwd")}
    result = {
        "benchmark": "bench_adapters",
        "device": _device_name(device), "torch": torch.__version__, "commit": _commit(),
        "python": sys.version.split()[0], "threads": torch.get_num_threads(),
        "dtype": str(args.dtype).removeprefix("torch."), "mode": args.mode, "tiny": args.tiny,
        "scenario": {"views": args.views, "tiles": args.tiles, "tokens": args.tokens,
                     "queries": args.queries, "vision_dim": args.vision_dim,
                     "llm_dim": args.llm_dim},
        "checks_relative_error": checks,
        "results": rows,
        "ratios_oracle_over_fast": ratios,
        "spec_reference_h200_bf16_ms": SPEC_REFERENCE_MS,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / (f"bench_adapters-{result['device']}-torch{torch.__version__}-"
                       f"{result['commit']}.json").replace("+", "_")
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    result["path"] = str(path)

    print(f"# bench_adapters on {result['device']} ({result['dtype']}, torch {torch.__version__}, "
          f"mode {args.mode}), Dv={args.vision_dim} Dl={args.llm_dim}, {args.views} views, "
          f"{args.tiles} tiles x {args.tokens} tokens -> {args.queries} queries")
    print(f"# checks (max relative error vs oracle): "
          + ", ".join(f"{k}={v:.2e}" for k, v in checks.items()))
    print(f"{'work':<15}{'impl':<8}{'fwd ms':>10}{'fwd+bwd ms':>12}{'saved MB':>10}{'peak MB':>10}")
    for r in rows:
        peak = "-" if r["peak_bytes_fwd_bwd"] is None else f"{r['peak_bytes_fwd_bwd'] / 2**20:.1f}"
        print(f"{r['work']:<15}{r['impl']:<8}{r['fwd_ms']:>10.2f}{r['fwd_bwd_ms']:>12.2f}"
              f"{r['saved_bytes'] / 2**20:>10.1f}{peak:>10}")
    if device.type == "cuda":
        for w, ref in SPEC_REFERENCE_MS.items():
            fast = by[(w, "fast")]
            print(f"# SPEC §4 H200 reference {w}: {ref['fwd']} ms fwd, {ref['fwd_bwd']} ms "
                  f"fwd+bwd; fast here {fast['fwd_ms']:.2f} / {fast['fwd_bwd_ms']:.2f}")
    print(f"# results: {path}")
    print("ratio oracle/fast: " + ", ".join(f"{k} {v:.1f}x" for k, v in ratios.items()))
    return result


if __name__ == "__main__":
    run()
