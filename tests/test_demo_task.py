"""The generated detail task: the small square survives in the 336-px tiles and vanishes from the
global view in the larger size buckets (measured on the slicer's own views)."""

from __future__ import annotations

import json

import pytest
import torch
from einops import rearrange

from recipes import detail_task as task
from slime_adapters import AdaptiveSlicer
from slime_adapters.slicing import plan_grid


def _pixels(view: torch.Tensor, slicer: AdaptiveSlicer) -> torch.Tensor:
    mean = torch.tensor(slicer.config.mean).view(3, 1, 1)
    std = torch.tensor(slicer.config.std).view(3, 1, 1)
    return (view * std + mean) * 255


def _extent(views: torch.Tensor, color, background, shape) -> int:
    """Longest side, in pixels, of the region closer to ``color`` than to any blend of the
    background and the large shape's colour (at least half-way to the square's colour), the
    largest over ``views`` (v, 3, h, w)."""
    def rgb(c):
        return torch.tensor(c, dtype=torch.float32).view(1, 3, 1, 1)

    b, s = rgb(background), rgb(shape)
    along = (((views - b) * (s - b)).sum(1, keepdim=True) / ((s - b) ** 2).sum()).clamp(0, 1)
    to_blend = (views - (b + along * (s - b))).norm(dim=1)
    mine = (views - rgb(color)).norm(dim=1) < to_blend
    best = 0
    for m in mine:
        rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
        if len(rows):
            best = max(best, int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1))
    return best


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("task")
    return out, json.loads(task.make_detail_dataset(out, 24, seed=3).read_text())


def test_detail_survives_in_tiles_and_vanishes_from_the_global_view(dataset):
    out, records = dataset
    slicer = AdaptiveSlicer(tile_size=task.TILE, max_tiles=task.MAX_TILES)
    seen = set()
    for rec in records[::2]:
        meta = rec["meta"]
        sliced = slicer(out / rec["image"])
        color = task.DETAIL_COLORS[meta["detail_color"]]
        bg = (task.BACKGROUNDS[meta["background"]], task.SHAPE_COLORS[meta["shape_color"]])
        plan, t = sliced.plan, task.TILE
        # the picture without the slicer's padding: the canvas of tiles, the global view's centre
        canvas = rearrange(_pixels(sliced.tiles, slicer), "(r k) c h w -> c (r h) (k w)",
                           r=plan.rows, k=plan.cols)
        (x, y), (w, h) = plan.offset, plan.resized_size
        in_tiles = _extent(canvas[None, :, y:y + h, x:x + w], color, *bg)
        gw, gh = (round(v * t / max(meta["size"])) for v in meta["size"])
        gx, gy = (t - gw) // 2, (t - gh) // 2
        view = _pixels(sliced.global_view, slicer)[None, :, gy + 1:gy + gh - 1, gx + 1:gx + gw - 1]
        in_global = _extent(view, color, *bg)
        seen.add(rec["size_bucket"])
        assert in_tiles >= task.TILE_DETAIL_PX - 2, (rec["id"], in_tiles)
        if rec["size_bucket"] == "<=336":
            assert in_global >= task.TILE_DETAIL_PX - 2, (rec["id"], in_global)
        else:
            assert in_global <= task.GLOBAL_DETAIL_MAX_PX, (rec["id"], meta["size"], in_global)
    assert seen == {"<=336", "<=1000", ">1000"}


def test_every_size_plans_a_grid_that_keeps_the_detail_three_times_larger():
    for bucket, _, sizes in task.SIZE_BUCKETS:
        for w, h in sizes:
            assert task.size_bucket(w, h) == bucket
            if bucket != "<=336":
                plan = plan_grid(w, h, tile_size=task.TILE, max_tiles=task.MAX_TILES)
                assert plan.resized_size[0] / w >= 2.9 * task.TILE / max(w, h), (w, h, plan.grid)


def test_records_are_labelled_and_reused(dataset, tmp_path):
    out, records = dataset
    assert len(records) == 48 and {r["kind"] for r in records} == {"detail", "global"}
    for rec in records:
        answer = rec["conversations"][1]["value"]
        words = set(rec["conversations"][0]["value"].split()[1:]) | {answer}
        assert words <= set(task.TASK_WORDS), words
        expected = (task.DETAIL_COLORS if rec["kind"] == "detail"
                    else {**task.BACKGROUNDS, **task.SHAPE_COLORS})
        assert answer in expected
    index = out / "data.json"
    before = index.stat().st_mtime_ns
    assert task.make_detail_dataset(out, 24, seed=3) == index
    assert index.stat().st_mtime_ns == before  # the same arguments reuse the files
    task.make_detail_dataset(tmp_path, 2, seed=3)
    first = json.loads((tmp_path / "data.json").read_text())
    task.make_detail_dataset(tmp_path, 2, seed=4)
    assert json.loads((tmp_path / "data.json").read_text()) != first  # new arguments: new images
    with pytest.raises(ValueError, match="num_images must be an int >= 1, got 0"):
        task.make_detail_dataset(tmp_path, 0, seed=0)
