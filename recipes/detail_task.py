"""A generated high-resolution detail task (LLaVA format): detail the 336-px global view loses.

Every image has a plain background (white, gray or black), one large shape (circle, square or
triangle, in pink, brown or cyan) and a few small squares: one in a vivid colour (red, green,
blue, yellow, purple or orange), the others in the large shape's colour. Two records per image,
labelled by ``kind``:

- ``detail``: "what color is the small square ?" (the vivid one; chance 1/6);
- ``global``: "what color is the background ?" or "what color is the large shape ?" (chance 1/3).

Sizes and aspect ratios come from three buckets (long side ≤ 336, ≤ 1000 and up to 2000 px). The
small squares are sized from the slicer's plan so that each is :data:`TILE_DETAIL_PX` px wide in
the 336-px tiles; the global view shrinks the long side to 336 px, so in the two larger buckets
it spans under :data:`GLOBAL_DETAIL_MAX_PX` px there (``tests/test_demo_task.py`` measures both on
the views the slicer makes), under a fifth of one 28-px encoder patch. In the ≤ 336 bucket the
global view shows the square at full size: a control where the global view suffices.

Images are written once per (split, seed, count) and reused: :func:`make_detail_dataset` returns
the existing index when its ``task.json`` matches.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from recipes.templates import IMAGE_TOKEN
from slime_adapters.config import atomic_write_text
from slime_adapters.slicing import plan_grid

__all__ = ["BACKGROUNDS", "CHANCE", "DETAIL_COLORS", "SHAPE_COLORS", "SIZE_BUCKETS", "TASK_WORDS",
           "TILE", "MAX_TILES", "detail_size", "draw_image", "make_detail_dataset", "size_bucket"]

TILE, MAX_TILES = 336, 6
TILE_DETAIL_PX = 14
GLOBAL_DETAIL_MAX_PX = 5
DETAIL_COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220),
                 "yellow": (235, 220, 30), "purple": (150, 40, 190), "orange": (245, 140, 20)}
SHAPE_COLORS = {"pink": (250, 160, 210), "brown": (130, 80, 40), "cyan": (40, 200, 210)}
BACKGROUNDS = {"white": (235, 235, 235), "gray": (128, 128, 128), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
DETAIL_Q = "what color is the small square ?"
GLOBAL_Q = {"background": "what color is the background ?",
            "shape": "what color is the large shape ?"}
CHANCE = {"detail": 1 / len(DETAIL_COLORS), "global": 1 / len(BACKGROUNDS)}
TASK_WORDS = tuple(dict.fromkeys(
    [w for q in (DETAIL_Q, *GLOBAL_Q.values()) for w in q.split()]
    + list(DETAIL_COLORS) + list(SHAPE_COLORS) + list(BACKGROUNDS)))
# (bucket, weight, sizes): a tile plan of 3 × 2 (or 2 × 3) for the two larger buckets
SIZE_BUCKETS = (
    ("<=336", 0.2, ((336, 336), (336, 224), (224, 336), (320, 256))),
    ("<=1000", 0.4, ((1000, 600), (600, 1000), (960, 540), (900, 600), (1000, 667))),
    (">1000", 0.4, ((2000, 1000), (1000, 2000), (1800, 1200), (1200, 1800), (2000, 1333))),
)
_DISTRACTORS = 2
_FORMAT = 1


def size_bucket(width: int, height: int) -> str:
    """The size bucket of an image by its long side: ``"<=336"``, ``"<=1000"`` or ``">1000"``."""
    side = max(width, height)
    return "<=336" if side <= 336 else "<=1000" if side <= 1000 else ">1000"


def detail_size(width: int, height: int) -> int:
    """Side in image pixels of a small square that is :data:`TILE_DETAIL_PX` px in the tiles."""
    plan = plan_grid(width, height, tile_size=TILE, max_tiles=MAX_TILES)
    return max(4, round(TILE_DETAIL_PX * width / plan.resized_size[0]))


def _overlaps(box, boxes, margin):
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + margin and b[0] < x1 + margin and y0 < b[3] + margin
               and b[1] < y1 + margin for b in boxes)


def draw_image(rng: random.Random, width: int, height: int, detail_px: int | None = None):
    """One image of the task and its facts (``detail_px``: the small squares' side, by default
    :func:`detail_size`)."""
    bg, shape_color = rng.choice(sorted(BACKGROUNDS)), rng.choice(sorted(SHAPE_COLORS))
    img = Image.new("RGB", (width, height), BACKGROUNDS[bg])
    draw = ImageDraw.Draw(img)
    short = min(width, height)
    side = int(short * rng.uniform(0.35, 0.55))
    x0, y0 = rng.randrange(0, width - side), rng.randrange(0, height - side)
    big = (x0, y0, x0 + side, y0 + side)
    kind = rng.choice(SHAPES)
    fill = SHAPE_COLORS[shape_color]
    if kind == "circle":
        draw.ellipse(big, fill=fill)
    elif kind == "square":
        draw.rectangle(big, fill=fill)
    else:
        draw.polygon([(x0, y0 + side), (x0 + side, y0 + side), (x0 + side // 2, y0)], fill=fill)
    d = detail_size(width, height) if detail_px is None else detail_px
    boxes = [big]
    placed = []
    for _ in range(1 + _DISTRACTORS):
        for _attempt in range(200):
            x, y = rng.randrange(0, width - d), rng.randrange(0, height - d)
            box = (x, y, x + d, y + d)
            if not _overlaps(box, boxes, margin=d):
                break
        else:
            raise RuntimeError(f"no free place for a {d}-px square in a {width}x{height} image")
        boxes.append(box)
        placed.append(box)
    color = rng.choice(sorted(DETAIL_COLORS))
    draw.rectangle((placed[0][0], placed[0][1], placed[0][2] - 1, placed[0][3] - 1),
                   fill=DETAIL_COLORS[color])
    for box in placed[1:]:
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=fill)
    meta = {"background": bg, "shape": kind, "shape_color": shape_color, "detail_color": color,
            "detail_box": list(placed[0]), "detail_px": d, "size": [width, height],
            "size_bucket": size_bucket(width, height)}
    return img, meta


def make_detail_dataset(out_dir: str | Path, num_images: int, *, seed: int) -> Path:
    """Write ``num_images`` images and ``data.json`` (two records per image) into ``out_dir``;
    reuse them when ``out_dir/task.json`` says they were made with the same arguments.

    Each record holds ``id``, ``image``, ``conversations`` and ``kind`` (``"detail"`` or
    ``"global"``), ``size_bucket`` and the image's drawing facts under ``meta``. Images are written
    before the index, and the index and ``task.json`` atomically, so an interrupted call leaves no
    index pointing at missing images. Raises ``ValueError`` for ``num_images`` < 1."""
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
    out = Path(out_dir)
    stamp = {"format": _FORMAT, "num_images": num_images, "seed": seed}
    index, stamp_file = out / "data.json", out / "task.json"
    if index.is_file() and stamp_file.is_file():
        try:
            if json.loads(stamp_file.read_text(encoding="utf-8")) == stamp:
                return index
        except json.JSONDecodeError:
            pass  # a damaged stamp: write everything again
    out.mkdir(parents=True, exist_ok=True)
    stamp_file.unlink(missing_ok=True)  # images change below: the old stamp no longer holds
    rng = random.Random(seed)
    weights = [w for _, w, _ in SIZE_BUCKETS]
    records = []
    for i in range(num_images):
        sizes = rng.choices(SIZE_BUCKETS, weights=weights)[0][2]
        img, meta = draw_image(rng, *rng.choice(sizes))
        name = f"img_{i:05d}.png"
        img.save(out / name, compress_level=1)
        which = rng.choice(sorted(GLOBAL_Q))
        answer = meta["background"] if which == "background" else meta["shape_color"]
        for kind, question, ans in (("detail", DETAIL_Q, meta["detail_color"]),
                                    ("global", GLOBAL_Q[which], answer)):
            records.append({
                "id": f"detail-{i}-{kind}", "image": name, "kind": kind,
                "size_bucket": meta["size_bucket"], "meta": meta,
                "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
                                  {"from": "gpt", "value": ans}],
            })
    atomic_write_text(index, json.dumps(records, indent=1))
    atomic_write_text(stamp_file, json.dumps(stamp))
    return index
