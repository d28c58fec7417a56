"""Router sparsity against the baseline token selectors: recall of planted relevant tokens
against the token budget, at equal mean kept tokens.

Features: ``bench_router.make_problem`` (per image, a fraction ``--relevant-frac`` of the ``n``
tokens planted relevant with cosine ``signal`` to the question's topic, the rest distractors;
token norms vary independently of relevance). Each image's tokens lie on a near-square raster
(``rows × cols = n``) for the spatial selector. There is no vision encoder here, so the saliency
selector reads a stand-in for [CLS] attention: ``softmax_i(v_i · mean_j v_j / √d)``, the
attention a token summarising the image would pay each token (question-agnostic, like the real
one).

Methods (:data:`METHODS`): the SliME router (``CosineTokenRouter``, paper rules) at every
temperature × γ, and every baseline of :mod:`slime_adapters.selectors`:

* ``matched`` rows: each baseline at the budget whose mean kept count equals the router's at that
  (temperature, γ) (:func:`~slime_adapters.selectors.match_mean_budget`), the comparison the
  paper's question asks for: which tokens, at the same number of tokens;
* ``sweep`` rows: each baseline at fixed keep fractions (``--fractions``), the recall-versus-budget
  curve.

Reported per row: kept fraction (mean, spread over images), recall (mean, spread) and, at one
budget per token count, the selection time per batch (median, ``torch.utils.benchmark``). Every
selector is checked against its float64 loop oracle before anything is measured.

Writes ``bench_sparsity_<device>_torch<version>_<commit>.json`` and ``..._recall_vs_budget.png``
under ``benchmarks/results/`` (or ``--out``). ``--tiny`` runs in seconds.

The models are built from configs (:func:`method_config`), the same configs
``SliMEVisualAdapterConfig(router=...)`` takes, so an accuracy sweep on a trained model is one more
function: load the model, and for each (temperature, γ) evaluate it with the router, read the
router's mean kept count, then evaluate it with ``adapter.router = build_router(method_config(m,
budget=match_mean_budget(num_local, mean)))`` for every baseline ``m``.

    python -m benchmarks.bench_sparsity          # a few minutes on 2 cores
    python -m benchmarks.bench_sparsity --tiny
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import (
    RESULTS_DIR,
    environment,
    pick_device,
    result_stem,
    save_json,
    threads,
    time_fn,
)
from benchmarks.bench_router import make_problem
from slime_adapters.router import CosineTokenRouterConfig
from slime_adapters.selectors import (
    DiversitySelectorConfig,
    NormSelectorConfig,
    QuestionTopKSelectorConfig,
    RandomSelectorConfig,
    SaliencySelectorConfig,
    SpatialSelectorConfig,
    build_router,
    match_mean_budget,
)
from slime_adapters.testing import selectors as oracles

BASELINES = {
    "random": RandomSelectorConfig,
    "spatial": SpatialSelectorConfig,
    "norm": NormSelectorConfig,
    "diversity": DiversitySelectorConfig,
    "question_topk": QuestionTopKSelectorConfig,
    "saliency": SaliencySelectorConfig,
}
METHODS = ("router", *BASELINES)
QUESTION_AWARE = {"router", "question_topk"}


def method_config(name: str, *, budget: dict[str, float | int] | None = None,
                  gamma: float | None = None, temperature: float | None = None):
    """The config of a method: ``"router"`` at ``gamma``/``temperature`` (paper rules, no
    training noise), or a baseline at ``budget`` (``{"keep_fraction": f}`` or
    ``{"keep_count": c}``). Usable as ``SliMEVisualAdapterConfig(router=...)``."""
    if name == "router":
        return CosineTokenRouterConfig(gamma=gamma, temperature=temperature, noise_std=0.0)
    if name not in BASELINES:
        raise ValueError(f"unknown method {name!r}; methods: {METHODS}")
    return BASELINES[name](**(budget or {}))


def raster_of(n: int) -> tuple[int, int]:
    """The most square ``(rows, cols)`` with ``rows · cols = n``."""
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    return rows, n // rows


def stand_in_saliency(x: torch.Tensor) -> torch.Tensor:
    """``softmax_i(v_i · mean_j v_j / √d)`` per image: a [CLS]-attention stand-in."""
    logits = torch.einsum("bnd,bd->bn", x.float(), x.float().mean(1)) / math.sqrt(x.shape[-1])
    return torch.softmax(logits, dim=1)


def run_method(name: str, config, x, t, raster, saliency):
    module = build_router(config).eval()
    if name == "router":
        return lambda: module(x, t)
    return lambda: module(x, t if name in QUESTION_AWARE else None, raster=raster,
                          saliency=saliency)


def _summary(keep: torch.Tensor, relevant: torch.Tensor) -> dict[str, float]:
    kept = (keep.sum(1).double() / keep.shape[1]).tolist()
    recall = ((keep & relevant).sum(1).double() / relevant.sum(1).double()).tolist()
    row = {"kept_mean": statistics.fmean(kept), "kept_std": statistics.pstdev(kept),
           "kept_tokens_mean": statistics.fmean(keep.sum(1).double().tolist()),
           "recall_mean": statistics.fmean(recall), "recall_std": statistics.pstdev(recall)}
    return {k: round(v, 6) for k, v in row.items()}


def check_oracles(seed: int = 0) -> dict[str, Any]:
    """Every baseline equals its float64 oracle (exact keep masks) on a masked batch."""
    g = torch.Generator().manual_seed(seed)
    b, n, d = 3, 24, 8
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    t = torch.randn(b, 4, d, generator=g, dtype=torch.float64)
    mask = torch.rand(b, n, generator=g) > 0.2
    mask[1] = False
    mask[1, 5] = True
    sal = stand_in_saliency(x).double()
    raster = [raster_of(n)] * b
    budget = {"keep_fraction": 0.3}
    want = {
        "random": oracles.random_selector_reference(x, image_mask=mask, **budget),
        "spatial": oracles.spatial_selector_reference(x, raster, image_mask=mask, **budget),
        "norm": oracles.norm_selector_reference(x, image_mask=mask, **budget),
        "diversity": oracles.diversity_selector_reference(x, image_mask=mask, **budget),
        "question_topk": oracles.question_topk_reference(x, t, image_mask=mask, **budget),
        "saliency": oracles.saliency_selector_reference(x, sal, image_mask=mask, **budget),
    }
    result = {}
    for name, (keep, _) in want.items():
        module = build_router(method_config(name, budget=budget))
        out = module(x, t if name in QUESTION_AWARE else None, image_mask=mask,
                     raster=torch.tensor(raster), saliency=sal)
        result[name] = bool(torch.equal(out.keep_mask, keep))
    return {"equal_to_oracle": result, "passed": all(result.values())}


def sparsity_sweep(args, device) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows, timings = [], []
    for n in args.tokens:
        raster = torch.tensor([raster_of(n)] * args.batch)
        num_valid = torch.full((args.batch,), n)
        for si, signal in enumerate(args.signals):
            x, t, rel = make_problem(args.batch, n, args.text_len, args.dim, signal=signal,
                                     relevant_frac=args.relevant_frac,
                                     seed=args.seed + 1000 * si + n, device=device,
                                     dtype=torch.float32)
            sal = stand_in_saliency(x)
            base = {"n": n, "signal": signal}
            for temp in args.temperatures:
                for gamma in args.gammas:
                    cfg = method_config("router", gamma=gamma, temperature=temp)
                    out = run_method("router", cfg, x, t, raster, sal)()
                    mean_kept = float(out.num_kept.double().mean())
                    setting = {"temperature": temp, "gamma": gamma}
                    rows.append({**base, "kind": "matched", "method": "router", **setting,
                                 "budget": None, **_summary(out.keep_mask, rel)})
                    budget = match_mean_budget(num_valid, mean_kept)
                    for name in BASELINES:
                        fn = run_method(name, method_config(name, budget=budget), x, t, raster,
                                        sal)
                        rows.append({**base, "kind": "matched", "method": name, **setting,
                                     "budget": budget, **_summary(fn().keep_mask, rel)})
            for frac in args.fractions:
                for name in BASELINES:
                    budget = {"keep_fraction": frac}
                    fn = run_method(name, method_config(name, budget=budget), x, t, raster, sal)
                    rows.append({**base, "kind": "sweep", "method": name, "temperature": None,
                                 "gamma": None, "budget": budget,
                                 **_summary(fn().keep_mask, rel)})
            if si == 0 and n in args.timing_tokens:  # selection time per batch
                for name in METHODS:
                    cfg = (method_config("router", gamma=0.9, temperature=args.temperatures[-1])
                           if name == "router" else
                           method_config(name, budget={"keep_fraction": args.time_fraction}))
                    fn = run_method(name, cfg, x, t, raster, sal)
                    timings.append({"n": n, "batch": args.batch, "dim": args.dim,
                                    "method": name, "budget": cfg.to_dict(),
                                    "time": time_fn(fn, device, min_run_time=args.min_run_time,
                                                    warmup=1)})
    return rows, timings


def plot(rows, args, stem: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = args.tokens[-1]
    fig, axes = plt.subplots(1, len(args.signals), figsize=(4.4 * len(args.signals), 4),
                             squeeze=False, sharey=True)
    for ax, signal in zip(axes[0], args.signals):
        sel = [r for r in rows if r["n"] == n and r["signal"] == signal]
        for name in BASELINES:
            pts = sorted((r["kept_mean"], r["recall_mean"]) for r in sel
                         if r["kind"] == "sweep" and r["method"] == name)
            ax.plot(*zip(*pts), marker=".", lw=1, label=name)
        for i, temp in enumerate(args.temperatures):
            pts = sorted((r["kept_mean"], r["recall_mean"]) for r in sel
                         if r["method"] == "router" and r["temperature"] == temp)
            ax.plot(*zip(*pts), marker="osD^v"[i % 5], color="k", lw=1.6, ms=5,
                    alpha=1 - 0.25 * i, label=f"SliME router T={temp} (γ sweep)")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_title(f"n={n}, signal {signal}")
        ax.set_xlabel("kept fraction of local tokens")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"recall of planted relevant tokens ({args.relevant_frac:.0%})")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    path = Path(f"{stem}_recall_vs_budget.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, nargs="+", default=[576, 1296])
    p.add_argument("--signals", type=float, nargs="+", default=[0.4, 0.2, 0.1])
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.1, 0.03])
    p.add_argument("--gammas", type=float, nargs="+", default=[0.5, 0.75, 0.9, 0.95])
    p.add_argument("--fractions", type=float, nargs="+",
                   default=[0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0])
    p.add_argument("--relevant-frac", type=float, default=0.1)
    p.add_argument("--text-len", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--time-fraction", type=float, default=0.25,
                   help="keep fraction of the baselines when timing them")
    p.add_argument("--timing-tokens", type=int, nargs="+", default=None,
                   help="token counts at which to time every method (default: all of --tokens)")
    p.add_argument("--min-run-time", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: unchanged; 1 on a shared, loaded machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default {RESULTS_DIR})")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    args = p.parse_args(argv)
    if args.tiny:
        args.tokens, args.signals, args.temperatures = [36, 80], [0.4, 0.0], [1.0, 0.05]
        args.gammas, args.fractions = [0.5, 0.9], [0.1, 0.5, 1.0]
        args.batch, args.dim, args.text_len, args.min_run_time = 3, 16, 3, 0.01
        args.timing_tokens = [36]
    if args.timing_tokens is None:
        args.timing_tokens = list(args.tokens)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    out_dir = args.out or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / result_stem("bench_sparsity", device)
    checks = check_oracles(args.seed)
    with threads(args.threads):
        env = environment(device)
    payload: dict[str, Any] = {"benchmark": "sparsity", "env": env,
                               "args": {k: (str(v) if isinstance(v, Path) else v)
                                        for k, v in vars(args).items()},
                               "checks": checks}
    if not checks["passed"]:
        save_json(f"{stem}.json", payload)
        print("selectors disagree with their oracles:", checks, file=sys.stderr)
        return 1
    with torch.no_grad(), threads(args.threads):
        rows, timings = sparsity_sweep(args, device)
    columns = list(rows[0])
    payload.update(sparsity={"columns": columns, "rows": [[r[c] for c in columns] for r in rows]},
                   timing=timings)
    files = [save_json(f"{stem}.json", payload, indent=None)]
    if not args.no_plots:
        files.append(plot(rows, args, stem))

    n = args.tokens[-1]
    print(f"checks: every selector == its float64 oracle ({len(checks['equal_to_oracle'])})")
    print(f"\nrecall at the router's mean kept fraction, n={n} "
          f"(relevant {args.relevant_frac:.0%}; kept / recall):")
    print(f"{'signal':>6} {'T':>5} {'γ':>5} " + " ".join(f"{m:>13}" for m in METHODS))
    for signal in args.signals:
        for temp in args.temperatures:
            for gamma in args.gammas:
                cells = []
                for m in METHODS:
                    r = next(r for r in rows if r["kind"] == "matched" and r["n"] == n
                             and r["signal"] == signal and r["temperature"] == temp
                             and r["gamma"] == gamma and r["method"] == m)
                    cells.append(f"{r['kept_mean']:.2f}/{r['recall_mean']:.2f}")
                print(f"{signal:>6} {temp:>5} {gamma:>5} " + " ".join(f"{c:>13}" for c in cells))
    print(f"\nselection time per batch of {args.batch} (ms):")
    for tokens in args.timing_tokens:
        cells = [f"{t['method']} {t['time']['median_s'] * 1e3:.2f}" for t in timings
                 if t["n"] == tokens]
        print(f"  n={tokens}: " + ", ".join(cells))
    for f in files:
        print("wrote", f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
