"""The paper's §2.3 toy problem: simultaneous gradient descent versus alternating least squares.

Fit a rank-1 ``u vᵀ`` to ``X = a bᵀ + b aᵀ`` (``a``, ``b`` unit vectors in R^d, overlap
``c = aᵀb``) by minimising ``L(u, v) = ½‖u vᵀ − X‖²``. ``X`` has eigenvalues ``1 + c`` (eigenvector
``a + b``) and ``−(1 − c)`` (``a − b``); the optimum captures the larger of ``|1 ± c|``, so
``L* = ½ (1 − |c|)²``, and the other stationary point (the "saddle") has ``L = ½ (1 + |c|)²``. In
the paper's coordinates ``u = α a + β b``, ``z = (α, β)``, ``M = [[1, c], [c, 1]]``: the optimum is
``z`` along the top eigenvector ``w₊ = (1, 1)/√2`` of ``M`` (for ``c > 0``), the saddle along
``w₋ = (1, −1)/√2``; ``τ = zᵀw₊``, ``ν = zᵀw₋``.

Methods, each run for the same number of updates of ``(u, v)`` (two matrix-vector products each):

* ``gd``: simultaneous gradient descent, the paper's Eq. (1) / Theorems 1 and 3;
* ``gd_alt``: one gradient step on ``v`` with ``u`` fixed, then one on ``u`` with the new ``v``
  (block-coordinate gradient descent: what a staged training run does with SGD);
* ``als``: exact alternating minimisation ``v ← X u/‖u‖²``, ``u ← X v/‖v‖²`` (Theorems 2 and 5).

Initialisations: ``stated`` — the paper's Eq. (2), ``u₀ = α₀a + β₀b``, ``v₀ = β₀a + α₀b`` with
``α₀, β₀ ~ N(0, s²)``; ``near_saddle`` — Eq. (2) with ``z₀`` on the saddle's direction plus
10⁻⁸ of its length along the optimum's; ``on_saddle`` — exactly on the saddle's direction (``τ₀ = 0``
for ``c > 0``: ``α₀ = −β₀``); ``generic`` — ``u₀, v₀ ~ N(0, s²/d · I_d)``. For ``c < 0`` the roles of
``w₊`` and ``w₋`` swap (the optimum is then along ``a − b``).

Before reporting, the d-dimensional runs are checked against the theorems' own 2-D recursions
(Eq. 3 for ``gd``, Theorem 5 for ``als``), computed the slow obvious way in float64.

Run: ``python -m benchmarks.bilinear [--trials N --dim D --steps T --out DIR | --tiny]``; writes
a JSON of the table and a PNG of trajectories named by device, torch version and git commit.

Shapes legend: ``n`` trials (all initialisations stacked), ``d`` dimension, ``t`` steps.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
from pathlib import Path

import torch

METHODS = ("gd", "gd_alt", "als")
INITS = ("stated", "near_saddle", "on_saddle", "generic")


def make_problem(dim: int, overlap: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Unit ``a``, ``b`` with ``aᵀb = overlap`` in R^dim, ``X``, and the optimal direction."""
    if not -1 < overlap < 1 or overlap == 0:
        raise ValueError(f"overlap={overlap} must lie in (-1, 1) and be nonzero")
    q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=gen, dtype=torch.float64))
    a = q[:, 0]
    b = overlap * q[:, 0] + math.sqrt(1 - overlap**2) * q[:, 1]
    x = torch.outer(a, b) + torch.outer(b, a)
    best = a + b if overlap > 0 else a - b
    return {"a": a, "b": b, "x": x, "best": best / best.norm(), "basis": torch.stack([a, b], 1),
            "overlap": overlap}


