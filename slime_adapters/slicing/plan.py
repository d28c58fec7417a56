"""Grid planning: choose a grid of tiles for an image, and the visual tokens it will cost.

This module is pure Python (no torch import) so that data pipelines and token budgeting can plan
grids without loading PyTorch. The image side is :mod:`slime_adapters.slicing.slicer`.

Conventions, everywhere in this module: **width is cols, height is rows**. Sizes are
``(width, height)``, grids are ``(cols, rows)``, offsets are ``(x, y)``, and tiles are numbered in
row-major raster order (left to right, then top to bottom). transformers' ``select_best_resolution``
takes and returns ``(height, width)``; ours never does.

Shape legend (einops), used by the image side::

    b images, p tiles of one image, P = Σp tiles of a batch, c = 3 channels, t tile side (T)
    global_view (c, t, t)   tiles (p, c, t, t)   batch tiles (P, c, t, t)

Policies of :func:`plan_grid` (``T`` the tile side, ``W×H`` the image):

``"paper"`` (SliME §2.1, default)
    Every grid ``cols×rows`` with ``1 ≤ cols, rows ≤ max_grid`` and, if ``max_tiles`` is set,
    ``cols·rows ≤ max_tiles``. Scale ``s = min(cols·T/W, rows·T/H)``;
    ``used = min(W·H, ⌊W·s⌋·⌊H·s⌋)``; ``waste = cols·rows·T² − used``. The largest ``used`` wins;
    among equals the smallest ``waste``, then the fewest tiles, then the fewest rows (at equal
    ``used`` the waste already orders by tile count; the last key only makes the order total).
    Computed in exact integer arithmetic. The image is resized to ``(⌊W·s⌋, ⌊H·s⌋)`` (at least 1 px a side).
``"reference"`` (the released SliME code, ``select_best_resolution_uhd``)
    Tile count ``s = clamp(⌈W·H/T²⌉, 2, 6)``; candidates are the factorisations ``(cols, rows)``
    (cols ascending) of ``s`` and ``s+1`` when ``s = 2``, else of ``s−1``, ``s`` and ``s+1``; the first
    strictly better candidate (more used, then less waste) wins, with the released code's float
    arithmetic. So an image that fits one tile still gets 2, and 1×7 / 7×1 grids happen (``max_grid``
    does not apply; ``max_tiles`` must be ``None``). Resized size as the released
    ``resize_and_pad_image``: the binding side fills the canvas, the other is ``⌈·⌉``-rounded.
``"pinpoints"`` (LLaVA-NeXT's ``image_grid_pinpoints``)
    A fixed list of canvas sizes ``(width, height)``, multiples of ``T``; picks as LLaVA-NeXT does
    (most used, then least waste, first in the list on a tie), resized as LLaVA-NeXT does.

Degenerate slivers (e.g. 1×20000 px), for which every candidate's ``used`` rounds to 0, get the
least-waste candidate under every policy (as the released code does); :class:`AdaptiveSlicer`
rejects such images (``min_side``, ``max_aspect_ratio``) before planning.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LLAVA_NEXT_PINPOINTS",
    "POLICIES",
    "SlicePlan",
    "SlicingError",
    "VIEWS",
    "plan_grid",
    "reference_candidates",
    "visual_token_count",
]

POLICIES = ("paper", "reference", "pinpoints")
#: The views of an image an adapter can feed the LLM: the global view, the local tiles, or both
#: (defined once here; the adapter and the training stages use the same names).
VIEWS = ("global", "local", "both")

#: LLaVA-NeXT's default ``image_grid_pinpoints`` as (width, height) canvas sizes.
LLAVA_NEXT_PINPOINTS: tuple[tuple[int, int], ...] = (
    (336, 672),
    (672, 336),
    (672, 672),
    (1008, 336),
    (336, 1008),
)

class SlicingError(ValueError):
    """An image or a slicing option cannot be used; the message names the input and the problem."""


@dataclass(frozen=True)
class SlicePlan:
    """Where an image of ``image_size`` goes on a ``grid`` of tiles. Immutable.

    Attributes:
        image_size: ``(width, height)`` of the input image (after EXIF orientation).
        grid: ``(cols, rows)``.
        tile_size: tile side ``T`` in pixels.
        canvas_size: ``(cols·T, rows·T)`` as ``(width, height)``.
        resized_size: ``(width, height)`` the image is resized to before padding.
        offset: ``(x, y)`` of the resized image's top-left corner on the canvas (centred).
        used: utilised resolution of the policy's rule (pixels).
        waste: ``cols·rows·T² − used`` (pixels).
        policy: the policy that chose the grid.
    """

    image_size: tuple[int, int]
    grid: tuple[int, int]
    tile_size: int
    canvas_size: tuple[int, int]
    resized_size: tuple[int, int]
    offset: tuple[int, int]
    used: int
    waste: int
    policy: str

    @property
    def cols(self) -> int:
        return self.grid[0]

    @property
    def rows(self) -> int:
        return self.grid[1]

    @property
    def num_tiles(self) -> int:
        """Number of local tiles, ``cols·rows``."""
        return self.grid[0] * self.grid[1]

    def num_local_tokens(self, nq: int) -> int:
        """Local tokens after query compression: ``num_tiles · nq``. Raises on ``nq < 0``."""
        return self.num_tiles * _check_int("nq", nq, minimum=0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (lists for the pairs)."""
        return {
            "image_size": list(self.image_size),
            "grid": list(self.grid),
            "tile_size": self.tile_size,
            "canvas_size": list(self.canvas_size),
            "resized_size": list(self.resized_size),
            "offset": list(self.offset),
            "used": self.used,
            "waste": self.waste,
            "policy": self.policy,
            "num_tiles": self.num_tiles,
        }


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    """``value`` as a Python int (numpy integers welcome); raises for bools, floats, small values."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SlicingError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise SlicingError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _paper_fit(width: int, height: int, cw: int, ch: int) -> tuple[int, int, int]:
    """Exact ``(new_w, new_h, used)`` of the paper's rule for a ``cw×ch`` canvas."""
    # s = min(cw/W, ch/H); compare cw·H with ch·W so that no float enters.
    if cw * height <= ch * width:
        new_w, new_h = cw, (height * cw) // width
    else:
        new_w, new_h = (width * ch) // height, ch
    return new_w, new_h, min(width * height, new_w * new_h)


