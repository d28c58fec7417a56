"""Grid planning (paper / reference / pinpoints), token accounting, config, and planning without torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slime_adapters.slicing import (
    LLAVA_NEXT_PINPOINTS,
    SlicePlan,
    SlicingError,
    plan_grid,
    reference_candidates,
    visual_token_count,
)

REPO = Path(__file__).resolve().parents[1]
SIDES = st.integers(min_value=1, max_value=20000)


# ---- brute-force oracles ----------------------------------------------------------------------
def paper_oracle(w, h, t, max_grid, max_tiles):
    """Every grid, exact rationals; returns {key: grid} sorted best first."""
    scored = []
    for cols in range(1, max_grid + 1):
        for rows in range(1, max_grid + 1):
            if max_tiles is not None and cols * rows > max_tiles:
                continue
            s = min(Fraction(cols * t, w), Fraction(rows * t, h))
            used = min(w * h, math.floor(w * s) * math.floor(h * s))
            waste = cols * rows * t * t - used
            scored.append(((-used, waste, cols * rows, rows), (cols, rows), used, waste))
    scored.sort()
    return scored


def released_oracle(w, h, t):
    """A line-by-line transcription of the released ``select_best_resolution_uhd`` rule."""
    scale = math.ceil(w * h / (t * t))
    if scale > 6:
        scale = 6
    elif scale == 1:
        scale = 2

    def factorize(n):
        return [(i / (n / i), i, n // i) for i in range(1, n + 1) if n % i == 0]

    ratios = factorize(scale) + factorize(scale + 1)
    if scale > 2:
        ratios = factorize(scale - 1) + ratios
    best, max_eff, min_waste = None, 0, float("inf")
    for _, cols, rows in ratios:
        width, height = cols * t, rows * t
        sc = min(width / w, height / h)
        eff = min(int(w * sc) * int(h * sc), w * h)
        waste = width * height - eff
        if eff > max_eff or (eff == max_eff and waste < min_waste):
            best, max_eff, min_waste = (cols, rows), eff, waste
    return best, max_eff


def check_plan_invariants(plan: SlicePlan, w, h, t):
    cols, rows = plan.grid
    assert plan.image_size == (w, h)
    assert plan.num_tiles == cols * rows
    assert plan.canvas_size == (cols * t, rows * t)
    assert 0 <= plan.used <= w * h
    assert plan.waste == cols * rows * t * t - plan.used >= 0
    rw, rh = plan.resized_size
    assert 1 <= rw <= plan.canvas_size[0] and 1 <= rh <= plan.canvas_size[1]
    ox, oy = plan.offset
    assert (ox, oy) == ((plan.canvas_size[0] - rw) // 2, (plan.canvas_size[1] - rh) // 2)


# ---- paper policy -----------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    w=SIDES,
    h=SIDES,
    t=st.sampled_from([14, 224, 336, 448]),
    max_grid=st.integers(1, 8),
    max_tiles=st.none() | st.integers(1, 64),
)
def test_paper_plan_is_the_brute_force_optimum(w, h, t, max_grid, max_tiles):
    plan = plan_grid(w, h, tile_size=t, max_grid=max_grid, max_tiles=max_tiles)
    check_plan_invariants(plan, w, h, t)
    cols, rows = plan.grid
    assert cols <= max_grid and rows <= max_grid
    assert max_tiles is None or cols * rows <= max_tiles
    best_key, best_grid, used, waste = paper_oracle(w, h, t, max_grid, max_tiles)[0]
    assert plan.grid == best_grid, (plan, best_key)
    assert (plan.used, plan.waste) == (used, waste)
    assert plan == plan_grid(w, h, tile_size=t, max_grid=max_grid, max_tiles=max_tiles)


@settings(max_examples=100, deadline=None)
@given(w=SIDES, h=SIDES)
def test_paper_resized_size_is_floor_of_scaled_image(w, h):
    plan = plan_grid(w, h)
    cw, ch = plan.canvas_size
    s = min(Fraction(cw, w), Fraction(ch, h))
    assert plan.resized_size == (max(1, math.floor(w * s)), max(1, math.floor(h * s)))
    # the binding side fills the canvas exactly
    assert plan.resized_size[0] == cw or plan.resized_size[1] == ch


@pytest.mark.parametrize(
    "size, grid",
    [
        ((100, 100), (1, 1)),  # small images take one tile (the least waste), upscaled
        ((336, 336), (1, 1)),
        ((500, 400), (2, 2)),
        ((1000, 1000), (3, 3)),
        ((1920, 1080), (6, 4)),
        ((4000, 100), (6, 1)),
        ((3000, 3000), (6, 6)),
        ((672, 336), (2, 1)),  # width is cols
        ((336, 672), (1, 2)),  # height is rows
    ],
)
def test_paper_known_grids(size, grid):
    assert plan_grid(*size).grid == grid


def test_paper_prefers_less_waste_at_equal_use():
    # A square image under a 2-tile budget: a second tile adds only waste, so one tile wins.
    plan = plan_grid(1000, 1000, max_tiles=2)
    assert plan.grid == (1, 1)
    keys = paper_oracle(1000, 1000, 336, 6, 2)
    assert [k[1] for k in keys] == [(1, 1), (2, 1), (1, 2)]
    assert keys[0][2] == keys[1][2] == keys[2][2]  # equal use, decided by waste, then rows
    # a tiny image: every grid uses all W*H; the least waste (one tile) wins
    assert plan_grid(20, 30).grid == (1, 1)


# ---- reference policy -------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(w=SIDES, h=SIDES, t=st.sampled_from([224, 336]))
def test_reference_plan_matches_the_released_rule(w, h, t):
    plan = plan_grid(w, h, tile_size=t, policy="reference")
    check_plan_invariants(plan, w, h, t)
    grid, used = released_oracle(w, h, t)
    assert plan.grid == grid and plan.used == used
    assert plan.grid in reference_candidates(w, h, tile_size=t)
    assert plan.num_tiles >= 2
    assert plan == plan_grid(w, h, tile_size=t, policy="reference")


def test_reference_quirks():
    # fits one tile, still gets two
    small = plan_grid(300, 300, policy="reference")
    assert small.num_tiles == 2 and small.grid == (1, 2)
    # a 1:7 image gets a 1x7 grid (beyond max_grid=6), and 7:1 gets 7x1
    assert plan_grid(336, 2352, policy="reference").grid == (1, 7)
    assert plan_grid(2352, 336, policy="reference").grid == (7, 1)
    # candidate order: factorisations of 5, 6, 7, cols ascending
    assert reference_candidates(3000, 3000) == [
        (1, 5), (5, 1), (1, 6), (2, 3), (3, 2), (6, 1), (1, 7), (7, 1)
    ]
    assert reference_candidates(10, 10) == [(1, 2), (2, 1), (1, 3), (3, 1)]


def test_reference_resized_size_rounds_up_like_the_released_code():
    plan = plan_grid(500, 400, policy="reference")
    # canvas 672x336 (2x1): height binds, width = ceil(500 * 336/400) = 420
    assert plan.grid == (2, 1) and plan.resized_size == (420, 336) and plan.offset == (126, 0)
    # float order kept on purpose: ceil(300 * (336 / 300)) = 337, as the released code computes
    assert plan_grid(300, 300, policy="reference").resized_size == (336, 337)
    assert plan_grid(300, 300).resized_size == (336, 336)  # the paper rule is exact


# ---- pinpoints policy -------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(w=SIDES, h=SIDES)
def test_pinpoints_match_transformers_select_best_resolution(w, h):
    image_processing_utils = pytest.importorskip("transformers.image_processing_utils")
    plan = plan_grid(w, h, policy="pinpoints")
    check_plan_invariants(plan, w, h, 336)
    # transformers speaks (height, width)
    hw = image_processing_utils.select_best_resolution(
        (h, w), [[ph, pw] for pw, ph in LLAVA_NEXT_PINPOINTS]
    )
    assert plan.canvas_size == (hw[1], hw[0])
    scale_w, scale_h = hw[1] / w, hw[0] / h
    if scale_w < scale_h:
        expected = (hw[1], min(math.ceil(h * scale_w), hw[0]))
    else:
        expected = (min(math.ceil(w * scale_h), hw[1]), hw[0])
    assert plan.resized_size == expected


def test_pinpoints_first_in_list_wins_a_tie_and_custom_lists():
    # a square image: (336, 672) and (672, 336) tie; the first listed wins
    assert plan_grid(500, 500, policy="pinpoints", pinpoints=[(672, 336), (336, 672)]).grid == (2, 1)
    assert plan_grid(500, 500, policy="pinpoints", pinpoints=[(336, 672), (672, 336)]).grid == (1, 2)
    assert plan_grid(4000, 300, policy="pinpoints", pinpoints=[(1344, 336)]).grid == (4, 1)


# ---- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(width=0, height=10), "width must be >= 1, got 0"),
        (dict(width=10, height=-3), "height must be >= 1"),
        (dict(width=10.5, height=10), "width must be an int"),
        (dict(width=True, height=10), "width must be an int"),
        (dict(width=10, height=10, tile_size=0), "tile_size must be >= 1"),
        (dict(width=10, height=10, max_grid=0), "max_grid must be >= 1"),
        (dict(width=10, height=10, max_tiles=0), "max_tiles must be >= 1"),
        (dict(width=10, height=10, policy="llava"), "policy must be one of"),
        (dict(width=10, height=10, policy="reference", max_tiles=4), "max_tiles is not used"),
        (dict(width=10, height=10, pinpoints=[(336, 336)]), "only used with policy='pinpoints'"),
        (dict(width=10, height=10, policy="pinpoints", pinpoints=[]), "non-empty list"),
        (dict(width=10, height=10, policy="pinpoints", pinpoints=[(336, 500)]), r"pinpoints\[0\]"),
        (dict(width=10, height=10, policy="pinpoints", pinpoints=[(336,)]), "multiples of"),
        (dict(width=10, height=10, policy="pinpoints", pinpoints=[(336, 336), (2352, 336)]),
         r"pinpoints\[1\].*7x1 grid, over max_grid=6"),
    ],
)
def test_plan_grid_rejects_bad_arguments(kwargs, match):
    with pytest.raises(SlicingError, match=match):
        plan_grid(**kwargs)
    assert issubclass(SlicingError, ValueError)


# ---- tokens -----------------------------------------------------------------------------------
def test_token_accounting():
    plan = plan_grid(1000, 1000)  # 3x3
    assert plan.num_local_tokens(144) == 9 * 144
    assert visual_token_count(plan) == 576 + 1 + 9 * 144
    assert visual_token_count(plan, separator=0, num_queries=64) == 576 + 9 * 64
    assert visual_token_count(plan, keep_fraction=0.5) == 576 + 1 + 648
    # float noise does not add a token: 0.07 * 100 = 7.000000000000001 keeps 7, not 8
    one_tile = plan_grid(300, 300)
    assert visual_token_count(one_tile, num_queries=100, keep_fraction=0.07, views="local") == 7
    assert visual_token_count(plan, keep_fraction=1e-9, views="local") == 1  # the router keeps >= 1
    assert visual_token_count(plan, views="global") == 576
    assert visual_token_count(plan, num_queries=0, views="local") == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(keep_fraction=0.0), r"keep_fraction must be in \(0, 1\]"),
        (dict(keep_fraction=1.5), r"keep_fraction must be in \(0, 1\]"),
        (dict(keep_fraction="all"), "keep_fraction must be a number"),
        (dict(num_queries=-1), "num_queries must be >= 0"),
        (dict(separator=-1), "separator must be >= 0"),
        (dict(global_tokens=2.5), "global_tokens must be an int"),
        (dict(views="tiles"), "views must be"),
    ],
)
def test_token_count_rejects_bad_arguments(kwargs, match):
    with pytest.raises(SlicingError, match=match):
        visual_token_count(plan_grid(500, 400), **kwargs)


def test_token_count_errors_on_non_plan_and_negative_nq():
    with pytest.raises(SlicingError, match="plan must be a SlicePlan"):
        visual_token_count((2, 2))
    with pytest.raises(SlicingError, match="nq must be >= 0"):
        plan_grid(500, 400).num_local_tokens(-1)


def test_numpy_integers_are_accepted():
    np = pytest.importorskip("numpy")
    plan = plan_grid(np.int64(1920), np.int32(1080), max_tiles=np.int64(8))
    assert plan == plan_grid(1920, 1080, max_tiles=8) and type(plan.image_size[0]) is int


def test_plan_is_frozen_and_serialises():
    plan = plan_grid(1920, 1080)
    with pytest.raises(AttributeError):
        plan.grid = (1, 1)  # type: ignore[misc]
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["grid"] == [6, 4] and data["num_tiles"] == 24 and data["policy"] == "paper"


# ---- no torch needed --------------------------------------------------------------------------
def test_planning_works_with_torch_blocked():
    # The package __init__ imports torch (attention ops), so a bare package stub stands in for it;
    # the point is that slicing.py itself needs no torch until an image-side name is touched.
    code = f"""
import sys, types
sys.modules["torch"] = None
pkg = types.ModuleType("slime_adapters")
pkg.__path__ = [{str(REPO / "slime_adapters")!r}]
sys.modules["slime_adapters"] = pkg
from slime_adapters.slicing import plan_grid, visual_token_count, SlicePlan
plan = plan_grid(1920, 1080)
print(plan.grid, visual_token_count(plan))
try:
    from slime_adapters.slicing import AdaptiveSlicer
except ImportError as exc:
    print("lazy:", isinstance(exc, ImportError))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"(6, 4) {576 + 1 + 24 * 144}", "lazy: True"]
