"""Visual tokens per image, and the LLM prefill FLOPs they cost, across image sizes.

Methods (vision tokens of one image; the question's tokens are not counted):

* ``llava-1.5``: 576 (one 336-px view).
* ``llava-next``: LLaVA-NeXT any-res exactly as its code counts them: the best pinpoint canvas
  (``select_best_resolution`` = :func:`~slime_adapters.slicing.plan_grid` with
  ``policy="pinpoints"``), 576 base tokens, the grid's ``(rows·24) × (cols·24)`` feature map
  unpadded to the image's aspect ratio (``unpad_image``), plus one ``image_newline`` token per
  remaining feature row: ``576 + h'·(w' + 1)``.
* ``slime-paper@γ``: paper policy grid, ``576 + 1 (separator) + ⌈kept · 144 · tiles⌉`` where the
  keep-rate ``kept`` is measured with :class:`~slime_adapters.router.CosineTokenRouter`
  (question-mean pooling) on synthetic features (``bench_router.make_problem``: 10 % of the tokens
  planted relevant, cosine ``--signal`` with the question's topic) at each γ and ``--temperature``.
* ``slime-released``: the released policy's grid, masked-sum pooling, crossing ``>``, γ=0.95.

Prefill FLOPs of a Llama-3-8B-shaped LLM (32 layers, d=4096, 32 query / 8 KV heads of 128, FFN
14336, vocab 128256) for ``T`` visual tokens::

    FLOPs(T) = 2·P·T + 2·n_layers·d·T² + 2·d·V
    P = n_layers·(2·d² + 2·d·d_kv + 3·d·d_ff) = 6.98e9 (matrix weights of the decoder layers)

``2·P·T``: every token through every weight matrix; ``2·n_layers·d·T²``: causal ``QKᵀ`` and
``PV`` (``2·T²·d`` each without the mask, half of it with); ``2·d·V``: logits of the last token
only. The counts are checked before anything is reported: the LLaVA-NeXT formula against
transformers' own ``unpad_image`` (or, without transformers, a tensor port of it), the SliME
counts against :func:`~slime_adapters.slicing.visual_token_count`. Results:
``benchmarks/results/bench_tokens_<device>_torch<version>_<commit>.json`` and a PNG (or
``--out DIR``); the last line prints SliME's tokens relative to LLaVA-NeXT's.

    python -m benchmarks.bench_tokens           # seconds
    python -m benchmarks.bench_tokens --tiny
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import RESULTS_DIR, environment, pick_device, result_stem, save_json
from benchmarks.bench_router import make_problem
from slime_adapters.router import CosineTokenRouter
from slime_adapters.slicing import plan_grid, visual_token_count

BASE_TOKENS = 576  # one 336-px view through CLIP ViT-L/14-336, 24×24 patches
PATCHES_PER_TILE = 24
NUM_QUERIES = 144
LLAMA3_8B = {"layers": 32, "d": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128,
             "d_ff": 14336, "vocab": 128256}
DEFAULT_SIZES = ((336, 336), (500, 400), (640, 480), (672, 672), (1024, 768), (1008, 1008),
                 (1280, 720), (1344, 1344), (1920, 1080), (2016, 2016), (300, 3000), (3000, 300))
GAMMAS = (0.5, 0.75, 0.95, 1.0)


def llama_prefill_flops(tokens: int, cfg: dict[str, int] = LLAMA3_8B) -> float:
    """Prefill FLOPs of ``tokens`` tokens (formula in the module docstring)."""
    d, layers = cfg["d"], cfg["layers"]
    d_kv = cfg["kv_heads"] * cfg["head_dim"]
    params = layers * (2 * d * d + 2 * d * d_kv + 3 * d * cfg["d_ff"])
    return 2.0 * params * tokens + 2.0 * layers * d * tokens**2 + 2.0 * d * cfg["vocab"]


def llava_next_tokens(width: int, height: int) -> int:
    """LLaVA-NeXT's visual token count for a ``width×height`` image (module docstring)."""
    plan = plan_grid(width, height, policy="pinpoints")
    cols, rows = plan.grid
    cur_h, cur_w = rows * PATCHES_PER_TILE, cols * PATCHES_PER_TILE
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        pad = (cur_h - new_h) // 2
        h, w = cur_h - 2 * pad, cur_w
    else:
        new_w = int(round(width * (cur_h / height), 7))
        pad = (cur_w - new_w) // 2
        h, w = cur_h, cur_w - 2 * pad
    return BASE_TOKENS + h * (w + 1)


