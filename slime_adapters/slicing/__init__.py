"""Adaptive slicing (SliME §2.1): an image to a global view plus a grid of tiles.

==========================  ======================================================================
submodule                   what it holds
==========================  ======================================================================
``slicing.plan``            :func:`plan_grid`, :class:`SlicePlan`, :func:`visual_token_count`,
                            :data:`LLAVA_NEXT_PINPOINTS`, :class:`SlicingError` (pure Python)
``slicing.config``          :class:`SlicerConfig` (pure Python)
``slicing.imageio``         safe decoding of any image source to upright RGB (PIL, no torch)
``slicing.slicer``          :class:`AdaptiveSlicer` (torch)
``slicing.batch``           :class:`SlicedImage`, :class:`SlicedBatch`, :func:`collate` (torch)
==========================  ======================================================================

Every name above is importable from here. The planning names and the config load without torch;
the torch-side names load on first access, so ``from slime_adapters.slicing import plan_grid``
works where torch is not installed.
"""

from __future__ import annotations

import importlib
from typing import Any

from slime_adapters.slicing.config import CLIP_MEAN, CLIP_STD, SlicerConfig, SlicerConfigError
from slime_adapters.slicing.plan import (
    LLAVA_NEXT_PINPOINTS,
    POLICIES,
    SlicePlan,
    SlicingError,
    VIEWS,
    plan_grid,
    reference_candidates,
    visual_token_count,
)

# torch-side name -> submodule, loaded on first access (PEP 562)
_LAZY = {
    "AdaptiveSlicer": "slime_adapters.slicing.slicer",
    "SlicedBatch": "slime_adapters.slicing.batch",
    "SlicedImage": "slime_adapters.slicing.batch",
    "collate": "slime_adapters.slicing.batch",
}

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "LLAVA_NEXT_PINPOINTS",
    "POLICIES",
    "AdaptiveSlicer",
    "SlicePlan",
    "SlicedBatch",
    "SlicedImage",
    "SlicerConfig",
    "SlicerConfigError",
    "SlicingError",
    "VIEWS",
    "collate",
    "plan_grid",
    "reference_candidates",
    "visual_token_count",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