def initial_points(kind: str, n: int, prob: dict, scale: float, gen: torch.Generator):
    """``(u0, v0)``, each (n, d), for one initialisation kind."""
    a, b = prob["a"], prob["b"]
    d = a.numel()
    if kind == "generic":
        u = torch.randn(n, d, generator=gen, dtype=torch.float64) * scale / math.sqrt(d)
        v = torch.randn(n, d, generator=gen, dtype=torch.float64) * scale / math.sqrt(d)
        return u, v
    ab = torch.randn(n, 2, generator=gen, dtype=torch.float64) * scale
    if kind in ("near_saddle", "on_saddle"):
        # z = ρ·saddle + ε·optimum, with the saddle along w₋ for c > 0 and along w₊ for c < 0.
        sgn = 1.0 if prob["overlap"] > 0 else -1.0
        saddle = torch.tensor([1.0, -sgn], dtype=torch.float64) / math.sqrt(2)
        best = torch.tensor([1.0, sgn], dtype=torch.float64) / math.sqrt(2)
        rho = ab[:, :1].abs() + ab[:, 1:].abs()
        eps = 1e-8 * rho if kind == "near_saddle" else torch.zeros_like(rho)
        ab = rho * saddle + eps * best
    elif kind != "stated":
        raise ValueError(f"init={kind!r}, expected one of {INITS}")
    alpha, beta = ab[:, :1], ab[:, 1:]
    return alpha * a + beta * b, beta * a + alpha * b


def run(method: str, u: torch.Tensor, v: torch.Tensor, x: torch.Tensor, steps: int, lr: float,
        observe=lambda u: u):
    """Iterate ``steps`` times. Returns ``observe(u)`` stacked over the t+1 iterates, and the final
    ``(u, v)``."""
    traj = [observe(u)]
    for _ in range(steps):
        if method == "gd":
            u, v = (u - lr * (u * (v * v).sum(-1, keepdim=True) - v @ x),
                    v - lr * (v * (u * u).sum(-1, keepdim=True) - u @ x))
        elif method == "gd_alt":
            v = v - lr * (v * (u * u).sum(-1, keepdim=True) - u @ x)
            u = u - lr * (u * (v * v).sum(-1, keepdim=True) - v @ x)
        elif method == "als":
            v = (u @ x) / (u * u).sum(-1, keepdim=True)
            u = (v @ x) / (v * v).sum(-1, keepdim=True)
        else:
            raise ValueError(f"method={method!r}, expected one of {METHODS}")
        traj.append(observe(u))
    return torch.stack(traj), u, v


