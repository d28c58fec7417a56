"""Outputs of the slicer: one sliced image, and a packed batch of them (no padding slots).

Public through :mod:`slime_adapters.slicing`.

Shape legend (einops)::

    b images, p tiles of one image, P = Σp tiles of a batch, c = 3 channels, t tile side
    SlicedImage: global_view (c, t, t), tiles (p, c, t, t)
    SlicedBatch: global_views (b, c, t, t), tiles (P, c, t, t), tiles_per_image (b,)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from slime_adapters.slicing.plan import SlicePlan, SlicingError

__all__ = ["SlicedBatch", "SlicedImage", "collate"]


@dataclass
class SlicedImage:
    """One sliced image: ``global_view (c, t, t)``, ``tiles (p, c, t, t)`` row-major, its plan."""

    global_view: torch.Tensor
    tiles: torch.Tensor
    plan: SlicePlan

    @property
    def num_tiles(self) -> int:
        return self.plan.num_tiles

    def to(self, *args: Any, **kwargs: Any) -> SlicedImage:
        """Tensor ``.to`` on both tensors; returns a new :class:`SlicedImage`."""
        return SlicedImage(self.global_view.to(*args, **kwargs), self.tiles.to(*args, **kwargs), self.plan)


@dataclass
class SlicedBatch:
    """A batch: ``global_views (b, c, t, t)``, packed ``tiles (P, c, t, t)`` (no padding slots),
    ``tiles_per_image (b,)`` long, and the ``plans``. Image i's tiles are
    ``tiles[offsets[i]:offsets[i + 1]]`` with ``offsets = [0, *cumsum(tiles_per_image)]``."""

    global_views: torch.Tensor
    tiles: torch.Tensor
    tiles_per_image: torch.Tensor
    plans: tuple[SlicePlan, ...]

    @property
    def grids(self) -> torch.Tensor:
        """``(b, 2)`` long tensor of ``(cols, rows)`` per image."""
        return torch.tensor([p.grid for p in self.plans], dtype=torch.long)

    def to(self, *args: Any, **kwargs: Any) -> SlicedBatch:
        """Tensor ``.to`` on the pixel tensors (``tiles_per_image`` moves device, keeps dtype)."""
        views = self.global_views.to(*args, **kwargs)
        return SlicedBatch(
            views, self.tiles.to(*args, **kwargs), self.tiles_per_image.to(views.device), self.plans
        )


def collate(items: Sequence[SlicedImage]) -> SlicedBatch:
    """Pack sliced images into one :class:`SlicedBatch`: tiles concatenated, never padded.

    Raises:
        SlicingError: an empty list, a non-:class:`SlicedImage` item, or items whose tile size,
            dtype or device differ.
    """
    if len(items) == 0:
        raise SlicingError("collate: items must be a non-empty list of SlicedImage")
    for i, item in enumerate(items):
        if not isinstance(item, SlicedImage):
            raise SlicingError(f"collate: items[{i}] is a {type(item).__name__}, not a SlicedImage")
    first = items[0].global_view
    for i, item in enumerate(items):
        view = item.global_view
        if view.shape != first.shape or view.dtype != first.dtype or view.device != first.device:
            raise SlicingError(
                f"collate: items[{i}] has global view {tuple(view.shape)} {view.dtype} on "
                f"{view.device}, items[0] has {tuple(first.shape)} {first.dtype} on {first.device}"
            )
    return SlicedBatch(
        global_views=torch.stack([item.global_view for item in items]),
        tiles=torch.cat([item.tiles for item in items]),
        tiles_per_image=torch.tensor([item.tiles.shape[0] for item in items], dtype=torch.long, device=first.device),
        plans=tuple(item.plan for item in items),
    )
