"""Router sparsity micro-benchmark: how many tokens does γ keep, does it keep the right ones, and
how fast and lean is the router next to the released per-sample math?

Synthetic problems (per image): a question whose tokens share a topic direction q (each text
token is 0.8·q + 0.6·r_j, r_j random), and n image tokens of which a planted fraction
(``--relevant-frac``) are *relevant*: v = a·q + √(1−a²)·u with ``a`` the signal, the rest distractors (a = 0). The signal
sets how sharp the mean-pooled cosine scores are (relevant tokens score ≈ 0.8·a, distractors
≈ 0 ± 0.8/√d), from sharp (0.8) to flat (0). For every token count n (1–36 tiles × 144 queries),
question length l, signal, temperature and γ, the report gives:

* kept fraction (mean and spread over the batch) and recall of the planted relevant tokens for
  ``router`` (paper: mean pooling, cumsum reaches γ), ``released`` (sum pooling, cumsum exceeds γ),
  ``legacy`` (released + the pre-Nov-2024 softmax(·/0.5)), and ``random`` (random tokens, the
  router's kept count per image);
* latency (median, ``torch.utils.benchmark``) and peak memory of the router's forward against the
  loop-and-broadcast oracle (:func:`router_reference`) and the released code's per-sample math
  (:func:`router_reference_released`), in the same run, after checking that they agree.

Writes ``<stem>.json`` (one line; ``sparsity`` as ``columns`` + ``rows``),
``<stem>_kept_vs_gamma.png`` and ``<stem>_recall_vs_kept.png`` under ``benchmarks/results/`` (or
``--out``); prints the speed-up last. ``--tiny`` runs in seconds. Reproduce the reported CPU run
with ``python -m benchmarks.bench_router`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks._common import (
    RESULTS_DIR,
    environment,
    peak_memory_bytes,
    pick_device,
    result_stem,
    save_json,
    summarise,
    time_fn,
)
from slime_adapters.testing import router_reference, router_reference_released
from slime_adapters.router import CosineTokenRouter
from slime_adapters.router_scores import pooled_cosine_scores

TEXT_TOPIC = 0.8
CPU_TIMING_MAX_TOKENS = 1296
METHODS = {
    "router": dict(text_pool="mean", crossing="reach", legacy_softmax=False),
    "released": dict(text_pool="sum", crossing="exceed", legacy_softmax=False),
    "legacy": dict(text_pool="sum", crossing="exceed", legacy_softmax=True),
}


def make_problem(b: int, n: int, l: int, d: int, *, signal: float, relevant_frac: float,
                 seed: int, device: torch.device, dtype: torch.dtype):
    """Image tokens (b, n, d), question (b, l, d) and the planted relevant mask (b, n)."""
    g = torch.Generator().manual_seed(seed)
    topic = F.normalize(torch.randn(b, 1, d, generator=g, dtype=torch.float64), dim=-1)
    text = TEXT_TOPIC * topic + math.sqrt(1 - TEXT_TOPIC**2) * F.normalize(
        torch.randn(b, l, d, generator=g, dtype=torch.float64), dim=-1)
    num_rel = max(1, round(relevant_frac * n))
    ranks = torch.rand(b, n, generator=g).argsort(dim=1).argsort(dim=1)
    relevant = ranks < num_rel
    alpha = relevant.to(torch.float64) * signal
    other = F.normalize(torch.randn(b, n, d, generator=g, dtype=torch.float64), dim=-1)
    image = alpha.unsqueeze(-1) * topic + (1 - alpha**2).sqrt().unsqueeze(-1) * other
    image = image * (0.5 + torch.rand(b, n, 1, generator=g, dtype=torch.float64))  # norms vary
    return image.to(device, dtype), text.to(device, dtype), relevant.to(device)


def _per_sample(keep: torch.Tensor, relevant: torch.Tensor) -> tuple[list[float], list[float]]:
    kept = (keep.sum(1).double() / keep.shape[1]).tolist()
    recall = ((keep & relevant).sum(1).double() / relevant.sum(1).double()).tolist()
    return kept, recall


def _row(**fields: Any) -> dict[str, Any]:
    kept, recall = fields.pop("kept"), fields.pop("recall")
    row = {**fields, "kept_mean": statistics.fmean(kept),
           "kept_std": statistics.pstdev(kept) if len(kept) > 1 else 0.0,
           "recall_mean": statistics.fmean(recall),
           "recall_std": statistics.pstdev(recall) if len(recall) > 1 else 0.0}
    # thousands of rows: 6 decimals keep the JSON readable and small
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}


def sparsity_sweep(args, device, dtype) -> list[dict[str, Any]]:
    rows = []
    for n in args.tokens:
        for l in args.text_lens:
            for si, signal in enumerate(args.signals):
                x, t, rel = make_problem(args.batch, n, l, args.dim, signal=signal,
                                         relevant_frac=args.relevant_frac,
                                         seed=args.seed + 1000 * si + n + l, device=device,
                                         dtype=dtype)
                s = pooled_cosine_scores(x, t)
                gap = {"relevant_score": float(s[rel].mean()),
                       "distractor_score": float(s[~rel].mean()),
                       "distractor_std": float(s[~rel].std())}
                g = torch.Generator().manual_seed(args.seed + 7)
                rand_rank = torch.rand(args.batch, n, generator=g).argsort(1).argsort(1).to(device)
                for temp in args.temperatures:
                    for gamma in args.gammas:
                        base = dict(n=n, l=l, signal=signal, temperature=temp, gamma=gamma, **gap)
                        for name, opts in METHODS.items():
                            out = CosineTokenRouter(gamma=gamma, temperature=temp, **opts).eval()(
                                x, t)
                            kept, recall = _per_sample(out.keep_mask, rel)
                            rows.append(_row(method=name, kept=kept, recall=recall, **base))
                            if name == "router":
                                rnd = rand_rank < out.num_kept.unsqueeze(1)
                                kept, recall = _per_sample(rnd, rel)
                                rows.append(_row(method="random", kept=kept, recall=recall,
                                                 **base))
    return rows


def _released_loop(x, t, *, gamma, temperature, legacy):
    mask = torch.ones(t.shape[1], dtype=torch.bool, device=t.device)
    return [router_reference_released(x[i], t[i], mask, topp=gamma, temperature=temperature,
                                      legacy_softmax=legacy) for i in range(x.shape[0])]


def check(args, device, n, l) -> dict[str, Any]:
    """Fast router == oracles on a float64 problem (exact keep masks), and the float32 deviation."""
    temp = args.temperatures[-1]
    x, t, _ = make_problem(args.batch, n, l, args.dim, signal=args.signals[len(args.signals) // 2],
                           relevant_frac=args.relevant_frac, seed=args.seed, device=device,
                           dtype=torch.float64)
    res: dict[str, Any] = {"n": n, "l": l, "temperature": temp}
    ok = True
    for name, opts in METHODS.items():
        router = CosineTokenRouter(gamma=0.9, temperature=temp, **opts).eval()
        out = router(x, t)
        keep, probs = router_reference(x, t, gamma=0.9, temperature=temp, **opts)
        same = bool(torch.equal(out.keep_mask, keep))
        err = float((out.scores - probs).abs().max())
        ok &= same and err < 1e-10
        if name != "router":
            rel = _released_loop(x, t, gamma=0.9, temperature=temp, legacy=opts["legacy_softmax"])
            same_rel = all(torch.equal(out.keep_mask[i].nonzero().flatten(), rel[i])
                           for i in range(len(rel)))
            ok &= same_rel
            res[f"{name}_equals_released_code"] = same_rel
        res[f"{name}_equals_oracle"] = same
        res[f"{name}_max_score_error"] = err
    out32 = CosineTokenRouter(gamma=0.9, temperature=temp).eval()(x.float(), t.float())
    keep, probs = router_reference(x, t, gamma=0.9, temperature=temp)
    res["float32_max_score_error"] = float((out32.scores.double() - probs).abs().max())
    res["float32_keep_disagreement"] = float((out32.keep_mask != keep).double().mean())
    res["passed"] = ok
    return res


def timing(args, device, dtype, n, l) -> dict[str, Any]:
    temp = args.temperatures[-1]
    x, t, _ = make_problem(args.batch, n, l, args.dim, signal=args.signals[0],
                           relevant_frac=args.relevant_frac, seed=args.seed, device=device,
                           dtype=dtype)
    router = CosineTokenRouter(gamma=0.95, temperature=temp).eval()
    runs = {
        "fast": lambda: router(x, t),
        "oracle": lambda: router_reference(x, t, gamma=0.95, temperature=temp),
        "released": lambda: _released_loop(x, t, gamma=0.95, temperature=temp, legacy=False),
    }
    row: dict[str, Any] = {"n": n, "l": l, "d": args.dim, "batch": args.batch,
                           "dtype": str(dtype).replace("torch.", "")}
    for name, fn in runs.items():
        # the oracles are slow and deterministic: one warm-up call is enough for them
        row[f"{name}_time"] = time_fn(fn, device, min_run_time=args.min_run_time,
                                      warmup=2 if name == "fast" else 1)
        row[f"{name}_peak_bytes"] = peak_memory_bytes(fn, device)
    fast_s = row["fast_time"]["median_s"]
    row["speedup_vs_oracle"] = row["oracle_time"]["median_s"] / fast_s
    row["speedup_vs_released"] = row["released_time"]["median_s"] / fast_s
    return row


def plot(rows, args, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, l = args.tokens[-1], args.text_lens[0]
    sel = [r for r in rows if r["n"] == n and r["l"] == l]
    temps = args.temperatures
    fig, axes = plt.subplots(1, len(temps), figsize=(4.2 * len(temps), 3.8), squeeze=False,
                             sharey=True)
    for ax, temp in zip(axes[0], temps):
        for signal in args.signals:
            pts = [r for r in sel if r["method"] == "router" and r["temperature"] == temp
                   and r["signal"] == signal]
            ax.errorbar([r["gamma"] for r in pts], [r["kept_mean"] for r in pts],
                        yerr=[r["kept_std"] for r in pts], marker="o", ms=3, capsize=2,
                        label=f"router, signal {signal}")
        pts = [r for r in sel if r["method"] == "legacy" and r["temperature"] == temp
               and r["signal"] == args.signals[0]]
        ax.plot([r["gamma"] for r in pts], [r["kept_mean"] for r in pts], "k--", lw=1.5,
                label="legacy softmax")
        ax.plot([min(args.gammas), 1], [min(args.gammas), 1], ":", color="grey", label="y = γ")
        ax.set_title(f"temperature {temp}")
        ax.set_xlabel("γ")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"kept fraction (n={n}, l={l})")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    p1 = Path(f"{stem}_kept_vs_gamma.png")
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    markers = "osD^v<>"
    for i, temp in enumerate(temps):
        for signal in args.signals:
            pts = [r for r in sel if r["method"] == "router" and r["temperature"] == temp
                   and r["signal"] == signal]
            ax.plot([r["kept_mean"] for r in pts], [r["recall_mean"] for r in pts],
                    marker=markers[i % len(markers)], ms=4, lw=0.8,
                    label=f"router T={temp} signal {signal}")
    for name, style in (("random", "x"), ("legacy", "+")):
        pts = [r for r in sel if r["method"] == name]
        ax.scatter([r["kept_mean"] for r in pts], [r["recall_mean"] for r in pts], marker=style,
                   color="grey" if name == "random" else "k", s=18, label=name)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("kept fraction")
    ax.set_ylabel("recall of planted relevant tokens")
    ax.set_title(f"n={n}, l={l}, relevant {args.relevant_frac:.0%}")
    ax.legend(fontsize=5, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p2 = Path(f"{stem}_recall_vs_kept.png")
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tokens", type=int, nargs="+", default=[576, 1296, 3456, 5184],
                   help="image tokens per image (tiles x 144)")
    p.add_argument("--text-lens", type=int, nargs="+", default=[16, 64])
    p.add_argument("--gammas", type=float, nargs="+", default=[0.5, 0.6, 0.75, 0.9, 0.95, 1.0])
    p.add_argument("--signals", type=float, nargs="+", default=[0.8, 0.4, 0.2, 0.1, 0.0],
                   help="cosine of relevant tokens with the question topic, sharp to flat")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.1, 0.03, 0.01])
    p.add_argument("--relevant-frac", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=None,
                   help="token width (default 4096 on CUDA, 256 on CPU to keep the oracle small)")
    p.add_argument("--timing-tokens", type=int, nargs="+", default=None,
                   help="token counts to check against the oracles and time (default: all of "
                        "--tokens on CUDA; those <= 1296 on CPU, where the oracles' n x l x d "
                        "broadcast takes seconds a call at 5184 tokens)")
    p.add_argument("--min-run-time", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default {RESULTS_DIR})")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    args = p.parse_args(argv)
    if args.tiny:
        args.tokens, args.text_lens, args.gammas = [36, 80], [3], [0.5, 0.95, 1.0]
        args.signals, args.temperatures = [0.8, 0.0], [1.0, 0.05]
        args.batch, args.dim, args.min_run_time = 2, 16, 0.01
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.dim is None:
        args.dim = 4096 if device.type == "cuda" else 256
    out_dir = args.out or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / result_stem("bench_router", device)

    if args.timing_tokens is None:
        small = [n for n in args.tokens if n <= CPU_TIMING_MAX_TOKENS] or args.tokens[:1]
        args.timing_tokens = args.tokens if device.type == "cuda" else small
    checks = [check(args, device, n, l) for n in args.timing_tokens for l in args.text_lens]
    payload: dict[str, Any] = {"benchmark": "router", "env": environment(device),
                               "args": {k: (str(v) if isinstance(v, Path) else v)
                                        for k, v in vars(args).items()},
                               "checks": checks, "checks_passed": all(c["passed"] for c in checks)}
    if not payload["checks_passed"]:
        save_json(f"{stem}.json", payload)
        print("router disagrees with its oracle:", [c for c in checks if not c["passed"]],
              file=sys.stderr)
        return 1

    rows = sparsity_sweep(args, device, dtype)
    timings = [timing(args, device, dtype, n, l) for n in args.timing_tokens
               for l in args.text_lens]
    # columns + rows: thousands of sparsity rows would repeat every key
    columns = list(rows[0])
    payload.update(sparsity={"columns": columns, "rows": [[r[c] for c in columns] for r in rows]},
                   timing=timings)
    payload["summary"] = {
        "speedup_vs_released": summarise([r["speedup_vs_released"] for r in timings]),
        "speedup_vs_oracle": summarise([r["speedup_vs_oracle"] for r in timings]),
    }
    files = [save_json(f"{stem}.json", payload, indent=None)]
    if not args.no_plots:
        files += plot(rows, args, stem)

    print(f"checks: fast == oracle and == released code on {len(checks)} problems")
    g_show = 0.95 if 0.95 in args.gammas else args.gammas[-1]
    print(f"\nkept fraction ± spread / recall at n={args.tokens[-1]}, l={args.text_lens[0]}, "
          f"gamma={g_show} (router | legacy | random at the router's budget):")
    for temp in args.temperatures:
        for signal in args.signals:
            cells = []
            for m in ("router", "legacy", "random"):
                r = next(r for r in rows if r["n"] == args.tokens[-1]
                         and r["l"] == args.text_lens[0] and r["temperature"] == temp and r["signal"] == signal
                         and r["gamma"] == g_show and r["method"] == m)
                cells.append(f"{r['kept_mean']:.2f}±{r['kept_std']:.2f} / {r['recall_mean']:.2f}")
            print(f"  T={temp:<5} signal={signal:<4} " + " | ".join(cells))
    print(f"\n{'n':>6} {'l':>4} {'fast ms':>9} {'oracle ms':>10} {'released ms':>12} "
          f"{'fast MB':>8} {'released MB':>12}")
    for r in timings:
        mb = (lambda v: float("nan") if v is None else v / 2**20)
        print(f"{r['n']:>6} {r['l']:>4} {r['fast_time']['median_s'] * 1e3:>9.3f} "
              f"{r['oracle_time']['median_s'] * 1e3:>10.2f} "
              f"{r['released_time']['median_s'] * 1e3:>12.2f} {mb(r['fast_peak_bytes']):>8.1f} "
              f"{mb(r['released_peak_bytes']):>12.1f}")
    for f in files:
        print("wrote", f)
    s_rel, s_or = payload["summary"]["speedup_vs_released"], payload["summary"]["speedup_vs_oracle"]
    print(f"speed-up of CosineTokenRouter (median over sizes): {s_rel['median']:.1f}x over the "
          f"released per-sample math (min {s_rel['min']:.1f}x, max {s_rel['max']:.1f}x), "
          f"{s_or['median']:.1f}x over the loop oracle (min {s_or['min']:.1f}x) "
          f"on {payload['env']['device']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
