"""Attention backends (SDPA, xformers, math) through ``slime_adapters.ops.attention.attention``.

Cases (issue #2), layout ``(b, m, h, k)`` as the kernels take it::

    dense_144x576   b=36 tiles, m=144 queries, n=576 keys   (the compressor: N_q over a tile's S)
    dense_576x576   b=16, m=n=576                            (the projector's query expert)
    packed          b=1, several sequences of different lengths laid end to end (``seqlens``);
                    each attends to itself only (xformers: BlockDiagonalMask; sdpa/math: padded)

Heads: the model's Dv=1024 as 8 heads × 128 on CUDA (bf16); 2 heads × 64 on the CPU (fp32) unless
``--heads`` / ``--head-dim`` say otherwise; ``--tiny`` for the smoke test. The packed lengths are
the SPEC §4 scenario's per-image visual-token counts (576 global + 1 separator + kept local tokens
1368, 1502, 1103, 845), a quarter of them on the CPU.

Every backend is checked against the float64 loop oracle
(:func:`~slime_adapters.testing.attention_reference`, on the same rounded inputs) before
it is timed: forward output and the gradients of q, k, v. A backend that cannot run an input
(xformers on the CPU, or whose probe failed) is skipped with its reasons recorded; one that
disagrees with the oracle is not timed, recorded, and makes the run exit with status 1 after the
results are saved. The oracle itself is timed too (it loops over batch elements and heads). The
backend that ``auto`` picks for each case is recorded. Ratios (math time / backend time) are
printed last. Results: ``benchmarks/results/bench_attention_<device>_torch<version>_<commit>.json``
(or ``--out DIR``).

    python -m benchmarks.bench_attention            # CUDA: bf16, 8×128 heads; CPU: fp32, 2×64
    python -m benchmarks.bench_attention --tiny     # seconds
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks._common import (
    RESULTS_DIR,
    environment,
    peak_memory_bytes,
    pick_device,
    result_stem,
    save_json,
    threads,
    time_fn,
)
from slime_adapters.ops.attention import BACKENDS, ProbeCache, attention, backend_reasons, \
    select_backend
from slime_adapters.testing import attention_reference

# SPEC §4 scenario: 576 global tokens + 1 separator + the kept local tokens of its four images
PACKED_LENGTHS = (1945, 2079, 1680, 1422)
# Relative tolerance (worst element over the oracle's largest magnitude) of the forward output
# and of the gradients, per dtype. Half precision: inputs and outputs are rounded to bf16 (every
# backend computes in float32 inside; ≈3e-3 at 144×576), gradients lose a little more; the errors
# themselves are saved. float32 allows TF32 matrix products on CUDA.
TOLERANCE = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 5e-2),
    torch.float16: (3e-2, 5e-2),
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, ...")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default=None,
                    help="default: bfloat16 on CUDA, float32 elsewhere")
    ap.add_argument("--heads", type=int, default=None, help="heads (CUDA 8, CPU 2)")
    ap.add_argument("--head-dim", type=int, default=None, help="head width (CUDA 128, CPU 64)")
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                    help="backends to check and time (default: all three)")
    ap.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes for a smoke test")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    args.device = pick_device(args.device)
    cuda = args.device.type == "cuda"
    for name in ("heads", "head_dim", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.tiny:
        args.heads, args.head_dim = args.heads or 2, args.head_dim or 16
    args.heads = args.heads or (8 if cuda else 2)
    args.head_dim = args.head_dim or (128 if cuda else 64)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.min_run_time = args.min_run_time or (0.02 if args.tiny else (0.3 if cuda else 0.5))
    return args


def cases(tiny: bool, cuda: bool) -> list[dict[str, Any]]:
    """The benchmark's cases: name, batch, queries, keys and (packed) sequence lengths."""
    if tiny:
        return [
            {"name": "dense_144x576", "b": 3, "m": 9, "n": 36, "seqlens": None},
            {"name": "dense_576x576", "b": 2, "m": 36, "n": 36, "seqlens": None},
            {"name": "packed", "b": 1, "m": 31, "n": 31, "seqlens": [5, 17, 9]},
        ]
    lens = list(PACKED_LENGTHS) if cuda else [n // 4 for n in PACKED_LENGTHS]
    return [
        {"name": "dense_144x576", "b": 36, "m": 144, "n": 576, "seqlens": None},
        {"name": "dense_576x576", "b": 16, "m": 576, "n": 576, "seqlens": None},
        {"name": "packed", "b": 1, "m": sum(lens), "n": sum(lens), "seqlens": lens},
    ]


def make_inputs(case: dict[str, Any], heads: int, head_dim: int, device: torch.device,
                dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random q, k, v of the case (drawn in float64 on the CPU, then cast) and a random output
    gradient, so every device and dtype sees the same numbers."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(case["b"], case["m"]), (case["b"], case["n"]), (case["b"], case["n"]),
              (case["b"], case["m"])]
    return tuple(torch.randn(*s, heads, head_dim, generator=gen, dtype=torch.float64)
                 .to(device, dtype) for s in shapes)  # type: ignore[return-value]


def _rel(out: Tensor, ref: Tensor) -> tuple[float, list[int]]:
    """Worst absolute difference over the largest reference magnitude, and where it is."""
    diff = (out.double() - ref.double()).abs()
    if diff.numel() == 0:
        return 0.0, []
    worst = int(diff.argmax())
    index = list(torch.unravel_index(torch.tensor(worst), diff.shape))
    scale = max(float(ref.double().abs().max()), 1e-30)
    return float(diff.max()) / scale, [int(i) for i in index]


def _forward_backward(fn: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor,
                      grad: Tensor) -> tuple[Tensor, list[Tensor]]:
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def check_backend(backend: str, case: dict[str, Any], q: Tensor, k: Tensor, v: Tensor,
                  grad: Tensor, oracle: tuple[Tensor, list[Tensor]],
                  cache: ProbeCache) -> dict[str, Any]:
    """One backend's forward output and q/k/v gradients against the float64 oracle's."""
    out, grads = _forward_backward(
        lambda a, b, c: attention(a, b, c, seqlens=case["seqlens"], backend=backend,
                                  probe_cache=cache), q, k, v, grad)
    tol_fwd, tol_grad = TOLERANCE[q.dtype]
    fwd_err, fwd_at = _rel(out, oracle[0])
    result: dict[str, Any] = {"forward_rel_error": fwd_err, "forward_worst_index": fwd_at,
                              "tolerance": [tol_fwd, tol_grad]}
    for name, g, ref in zip("qkv", grads, oracle[1]):
        result[f"grad_{name}_rel_error"], result[f"grad_{name}_worst_index"] = _rel(g, ref)
    result["ok"] = bool(fwd_err <= tol_fwd
                        and all(result[f"grad_{n}_rel_error"] <= tol_grad for n in "qkv"))
    return result


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the saved payload. Raises SystemExit(1) after saving when a
    backend disagreed with the oracle."""
    args = _parse(argv)
    with threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = args.device, args.dtype
    cache = ProbeCache()  # probed afresh in this process, so the record says what this run saw
    payload_cases, failures, ratio_lines = [], [], []
    for case in cases(args.tiny, device.type == "cuda"):
        q, k, v, grad = make_inputs(case, args.heads, args.head_dim, device, dtype, args.seed)
        seqlens = case["seqlens"]
        reasons = backend_reasons(q, k, v, seqlens=seqlens, probe_cache=cache)
        auto = select_backend(q, k, v, seqlens=seqlens, probe_cache=cache)

        def oracle_fn(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
            return attention_reference(a, b, c, seqlens=seqlens)

        # the oracle on the rounded inputs, in float64: what every backend must reproduce
        oracle = _forward_backward(oracle_fn, *(t.double() for t in (q, k, v, grad)))
        record: dict[str, Any] = {
            "name": case["name"], "batch": case["b"], "queries": case["m"], "keys": case["n"],
            "heads": args.heads, "head_dim": args.head_dim, "seqlens": seqlens,
            "auto": auto, "reasons": reasons, "checks": {}, "skipped": {}, "results": [],
        }
        timed: dict[str, Callable[..., Tensor]] = {}
        for backend in args.backends:
            if reasons[backend]:
                record["skipped"][backend] = reasons[backend]
                continue
            check = check_backend(backend, case, q, k, v, grad, oracle, cache)
            record["checks"][backend] = check
            if not check["ok"]:
                failures.append(f"{case['name']}/{backend}: forward {check['forward_rel_error']:.3g}"
                                f", grads q/k/v {check['grad_q_rel_error']:.3g}/"
                                f"{check['grad_k_rel_error']:.3g}/{check['grad_v_rel_error']:.3g}"
                                f" (tolerance {check['tolerance']})")
                continue
            timed[backend] = (lambda name: lambda a, b, c: attention(
                a, b, c, seqlens=seqlens, backend=name, probe_cache=cache))(backend)
        timed["oracle"] = oracle_fn

        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

        def fwd(fn: Callable[..., Tensor]) -> Callable[[], None]:
            def f() -> None:
                with torch.no_grad():
                    fn(q, k, v)
            return f

        def fwd_bwd(fn: Callable[..., Tensor]) -> Callable[[], None]:
            def f() -> None:
                for t in leaves:
                    t.grad = None
                fn(*leaves).backward(grad)
            return f

        for impl, fn in timed.items():
            row: dict[str, Any] = {"impl": impl}
            for kind, make in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                t = time_fn(make(fn), device, min_run_time=args.min_run_time)
                row[f"{kind}_ms"] = t["median_s"] * 1e3
                row[f"{kind}_iqr_ms"] = t["iqr_s"] * 1e3
                row[f"{kind}_runs"] = t["runs"]
                if not args.no_memory and impl != "oracle":
                    row[f"{kind}_peak_bytes"] = peak_memory_bytes(make(fn), device)
            record["results"].append(row)
            print(f"{case['name']:>14} {impl:>8}: fwd {row['fwd_ms']:8.3f} ms, "
                  f"fwd+bwd {row['fwd_bwd_ms']:8.3f} ms", flush=True)
        rows = {r["impl"]: r for r in record["results"]}
        record["ratios_math_over"] = {}
        if "math" in rows:
            for impl, row in rows.items():
                if impl == "math":
                    continue
                record["ratios_math_over"][impl] = {
                    kind: rows["math"][f"{kind}_ms"] / row[f"{kind}_ms"]
                    for kind in ("fwd", "fwd_bwd")}
                ratio_lines.append(
                    f"ratio math/{impl} {case['name']}: fwd "
                    f"{record['ratios_math_over'][impl]['fwd']:.2f}x, fwd+bwd "
                    f"{record['ratios_math_over'][impl]['fwd_bwd']:.2f}x")
        payload_cases.append(record)

    payload = {
        "bench": "bench_attention",
        "environment": environment(device),
        "dtype": str(dtype).removeprefix("torch."),
        "tiny": args.tiny,
        "backends": args.backends,
        "cases": payload_cases,
        "failures": failures,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = save_json(args.out / f"{result_stem('bench_attention', device)}.json", payload)
    print("auto picks: " + ", ".join(f"{c['name']} -> {c['auto']}" for c in payload_cases))
    for c in payload_cases:
        for backend, why in c["skipped"].items():
            print(f"skipped {c['name']}/{backend}: {'; '.join(why)}")
    print(f"saved {path}")
    for line in ratio_lines:
        print(line)
    if failures:
        raise SystemExit("bench_attention: backends disagree with the float64 oracle: "
                         + " | ".join(failures))
    return payload


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
