"""Slicing throughput against transformers' LLaVA-NeXT image processor, plus a grid/token table.

    python -m benchmarks.bench_slicing [--num-images 200] [--repeats 3] [--out DIR] [--tiny]

Same generated images (varied sizes and PIL modes) for every contender, in one run:

* ``llava_next``: transformers' ``LlavaNextImageProcessor`` built in code (336-px crops, the
  default ``image_grid_pinpoints``). Without torchvision, transformers 5 resolves it to its
  PIL/numpy backend ``LlavaNextImageProcessorPil``; the run records which class it used.
* ``slicer_llava``: :class:`AdaptiveSlicer` doing the *same work*: ``policy="pinpoints"`` with
  the same pinpoints, stretched global view, black padding. Checked equal to ``llava_next``'s
  ``pixel_values`` (images without alpha; transformers composites alpha on white) before timing.
* ``slicer_llava_serial``: the same with ``parallel_resize=False`` (one thread for PIL).
* ``slicer_paper``: the default paper policy (more tiles for large images; for information).

Before timing, the default slicer is also checked against the float64 loop oracle
:func:`slime_adapters.testing.slice_image_reference`. Timing: ``torch.utils.benchmark``,
one warm-up pass, then ``--repeats`` interleaved passes over all images, medians. The images/s
ratio ``slicer_llava / llava_next`` is printed last. Results go to
``<out>/bench_slicing_<device>_torch<version>_<commit>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils import benchmark as tbench

from slime_adapters.config import atomic_write_text
from slime_adapters.testing import slice_image_reference
from slime_adapters.slicing import LLAVA_NEXT_PINPOINTS, AdaptiveSlicer, plan_grid, visual_token_count

REPO_ROOT = Path(__file__).resolve().parents[1]
TABLE_SIZES = [(100, 100), (336, 336), (500, 400), (1000, 1000), (1920, 1080), (4000, 100), (3000, 3000)]
MODES = ["RGB", "RGB", "RGB", "RGBA", "L", "P", "CMYK", "LA"]
ALPHA_MODES = {"RGBA", "LA"}


# ---- environment ------------------------------------------------------------------------------
def cpu_tag() -> str:
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1]
                break
    except OSError:
        pass
    slug = re.sub(r"[^A-Za-z0-9]+", "-", model).strip("-")[:40]
    return f"cpu{os.cpu_count()}-{slug}"


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
            check=True, timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "nogit"
    return head + ("-dirty" if dirty else "")


# ---- data -------------------------------------------------------------------------------------
def make_images(n: int, *, seed: int, max_side: int) -> list[Image.Image]:
    """``n`` images of varied sizes and modes: the typical sizes of the token table (clipped to
    ``max_side``), then random ones with a log-uniform longer side in [64, max_side] (most
    dataset images are small, a few are large) and an aspect ratio up to about 1:6."""
    rng = np.random.default_rng(seed)
    sizes = [(min(w, max_side), min(h, max_side)) for w, h in TABLE_SIZES]
    while len(sizes) < n:
        longer = int(np.exp(rng.uniform(np.log(64), np.log(max_side))))
        shorter = max(16, int(longer * np.exp(-rng.uniform(0.0, 1.8))))
        sizes.append((longer, shorter) if rng.random() < 0.6 else (shorter, longer))
    images = []
    for i, (w, h) in enumerate(sizes[:n]):
        # blurred noise: structure at several scales, cheap to make
        coarse = rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)
        mode = MODES[i % len(MODES)]
        if mode in ("RGBA", "LA"):
            alpha = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
            image = image.convert(mode[:-1])
            image.putalpha(alpha)
        elif mode != "RGB":
            image = image.convert(mode)
        images.append(image)
    return images


# ---- contenders -------------------------------------------------------------------------------
def llava_processor():
    # ``transformers.LlavaNextImageProcessor`` resolves to this class when torchvision is absent
    # (and warns); importing it directly is the same object without the warning.
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    # transformers speaks (height, width); ours is (width, height).
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=[[h, w] for w, h in LLAVA_NEXT_PINPOINTS],
    )


def run_llava(proc, images):
    return [proc(image, return_tensors="pt")["pixel_values"][0] for image in images]


def run_slicer(slicer, images):
    return [slicer(image) for image in images]


# ---- checks -----------------------------------------------------------------------------------
def check_oracle(images: list[Image.Image]) -> dict[str, Any]:
    """Default slicer (float64 output) against the loop oracle on the RGB images."""
    slicer = AdaptiveSlicer(dtype=torch.float64)
    cfg = slicer.config
    worst = 0.0
    checked = 0
    for image in images:
        if image.mode != "RGB":
            continue
        out = slicer(image)
        view, tiles = slice_image_reference(
            image, out.plan, global_view=cfg.global_view, fill=cfg.fill_color, mean=cfg.mean, std=cfg.std
        )
        worst = max(worst, (out.global_view - view).abs().max().item(), (out.tiles - tiles).abs().max().item())
        checked += 1
    return {"images": checked, "max_abs_err": worst, "equal": checked > 0 and worst < 1e-9}


def check_llava(images, llava_out, slicer_out) -> dict[str, Any]:
    worst, checked, shapes_equal = 0.0, 0, True
    for image, ref, ours in zip(images, llava_out, slicer_out):
        if image.mode in ALPHA_MODES:
            continue
        mine = torch.cat([ours.global_view[None], ours.tiles])
        if mine.shape != ref.shape:
            shapes_equal = False
            continue
        worst = max(worst, (mine - ref).abs().max().item())
        checked += 1
    return {"images": checked, "shapes_equal": shapes_equal, "max_abs_err": worst,
            "equal": shapes_equal and checked > 0 and worst < 1e-5}


# ---- token table ------------------------------------------------------------------------------
def token_table(num_queries: int) -> list[dict[str, Any]]:
    rows = []
    for w, h in TABLE_SIZES:
        for policy in ("paper", "reference", "pinpoints"):
            plan = plan_grid(w, h, policy=policy)
            rows.append({
                "size": [w, h], "policy": policy, "grid": list(plan.grid), "tiles": plan.num_tiles,
                "local_tokens": plan.num_local_tokens(num_queries),
                "visual_tokens": visual_token_count(plan, num_queries=num_queries),
            })
    return rows


def print_table(rows: list[dict[str, Any]], num_queries: int) -> None:
    print(f"\nGrids and visual tokens (global 576 + separator 1 + {num_queries}/tile, router γ=1):")
    print(f"{'size':>10} | {'paper':>18} | {'reference':>18} | {'pinpoints':>18}")
    for i in range(0, len(rows), 3):
        cells = [f"{r['grid'][0]}x{r['grid'][1]} {r['visual_tokens']:>6} tok" for r in rows[i : i + 3]]
        size = "x".join(map(str, rows[i]["size"]))
        print(f"{size:>10} | " + " | ".join(f"{c:>18}" for c in cells))


# ---- main -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per contender")
    parser.add_argument("--max-side", type=int, default=3000, help="largest generated side")
    parser.add_argument("--num-queries", type=int, default=144)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--tiny", action="store_true", help="8 small images, 1 repeat (smoke test)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.num_images, args.repeats, args.max_side = 8, 1, 700

    t0 = time.perf_counter()
    images = make_images(args.num_images, seed=args.seed, max_side=args.max_side)
    print(f"{len(images)} images, modes {sorted({im.mode for im in images})}, "
          f"{sum(im.width * im.height for im in images) / 1e6:.1f} Mpx, made in {time.perf_counter() - t0:.1f} s")

    proc = llava_processor()
    contenders = {
        "llava_next": (run_llava, proc),
        "slicer_llava": (run_slicer, AdaptiveSlicer(
            policy="pinpoints", pinpoints=LLAVA_NEXT_PINPOINTS, global_view="resize", fill=(0, 0, 0))),
        "slicer_llava_serial": (run_slicer, AdaptiveSlicer(
            policy="pinpoints", pinpoints=LLAVA_NEXT_PINPOINTS, global_view="resize", fill=(0, 0, 0),
            parallel_resize=False)),
        "slicer_paper": (run_slicer, AdaptiveSlicer()),
    }

    # Correctness first; these passes are also the warm-up.
    oracle = check_oracle(images[: max(2, len(images) // 25)])
    outputs = {name: fn(obj, images) for name, (fn, obj) in contenders.items()}
    same = check_llava(images, outputs["llava_next"], outputs["slicer_llava"])
    tiles = {name: (sum(x.shape[0] - 1 for x in out) if name == "llava_next" else sum(x.num_tiles for x in out))
             for name, out in outputs.items()}
    del outputs
    print(f"slicer == float64 oracle: {oracle['equal']} (max |err| {oracle['max_abs_err']:.2e} "
          f"on {oracle['images']} images)")
    print(f"slicer_llava == llava_next pixel_values: {same['equal']} (max |err| {same['max_abs_err']:.2e} "
          f"on {same['images']} images without alpha)")

    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, (fn, obj) in contenders.items():
            timer = tbench.Timer(stmt="fn(obj, images)", globals={"fn": fn, "obj": obj, "images": images})
            times[name].append(timer.timeit(1).median)
    results = {}
    for name, samples in times.items():
        median = statistics.median(samples)
        results[name] = {"median_s": median, "samples_s": samples, "images_per_s": len(images) / median,
                         "tiles": tiles[name]}
        print(f"{name:>20}: {len(images) / median:7.1f} images/s  (median {median:.3f} s of "
              f"{len(samples)}, {tiles[name]} tiles)")

    rows = token_table(args.num_queries)
    print_table(rows, args.num_queries)

    ratio = results["slicer_llava"]["images_per_s"] / results["llava_next"]["images_per_s"]
    commit = git_commit()
    device = cpu_tag()
    record = {
        "bench": "bench_slicing", "device": device, "torch": torch.__version__, "commit": commit,
        "python": sys.version.split()[0], "torch_threads": torch.get_num_threads(),
        "transformers": __import__("transformers").__version__, "llava_class": type(proc).__name__,
        "num_images": len(images), "repeats": args.repeats, "tiny": args.tiny,
        "checks": {"oracle": oracle, "llava_next": same}, "results": results,
        "ratio_slicer_llava_over_llava_next": ratio, "token_table": rows,
    }
    stem = f"bench_slicing_{device}_torch{torch.__version__.split('+')[0]}_{commit}"
    path = Path(args.out) / f"{stem}.json"
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    print(f"\nsaved {path}")
    print(f"ratio (images/s, slicer_llava / llava_next, same work): {ratio:.2f}x")
    return record


if __name__ == "__main__":
    main()
