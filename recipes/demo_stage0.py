"""Stage 0 of the demo: train the tiny vision encoder once, freeze it, and cache its features.

The paper starts from a pretrained CLIP encoder and never trains it. The demo's encoder starts
from random weights, so it is trained once here, supervised and without text, on
``--stage0-pool`` 336-px pictures of the task drawn once (:func:`drawn_views`; half with small
squares of their size in the tiles, half with squares of their size in a large image's global
view). For every 28-px patch a linear head names the colour the patch shows (none, one of the six
small-square colours or one of the three large-shape colours; a patch shows a colour when at
least :data:`PATCH_MIN_PIXELS` of its pixels are nearest to it; small-square classes weigh 5×) and
a second head names the view's background colour from the mean token. (A third objective that
asked every token for the small-square colour its view shows was dropped: at 200 steps and this
learning rate it cut the validation patches showing a square that are named right from 58 % to
21 %.) A view is said to show the colour of its most confident small-square patch (none below
probability 0.5). Labels come from the views' pixels, so a square shrunk to a few pixels is
labelled "none", as it should be. The encoder is measured on the views of 16
validation images, written to ``<out>/stage0/encoder.safetensors`` with a ``stage0.json`` stamp
and reused while the stamp matches; every variant loads it and keeps it frozen, so the demo
encodes every view once and trains on the cached features.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from recipes import detail_task as task
from slime_adapters import AdaptiveSlicer
from slime_adapters.config import atomic_write_text

__all__ = ["ImageFeatures", "encode_images", "stage0_encoder"]

PALETTE = ({**task.BACKGROUNDS}, {**task.DETAIL_COLORS}, {**task.SHAPE_COLORS})
PATCH_MIN_PIXELS = 25
_FORMAT = 4


@dataclass
class ImageFeatures:
    """The frozen encoder's features of one image: ``global_view (s, dv)``, ``tiles (p, s, dv)``
    and the tile ``grid`` (cols, rows)."""

    global_view: Tensor
    tiles: Tensor
    grid: tuple[int, int]


def _pixels(views: Tensor, slicer: AdaptiveSlicer) -> Tensor:
    mean = torch.tensor(slicer.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(slicer.config.std).view(1, 3, 1, 1)
    return (views * std + mean) * 255


def patch_labels(views: Tensor, slicer: AdaptiveSlicer, patch: int,
                 chunk: int = 64) -> tuple[Tensor, Tensor]:
    """Labels of normalised views ``(v, 3, t, t)``: per patch ``(v, g, g)`` long, 0 = no colour of
    note, 1–6 a small-square colour, 7–9 a large-shape colour (small-square colours win a tie);
    per view ``(v,)`` long, the small-square colour the view shows (1–6) or 0."""
    if views.shape[0] > chunk:
        parts = [patch_labels(views[i:i + chunk], slicer, patch, chunk)
                 for i in range(0, views.shape[0], chunk)]
        return torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])
    names = [n for group in PALETTE for n in group]
    rgb = torch.tensor([c for group in PALETTE for c in group.values()], dtype=torch.float32)
    px = _pixels(views, slicer)
    nearest = torch.cdist(px.permute(0, 2, 3, 1).reshape(-1, 3), rgb).argmin(1)
    nearest = nearest.view(views.shape[0], views.shape[2], views.shape[3])
    n_bg = len(PALETTE[0])
    onehot = F.one_hot(nearest, len(names)).permute(0, 3, 1, 2).float()[:, n_bg:]
    counts = F.avg_pool2d(onehot, patch) * patch * patch  # (v, 9, g, g)
    detail = counts[:, :len(PALETTE[1])]
    has_detail = detail.amax(1) >= PATCH_MIN_PIXELS
    best = torch.where(has_detail, detail.argmax(1), counts.argmax(1))
    per_patch = torch.where(counts.amax(1) >= PATCH_MIN_PIXELS, best + 1, 0)
    view_counts = detail.sum((2, 3))  # (v, 6) pixels of each small-square colour in the view
    per_view = torch.where(view_counts.amax(1) >= PATCH_MIN_PIXELS, view_counts.argmax(1) + 1, 0)
    return per_patch, per_view


def _stamp(args, model_config: dict) -> dict:
    return {"format": _FORMAT, "vision": model_config["vision"], "steps": args.stage0_steps,
            "batch": args.stage0_batch, "lr": args.stage0_lr, "pool": args.stage0_pool,
            "seed": 0,
            "tile_detail_px": task.TILE_DETAIL_PX}


def drawn_views(rng: random.Random, n: int, slicer: AdaptiveSlicer) -> tuple[Tensor, Tensor]:
    """``n`` freshly drawn 336-px pictures of the task as normalised views ``(n, 3, t, t)``, with
    their background ids ``(n,)``. Half have small squares of 10–18 px (their size in the tiles),
    half of 2–5 px (their size in a large image's global view, below the label threshold)."""
    views, bgs = [], []
    names = list(task.BACKGROUNDS)
    for i in range(n):
        side = rng.randint(10, 18) if i % 2 == 0 else rng.randint(2, 5)
        img, meta = task.draw_image(rng, task.TILE, task.TILE, detail_px=side)
        views.append(slicer(img).global_view)
        bgs.append(names.index(meta["background"]))
    return torch.stack(views), torch.tensor(bgs)


def stage0_encoder(vision: nn.Module, encode, val_index: Path, out: Path,
                   slicer: AdaptiveSlicer, args, model_config: dict) -> dict:
    """Train ``vision`` in place on ``--stage0-pool`` drawn views (or load the cached weights), then freeze
    it; measure it on the views of 16 validation images.

    ``encode(pixels)`` is the model's own view encoder (the features the adapter sees).
    Returns the stage's summary (loss first/last, held-out accuracies, seconds, cached)."""
    folder = out / "stage0"
    stamp = _stamp(args, model_config)
    weights, stamp_file = folder / "encoder.safetensors", folder / "stage0.json"
    if weights.is_file() and stamp_file.is_file():
        saved = json.loads(stamp_file.read_text(encoding="utf-8"))
        if saved.get("stamp") == stamp:
            vision.load_state_dict(load_file(weights))
            vision.requires_grad_(False).eval()
            print(f"stage 0: the frozen encoder is reused from {weights}")
            return {**saved["summary"], "cached": True}
    t0 = time.perf_counter()
    patch = vision.config.patch_size
    dv = vision.config.hidden_size
    n_classes = 1 + len(PALETTE[1]) + len(PALETTE[2])
    heads = nn.ModuleDict({"patch": nn.Linear(dv, n_classes),
                           "bg": nn.Linear(dv, len(task.BACKGROUNDS))})
    # most patches show nothing of note and few show a small square: weigh the rare classes up
    weight = torch.ones(n_classes)
    weight[0], weight[1:1 + len(PALETTE[1])] = 0.1, 5.0
    vision.requires_grad_(True).train()
    params = [*vision.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=args.stage0_lr, weight_decay=0.0)
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    pool, pool_bgs = drawn_views(rng, args.stage0_pool, slicer)
    pool_patch, _ = patch_labels(pool, slicer, patch)
    pool = pool.half()  # half the memory; every batch is encoded in float32
    losses = []
    bar = tqdm(range(args.stage0_steps), desc="stage 0  encoder", unit="step",
               dynamic_ncols=True, disable=args.quiet)
    for _ in bar:
        idx = torch.randint(0, pool.shape[0], (args.stage0_batch,), generator=g)
        loss = _stage0_loss(encode(pool[idx].float()), pool_patch[idx],
                            pool_bgs[idx, None], heads, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix({"loss(last 20)": f"{sum(losses[-20:]) / len(losses[-20:]):.3f}"})
    bar.close()
    vision.requires_grad_(False).eval()
    with torch.no_grad():
        recs = {r["image"]: r for r in json.loads(val_index.read_text(encoding="utf-8"))}
        held = [slicer(val_index.parent / name) for name in sorted(recs)[:16]]
        hv = torch.cat([torch.cat([h.global_view[None], h.tiles]) for h in held])
        hl, shown = patch_labels(hv, slicer, patch)
        hf = encode(hv)
        pred = heads["patch"](hf).argmax(-1).view_as(hl)
        marked = (hl > 0) & (hl <= len(PALETTE[1]))  # patches showing a small square
        acc = float((pred[marked] == hl[marked]).float().mean()) if marked.any() else math.nan
        view_pred = _view_colour(heads["patch"](hf))
        view_acc = float((view_pred[shown > 0] == shown[shown > 0]).float().mean())
        none_acc = float((view_pred[shown == 0] == 0).float().mean())
    k = max(1, len(losses) // 5)
    summary = {"stage": "0", "steps": len(losses), "loss_first": sum(losses[:k]) / k,
               "loss_last": sum(losses[-k:]) / k, "loss_window": k,
               "loss_fell": sum(losses[-k:]) < sum(losses[:k]),
               "views_drawn": args.stage0_pool,
               "heldout_square_patch_accuracy": acc, "heldout_square_patches": int(marked.sum()),
               "heldout_square_view_accuracy": view_acc,
               "heldout_square_views": int((shown > 0).sum()),
               "heldout_empty_view_accuracy": none_acc, "heldout_views": int(shown.numel()),
               "seconds": time.perf_counter() - t0}
    folder.mkdir(parents=True, exist_ok=True)
    stamp_file.unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in vision.state_dict().items()}, str(weights))
    atomic_write_text(stamp_file, json.dumps({"stamp": stamp, "summary": summary}, indent=1))
    print(f"stage 0: loss, mean of the first {k} steps -> last {k}: {summary['loss_first']:.2f} "
          f"-> {summary['loss_last']:.2f}; on 16 validation images: {acc:.0%} of the patches "
          f"showing a small square, {view_acc:.0%} of the views showing one and {none_acc:.0%} "
          f"of the others named right ({summary['seconds']:.0f} s)")
    return {**summary, "cached": False}


def _stage0_loss(feats: Tensor, labels: Tensor, bg_labels: Tensor, heads: nn.ModuleDict,
                 weight: Tensor) -> Tensor:
    """Patch colours and the view's background (from the mean token)."""
    logits = heads["patch"](feats)  # (v, s, classes)
    patch_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), weight=weight)
    return patch_loss + F.cross_entropy(heads["bg"](feats.mean(1)), bg_labels[:, 0])