def llava_next_tokens_oracle(width: int, height: int) -> int:
    """The same count by running LLaVA-NeXT's own ``unpad_image`` on a feature map (transformers'
    when importable, else a line-by-line tensor port) and appending the newline column."""
    cols, rows = plan_grid(width, height, policy="pinpoints").grid
    feat = torch.zeros(1, rows * PATCHES_PER_TILE, cols * PATCHES_PER_TILE)
    try:
        from transformers.models.llava_next.modeling_llava_next import unpad_image
    except ImportError:
        unpad_image = _unpad_image_port
    out = unpad_image(feat, (height, width))
    out = torch.cat([out, out.new_zeros(1, out.shape[1], 1)], dim=2)  # image_newline per row
    return BASE_TOKENS + out.shape[1] * out.shape[2]


def _unpad_image_port(tensor: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    original_height, original_width = original_size
    current_height, current_width = tensor.shape[1:]
    if original_width / original_height > current_width / current_height:
        new_height = int(round(original_height * (current_width / original_width), 7))
        padding = (current_height - new_height) // 2
        return tensor[:, padding:current_height - padding, :]
    new_width = int(round(original_width * (current_height / original_height), 7))
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding:current_width - padding]


def measure_keep_rate(n: int, *, gamma: float, temperature: float, signal: float, dim: int,
                      text: int, batch: int, seed: int, device: torch.device,
                      released: bool = False) -> float:
    """Mean fraction of ``n`` synthetic local tokens the router keeps at ``gamma``."""
    image, question, _ = make_problem(batch, n, text, dim, signal=signal, relevant_frac=0.1,
                                      seed=seed, device=device, dtype=torch.float32)
    opts = (dict(text_pool="sum", crossing="exceed") if released
            else dict(text_pool="mean", crossing="reach"))
    router = CosineTokenRouter(gamma=gamma, temperature=temperature, **opts).eval()
    with torch.no_grad():
        kept = router(image, question).num_kept
    return float(kept.double().mean()) / n


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="where the router runs (cpu, cuda, auto)")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="router softmax temperature (1.0: the modules' and released default)")
    ap.add_argument("--signal", type=float, default=0.4,
                    help="cosine of the planted relevant tokens with the question topic")
    ap.add_argument("--gammas", type=float, nargs="+", default=list(GAMMAS))
    ap.add_argument("--dim", type=int, default=256, help="feature width of the synthetic tokens")
    ap.add_argument("--text", type=int, default=64, help="question tokens")
    ap.add_argument("--batch", type=int, default=4, help="synthetic samples per keep-rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="three sizes, small features")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    args.device = pick_device(args.device)
    if not args.temperature > 0:
        ap.error(f"--temperature must be > 0, got {args.temperature}")
    if any(not 0 < g <= 1 for g in args.gammas):
        ap.error(f"--gammas must lie in (0, 1], got {args.gammas}")
    args.sizes = DEFAULT_SIZES
    if args.tiny:
        args.sizes = ((336, 336), (1024, 768), (300, 3000))
        args.dim, args.text, args.batch = 16, 4, 2
    return args


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Count, check, save; returns the payload. Raises SystemExit when a count disagrees."""
    args = _parse(argv)
    rows: list[dict[str, Any]] = []
    keep_cache: dict[tuple[int, float, bool], float] = {}

    def keep(n: int, gamma: float, released: bool) -> float:
        key = (n, gamma, released)
        if key not in keep_cache:
            keep_cache[key] = measure_keep_rate(
                n, gamma=gamma, temperature=args.temperature, signal=args.signal, dim=args.dim,
                text=args.text, batch=args.batch, seed=args.seed, device=args.device,
                released=released)
        return keep_cache[key]

    for width, height in args.sizes:
        nxt, nxt_oracle = llava_next_tokens(width, height), llava_next_tokens_oracle(width, height)
        if nxt != nxt_oracle:
            raise SystemExit(f"bench_tokens: LLaVA-NeXT count for {width}x{height} disagrees with "
                             f"its unpad_image: {nxt} vs {nxt_oracle}")
        counts: dict[str, Any] = {"llava-1.5": BASE_TOKENS, "llava-next": nxt}
        paper = plan_grid(width, height, policy="paper")
        released = plan_grid(width, height, policy="reference")
        grids = {"paper": list(paper.grid), "reference": list(released.grid),
                 "pinpoints": list(plan_grid(width, height, policy="pinpoints").grid)}
        keep_rates = {}
        for gamma in args.gammas:
            n = NUM_QUERIES * paper.num_tiles
            rate = keep(n, gamma, False)
            local = max(1, math.ceil(rate * n - 1e-9))
            total = BASE_TOKENS + 1 + local
            expect = visual_token_count(paper, keep_fraction=local / n)
            if total != expect:
                raise SystemExit(f"bench_tokens: SliME count {total} != visual_token_count {expect}")
            counts[f"slime-paper@{gamma:g}"] = total
            keep_rates[f"paper@{gamma:g}"] = rate
        n_rel = NUM_QUERIES * released.num_tiles
        rate = keep(n_rel, 0.95, True)
        counts["slime-released"] = BASE_TOKENS + 1 + max(1, math.ceil(rate * n_rel - 1e-9))
        keep_rates["released@0.95"] = rate
        rows.append({"size": [width, height], "megapixels": width * height / 1e6, "grids": grids,
                     "keep_rates": keep_rates, "tokens": counts,
                     "prefill_tflops": {k: llama_prefill_flops(v) / 1e12
                                        for k, v in counts.items()}})

    methods = list(rows[0]["tokens"])
    print(f"{'image':>10} " + " ".join(f"{m:>17}" for m in methods))
    for r in rows:
        print(f"{r['size'][0]:>4}x{r['size'][1]:<5} "
              + " ".join(f"{r['tokens'][m]:>8} {r['prefill_tflops'][m]:>6.1f}TF" for m in methods))

    device = args.device
    stem = result_stem("bench_tokens", device)
    args.out.mkdir(parents=True, exist_ok=True)
    files = []
    if not args.no_plot:
        files.append(str(_plot(rows, methods, args.out / f"{stem}.png")))
    ref_gamma = 0.95 if 0.95 in args.gammas else args.gammas[-1]
    ratio = [r["tokens"][f"slime-paper@{ref_gamma:g}"] / r["tokens"]["llava-next"] for r in rows]
    payload = {
        "bench": "bench_tokens", "environment": environment(device),
        "settings": {"temperature": args.temperature, "signal": args.signal,
                     "relevant_frac": 0.1, "dim": args.dim, "text": args.text,
                     "batch": args.batch, "gammas": args.gammas, "tiny": args.tiny},
        "llm": {"name": "Llama-3-8B shape", **LLAMA3_8B,
                "formula": "2*P*T + 2*layers*d*T^2 + 2*d*vocab, "
                           "P = layers*(2*d^2 + 2*d*d_kv + 3*d*d_ff)"},
        "rows": rows, "files": files,
        "slime_paper_over_llava_next": {"gamma": ref_gamma, "per_size": ratio,
                                        "median": sorted(ratio)[len(ratio) // 2]},
    }
    path = save_json(args.out / f"{stem}.json", payload)
    print(f"saved {path}")
    print(f"ratio slime-paper@{ref_gamma:g} / llava-next tokens: median "
          f"{payload['slime_paper_over_llava_next']['median']:.2f} "
          f"(min {min(ratio):.2f}, max {max(ratio):.2f})")
    return payload


def _plot(rows: list[dict[str, Any]], methods: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['size'][0]}x{r['size'][1]}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        xs = [i + (j - len(methods) / 2) * width for i in range(len(rows))]
        axes[0].bar(xs, [r["tokens"][m] for r in rows], width, label=m)
        axes[1].bar(xs, [r["prefill_tflops"][m] for r in rows], width, label=m)
    for ax, title in zip(axes, ("visual tokens per image", "Llama-3-8B prefill TFLOPs")):
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