def loss(u: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """½‖u vᵀ − X‖² per trial, without forming u vᵀ: (n,)."""
    uu, vv = (u * u).sum(-1), (v * v).sum(-1)
    return 0.5 * (uu * vv - 2 * ((u @ x) * v).sum(-1) + (x * x).sum())


def theorem_oracle(method: str, z0: list[float], c: float, steps: int, lr: float) -> list[list[float]]:
    """The paper's 2-D recursion for z = (α, β), in plain Python: Eq. (3) for gd (with v's
    coefficients the swap of u's), Theorem 5 for als (with ‖v_t‖ from the intermediate v)."""
    alpha, beta = z0
    out = [[alpha, beta]]
    for _ in range(steps):
        uu = alpha * alpha + beta * beta + 2 * c * alpha * beta
        if method == "gd":
            diag = 1 + lr * (1 - uu)
            alpha, beta = diag * alpha + lr * c * beta, lr * c * alpha + diag * beta
        else:
            a1, b1 = (alpha + c * beta) / uu, (c * alpha + beta) / uu  # v = β'a + α'b
            vv = a1 * a1 + b1 * b1 + 2 * c * a1 * b1
            alpha, beta = (a1 + c * b1) / vv, (c * a1 + b1) / vv
        out.append([alpha, beta])
    return out


def exact_on_saddle(overlap: float, steps: int, lr: float) -> dict[str, list[float]]:
    """(τ, ν) after ``steps`` of the theorems' 2-D recursions started exactly on the saddle's
    direction: there the structure is kept exactly in floating point, unlike in R^d."""
    z0 = [0.5, -0.5] if overlap > 0 else [0.5, 0.5]
    out = {}
    for method in ("gd", "als"):
        alpha, beta = theorem_oracle(method, z0, overlap, steps, lr)[-1]
        out[method] = [(alpha + beta) / math.sqrt(2), (alpha - beta) / math.sqrt(2)]
    return out


def coords(traj: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(τ, ν) of each u in the span of (a, b), by least squares: (..., 2)."""
    z = traj @ basis @ torch.linalg.inv(basis.T @ basis)
    w = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2)
    return z @ w.T


def check_against_theorems(dim: int, overlap: float, steps: int, lr: float, seed: int) -> float:
    """Worst |z_d-dim − z_oracle| / max(1, |z|) over 4 stated initialisations. Raises if > 1e-9."""
    gen = torch.Generator().manual_seed(seed)
    prob = make_problem(dim, overlap, gen)
    u0, v0 = initial_points("stated", 4, prob, 0.5, gen)
    worst = 0.0
    for method in ("gd", "als"):
        traj, _, _ = run(method, u0, v0, prob["x"], steps, lr)
        z = traj @ prob["basis"] @ torch.linalg.inv(prob["basis"].T @ prob["basis"])
        for i in range(u0.shape[0]):
            ref = torch.tensor(theorem_oracle(method, z[0, i].tolist(), overlap, steps, lr),
                               dtype=torch.float64)
            err = ((z[:, i] - ref).abs() / ref.abs().clamp(min=1)).max().item()
            worst = max(worst, err)
    if not worst <= 1e-9:
        raise AssertionError(f"d-dimensional runs disagree with the theorems' recursions: {worst:.3e}")
    return worst


def evaluate(args: argparse.Namespace) -> dict:
    """Run every (overlap, method, init) combination; returns the results dict."""
    rows, curves, paths = [], {}, {}
    for overlap in args.overlaps:
        gen = torch.Generator().manual_seed(args.seed)
        prob = make_problem(args.dim, overlap, gen)
        starts = {k: initial_points(k, args.trials, prob, args.init_scale, gen) for k in INITS}
        opt_loss, saddle_loss = 0.5 * (1 - abs(overlap)) ** 2, 0.5 * (1 + abs(overlap)) ** 2
        for method in METHODS:
            u0 = torch.cat([starts[k][0] for k in INITS])
            v0 = torch.cat([starts[k][1] for k in INITS])
            # Plotted paths: the first stated inits and the first two near-saddle ones.
            picks = list(range(min(5, args.trials))) + [args.trials, args.trials + 1][: args.trials]
            k = len(picks)

            to_tv = coords(torch.eye(args.dim, dtype=torch.float64), prob["basis"])  # (d, 2)

            def observe(u: torch.Tensor) -> torch.Tensor:
                # Along the way: |cos| of u to the optimum's direction (n,), and (τ, ν) of k paths.
                cos = ((u / u.norm(dim=-1, keepdim=True)) @ prob["best"]).abs()
                return torch.cat([cos, (u[picks] @ to_tv).flatten()])

            obs, u, v = run(method, u0, v0, prob["x"], args.steps, args.lr, observe)
            n = u0.shape[0]
            final = loss(u, v, prob["x"])
            align = obs[-1, :n]
            ok_t = (1 - obs[:, :n]) < args.tol  # (t, n): direction converged to the optimum's
            for j, kind in enumerate(INITS):
                sl = slice(j * args.trials, (j + 1) * args.trials)
                f, al, okt = final[sl], align[sl], ok_t[:, sl]
                finite = torch.isfinite(f)
                success = finite & ((f - opt_loss).abs() < args.tol) & (1 - al < args.tol)
                saddle = finite & ((f - saddle_loss).abs() < 1e-3)
                first = torch.where(okt.any(0), okt.float().argmax(0), torch.full_like(f, -1).long())
                hit = first[first >= 0].double()
                rows.append({
                    "overlap": overlap, "method": method, "init": kind,
                    "success_rate": success.double().mean().item(),
                    "saddle_rate": saddle.double().mean().item(),
                    "diverged_rate": (~finite).double().mean().item(),
                    "median_final_gap": (f[finite] - opt_loss).median().item() if finite.any() else math.nan,
                    "median_steps_to_optimum": hit.median().item() if hit.numel() else None,
                })
                curves[f"{overlap}/{method}/{kind}"] = okt.double().mean(1).tolist()
            if overlap == args.overlaps[0]:
                paths[method] = obs[:, n:].reshape(-1, k, 2).tolist()
    exact = {str(c): exact_on_saddle(c, args.steps, args.lr) for c in args.overlaps}
    return {"rows": rows, "success_by_step": curves, "paths": paths, "exact_on_saddle": exact}


def print_table(rows: list[dict]) -> None:
    head = f"{'c':>6} {'method':>7} {'init':>12} {'success':>8} {'saddle':>7} {'diverged':>8} " \
           f"{'median gap':>11} {'median steps':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        steps = "-" if r["median_steps_to_optimum"] is None else f"{r['median_steps_to_optimum']:.0f}"
        print(f"{r['overlap']:>6.2f} {r['method']:>7} {r['init']:>12} {r['success_rate']:>8.3f} "
              f"{r['saddle_rate']:>7.3f} {r['diverged_rate']:>8.3f} {r['median_final_gap']:>11.2e} "
              f"{steps:>12}")


def plot(results: dict, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    ax = axes[0]
    colors = {"gd": "tab:red", "gd_alt": "tab:orange", "als": "tab:blue"}
    for method, tv in results["paths"].items():
        tv = torch.tensor(tv)  # (t, k, 2)
        for k in range(tv.shape[1]):
            ax.plot(tv[:, k, 0], tv[:, k, 1], color=colors[method], lw=1, alpha=0.8,
                    marker="." if method == "als" else None, ms=3,
                    label=method if k == 0 else None)
    c = args.overlaps[0]
    opt = [(1, 0), (-1, 0)] if c > 0 else [(0, 1), (0, -1)]
    sad = [(0, 1), (0, -1)] if c > 0 else [(1, 0), (-1, 0)]
    ax.scatter(*zip(*opt), marker="*", s=150, color="green", label="optimum (τ=±1)", zorder=5)
    ax.scatter(*zip(*sad), marker="x", s=80, color="black", label="saddle (ν=±1)", zorder=5)
    ax.set_xlabel("τ = zᵀw₊")
    ax.set_ylabel("ν = zᵀw₋")
    ax.set_title(f"u's (τ, ν) from Eq. (2) inits (5 random, 2 near the saddle), c = {c}\n"
                 "als fixes u's direction only (its scale is set by the last solve)", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[1]
    for key, curve in results["success_by_step"].items():
        overlap, method, kind = key.split("/")
        if float(overlap) != c:
            continue
        ax.plot(curve, color=colors[method],
                ls={"stated": "-", "near_saddle": "--", "on_saddle": ":", "generic": "-."}[kind],
                label=f"{method} / {kind}")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("updates of (u, v)")
    ax.set_ylabel("fraction of trials aligned with the optimum")
    ax.set_title(f"d = {args.dim}, lr = {args.lr}, {args.trials} trials per init")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip() or "nogit"
    except (OSError, subprocess.SubprocessError):
        return "nogit"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=100, help="trials per initialisation kind")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--steps", type=int, default=2000, help="updates of (u, v) for every method")
    p.add_argument("--lr", type=float, default=0.05, help="gradient-descent step size")
    p.add_argument("--overlaps", type=lambda s: [float(x) for x in s.split(",")],
                   default=[0.5, 0.2, -0.3], help="values of c = aᵀb, comma-separated")
    p.add_argument("--init-scale", type=float, default=0.5)
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    args = p.parse_args(argv)
    if args.tiny:
        args.trials, args.dim, args.steps, args.overlaps = 8, 6, 300, [0.5, -0.3]
    for name in ("trials", "dim", "steps"):
        if getattr(args, name) < (2 if name == "dim" else 1):
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)} is too small")
    worst = check_against_theorems(args.dim, args.overlaps[0], 200, args.lr, args.seed)
    print(f"d-dimensional runs match the theorems' 2-D recursions (worst relative error {worst:.1e})")
    results = evaluate(args)
    print_table(results["rows"])
    for c, tv in results["exact_on_saddle"].items():
        print(f"c={c}: the 2-D recursions started exactly on the saddle end at (τ, ν) = "
              + ", ".join(f"{m} ({t:+.3f}, {n:+.3f})" for m, (t, n) in tv.items()))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bilinear_cpu_torch{torch.__version__.split('+')[0]}_{_git_commit()}"
    record = {
        "benchmark": "bilinear", "device": platform.processor() or platform.machine(),
        "torch": torch.__version__, "commit": _git_commit(), "oracle_max_rel_error": worst,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": results["rows"], "exact_on_saddle": results["exact_on_saddle"],
    }
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(results, args, args.out / f"{stem}.png")
    print(f"wrote {args.out / (stem + '.json')} and .png")
    return record


if __name__ == "__main__":
    main()