def _view_colour(logits: Tensor) -> Tensor:
    """The small-square colour ``(v,)`` a view shows by the patch head's logits ``(v, s, c)``:
    the most likely small-square class of its most confident patch, 0 when no patch gives a
    small-square class more than half the probability."""
    prob = logits.softmax(-1)[..., 1:1 + len(PALETTE[1])]  # (v, s, 6)
    best, cls = prob.flatten(1).max(1)
    return torch.where(best > 0.5, cls % len(PALETTE[1]) + 1, 0)


@torch.no_grad()
def encode_images(encode, images: list[str], root: Path, slicer: AdaptiveSlicer, *,
                  desc: str, quiet: bool, chunk: int = 48) -> dict[str, ImageFeatures]:
    """Slice every image once and encode all its views with the frozen encoder ``encode``."""
    out: dict[str, ImageFeatures] = {}
    pending: list[tuple[str, Tensor, tuple[int, int]]] = []

    def flush():
        feats = encode(torch.cat([v for _, v, _ in pending]))
        start = 0
        for name, v, grid in pending:
            f = feats[start:start + v.shape[0]]
            out[name] = ImageFeatures(f[0].clone(), f[1:].clone(), grid)
            start += v.shape[0]
        pending.clear()

    for name in tqdm(images, desc=desc, unit="img", dynamic_ncols=True, disable=quiet):
        s = slicer(root / name)
        pending.append((name, torch.cat([s.global_view[None], s.tiles]), s.plan.grid))
        if sum(v.shape[0] for _, v, _ in pending) >= chunk:
            flush()
    if pending:
        flush()
    return out