def _llava_fit(width: int, height: int, cw: int, ch: int) -> tuple[int, int, int]:
    """``(new_w, new_h, used)`` with the released / LLaVA-NeXT float arithmetic, on purpose."""
    scale = min(cw / width, ch / height)
    used = min(int(width * scale) * int(height * scale), width * height)
    scale_w, scale_h = cw / width, ch / height
    if scale_w < scale_h:
        new_w, new_h = cw, min(math.ceil(height * scale_w), ch)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), cw), ch
    return new_w, new_h, used


def reference_candidates(width: int, height: int, *, tile_size: int = 336) -> list[tuple[int, int]]:
    """The released code's candidate grids ``(cols, rows)`` for a ``width×height`` image, in order."""
    count = math.ceil(width * height / (tile_size * tile_size))
    count = min(max(count, 2), 6)
    sizes = (count, count + 1) if count == 2 else (count - 1, count, count + 1)
    return [(c, n // c) for n in sizes for c in range(1, n + 1) if n % c == 0]


def _first_strictly_better(
    width: int, height: int, canvases: Iterable[tuple[int, int]]
) -> tuple[tuple[int, int], int, int, int]:
    """LLaVA-NeXT's scan: keep a candidate only if it is strictly better than the best so far."""
    # Starting from "no best" equals the released code's (0 used, infinite waste) start.
    best = None
    for cw, ch in canvases:
        new_w, new_h, used = _llava_fit(width, height, cw, ch)
        waste = cw * ch - used
        if best is None or used > best[3] or (used == best[3] and waste < best[4]):
            best = ((cw, ch), new_w, new_h, used, waste)
    assert best is not None
    return best[0], best[1], best[2], best[3]


def plan_grid(
    width: int,
    height: int,
    *,
    tile_size: int = 336,
    max_grid: int = 6,
    max_tiles: int | None = None,
    policy: str = "paper",
    pinpoints: Sequence[tuple[int, int]] | None = None,
) -> SlicePlan:
    """Choose the tile grid for a ``width×height`` image.

    Args:
        width, height: image size in pixels (ints ≥ 1; width is cols, height is rows).
        tile_size: tile side ``T``.
        max_grid: largest number of cols and of rows (``"paper"``; checked for ``"pinpoints"``).
        max_tiles: optional budget on ``cols·rows`` (``"paper"``; checked for ``"pinpoints"``).
        policy: ``"paper"``, ``"reference"`` or ``"pinpoints"`` (see the module docstring).
        pinpoints: canvas sizes ``(width, height)`` for ``policy="pinpoints"``, multiples of
            ``tile_size``; ``None`` means :data:`LLAVA_NEXT_PINPOINTS`.

    Returns:
        The :class:`SlicePlan`. Deterministic: the same arguments give the same plan.

    Raises:
        SlicingError: a size or an option is not a positive int, an unknown policy, ``max_tiles``
            with ``policy="reference"``, ``pinpoints`` with another policy, or a pinpoint that is
            not a positive multiple of ``tile_size`` or exceeds ``max_grid``/``max_tiles``.
    """
    width = _check_int("width", width, minimum=1)
    height = _check_int("height", height, minimum=1)
    tile_size = _check_int("tile_size", tile_size, minimum=1)
    max_grid = _check_int("max_grid", max_grid, minimum=1)
    if max_tiles is not None:
        max_tiles = _check_int("max_tiles", max_tiles, minimum=1)
    if policy not in POLICIES:
        raise SlicingError(f"policy must be one of {POLICIES}, got {policy!r}")
    if pinpoints is not None and policy != "pinpoints":
        raise SlicingError(f"pinpoints is only used with policy='pinpoints', got policy={policy!r}")
    t = tile_size

    if policy == "paper":
        best_key = None
        best = None
        for rows in range(1, max_grid + 1):
            for cols in range(1, max_grid + 1):
                if max_tiles is not None and cols * rows > max_tiles:
                    continue
                new_w, new_h, used = _paper_fit(width, height, cols * t, rows * t)
                waste = cols * rows * t * t - used
                key = (-used, waste, cols * rows, rows)
                if best_key is None or key < best_key:
                    best_key, best = key, ((cols * t, rows * t), new_w, new_h, used)
        assert best is not None
        canvas, new_w, new_h, used = best
    elif policy == "reference":
        if max_tiles is not None:
            raise SlicingError(
                "max_tiles is not used by policy='reference' (the released rule has its own "
                f"tile count); got max_tiles={max_tiles}"
            )
        grids = reference_candidates(width, height, tile_size=t)
        canvas, new_w, new_h, used = _first_strictly_better(
            width, height, [(c * t, r * t) for c, r in grids]
        )
    else:
        canvases = _check_pinpoints(
            LLAVA_NEXT_PINPOINTS if pinpoints is None else pinpoints, t, max_grid, max_tiles
        )
        canvas, new_w, new_h, used = _first_strictly_better(width, height, canvases)

    cw, ch = canvas
    new_w, new_h = max(1, new_w), max(1, new_h)
    return SlicePlan(
        image_size=(width, height),
        grid=(cw // t, ch // t),
        tile_size=t,
        canvas_size=(cw, ch),
        resized_size=(new_w, new_h),
        offset=((cw - new_w) // 2, (ch - new_h) // 2),
        used=used,
        waste=cw * ch - used,
        policy=policy,
    )


def _check_pinpoints(
    pinpoints: Sequence[tuple[int, int]], t: int, max_grid: int, max_tiles: int | None
) -> list[tuple[int, int]]:
    if isinstance(pinpoints, str | bytes) or len(pinpoints) == 0:
        raise SlicingError(f"pinpoints must be a non-empty list of (width, height), got {pinpoints!r}")
    out = []
    for i, point in enumerate(pinpoints):
        ok = (
            isinstance(point, Sequence)
            and len(point) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in point)
        )
        cw, ch = point if ok else (0, 0)
        if cw < t or ch < t or cw % t or ch % t:
            raise SlicingError(
                f"pinpoints[{i}] must be a (width, height) pair of positive multiples of "
                f"tile_size={t}, got {point!r}"
            )
        cols, rows = cw // t, ch // t
        if cols > max_grid or rows > max_grid or (max_tiles is not None and cols * rows > max_tiles):
            raise SlicingError(
                f"pinpoints[{i}]={point!r} is a {cols}x{rows} grid, over max_grid={max_grid} "
                f"/ max_tiles={max_tiles}"
            )
        out.append((cw, ch))
    return out


def visual_token_count(
    plan: SlicePlan,
    *,
    global_tokens: int = 576,
    num_queries: int = 144,
    separator: int = 1,
    keep_fraction: float = 1.0,
    views: str = "both",
) -> int:
    """Visual tokens an image costs the LLM, known from its plan before any model runs.

    ``global_tokens`` (the global view's projected tokens) + ``separator`` (tokens between the
    global and the local part; 0 for none) + the kept local tokens ``⌈keep_fraction ·
    num_tiles · num_queries⌉`` (at least 1 when there are local tokens, as the router keeps at
    least one). With ``keep_fraction=1.0`` (router γ=1, or no router) the count is exact; a smaller
    fraction gives the budget for a router capped at that fraction (``max_keep``). ``views``:
    ``"both"`` (default), ``"global"`` (global tokens only) or ``"local"`` (local tokens only).

    Returns:
        The token count (int).

    Raises:
        SlicingError: a negative count, ``keep_fraction`` outside ``(0, 1]`` or an unknown view.
    """
    if not isinstance(plan, SlicePlan):
        raise SlicingError(f"plan must be a SlicePlan, got {type(plan).__name__}")
    global_tokens = _check_int("global_tokens", global_tokens, minimum=0)
    num_queries = _check_int("num_queries", num_queries, minimum=0)
    separator = _check_int("separator", separator, minimum=0)
    if isinstance(keep_fraction, bool) or not isinstance(keep_fraction, int | float):
        raise SlicingError(f"keep_fraction must be a number in (0, 1], got {keep_fraction!r}")
    if not 0.0 < keep_fraction <= 1.0:
        raise SlicingError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    if views not in VIEWS:
        raise SlicingError(f"views must be one of {VIEWS}, got {views!r}")
    local = plan.num_local_tokens(num_queries)
    # The tolerance keeps float noise (0.1 * 1440 = 144.00000000000003) from adding a token.
    kept = max(1, math.ceil(keep_fraction * local - 1e-9)) if local else 0
    if views == "global":
        return global_tokens
    if views == "local":
        return kept
    return global_tokens + separator + kept
