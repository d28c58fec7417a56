"""The slicer's settings: :class:`SlicerConfig`, validated field by field on construction.

Pure Python (no torch), like :mod:`slime_adapters.slicing.plan`, so a data pipeline can build and
check a slicer's settings without loading PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from slime_adapters.config import (
    ConfigBase,
    ConfigError,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_numbers,
)
from slime_adapters.slicing.plan import POLICIES, SlicingError, plan_grid

__all__ = [
    "ALPHA_RULES",
    "CLIP_MEAN",
    "CLIP_STD",
    "GLOBAL_VIEWS",
    "SlicerConfig",
    "SlicerConfigError",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
GLOBAL_VIEWS = ("pad", "resize")
ALPHA_RULES = ("composite", "drop")


class SlicerConfigError(ConfigError, SlicingError):
    """A slicer setting is invalid: both a :class:`~slime_adapters.config.ConfigError` and a
    :class:`~slime_adapters.slicing.SlicingError`."""


@dataclass(frozen=True)
class SlicerConfig(ConfigBase):
    """:class:`AdaptiveSlicer`'s constructor keywords. Validated on construction.

    ``fill=None`` means the mean colour ``int(255·mean)`` (the released code's ``expand2square``
    colour). ``alpha``: ``"composite"`` transparent pixels onto ``fill``, or ``"drop"`` the alpha
    channel (the released code loads images with ``convert("RGB")``). ``max_pixels`` guards against decompression bombs (checked on the header);
    ``min_side`` and ``max_aspect_ratio`` reject 1-pixel lines and slivers (default 1:100: a
    1:100 strip on a 6-tile row is still 20 px high; 1:1000 would be a fraction of a pixel).
    ``parallel_resize``: the canvas and the global-view resizes of one image run on two threads
    (PIL releases the GIL; same pixels either way); turn it off inside DataLoader workers that
    already fill the cores.
    """

    kind: ClassVar[str] = "adaptive_slicer"
    tile_size: int = 336
    max_grid: int = 6
    max_tiles: int | None = None
    policy: str = "paper"
    pinpoints: tuple[tuple[int, int], ...] | None = None
    global_view: str = "pad"
    fill: tuple[int, int, int] | None = None
    alpha: str = "composite"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    max_pixels: int = 100_000_000
    min_side: int = 2
    max_aspect_ratio: float = 100.0
    parallel_resize: bool = True

    def __post_init__(self) -> None:
        owner, err = "SlicerConfig", SlicerConfigError
        for name in ("pinpoints", "fill", "mean", "std"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if self.pinpoints is not None and isinstance(self.pinpoints, tuple):
            object.__setattr__(self, "pinpoints", tuple(
                tuple(p) if isinstance(p, list | tuple) else p for p in self.pinpoints))
        check_int(owner, "tile_size", self.tile_size, minimum=1, error=err)
        check_int(owner, "max_grid", self.max_grid, minimum=1, error=err)
        check_int(owner, "max_tiles", self.max_tiles, minimum=1, allow_none=True, error=err)
        check_choice(owner, "policy", self.policy, POLICIES, error=err)
        check_choice(owner, "global_view", self.global_view, GLOBAL_VIEWS, error=err)
        check_choice(owner, "alpha", self.alpha, ALPHA_RULES, error=err)
        # A throw-away plan validates the combination of tile_size, max_grid, max_tiles, pinpoints.
        try:
            plan_grid(self.tile_size, self.tile_size, tile_size=self.tile_size,
                      max_grid=self.max_grid, max_tiles=self.max_tiles, policy=self.policy,
                      pinpoints=self.pinpoints)
        except SlicingError as exc:
            raise err(f"{owner}: {exc}") from exc
        if self.fill is not None and not (
            isinstance(self.fill, tuple) and len(self.fill) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                    for v in self.fill)
        ):
            raise err(f"{owner}: fill must be three ints in 0..255 (or None), got {self.fill!r}")
        check_numbers(owner, "mean", self.mean, 3, error=err)
        check_numbers(owner, "std", self.std, 3, above=0, error=err)
        check_int(owner, "max_pixels", self.max_pixels, minimum=1, error=err)
        check_int(owner, "min_side", self.min_side, minimum=1, error=err)
        check_number(owner, "max_aspect_ratio", self.max_aspect_ratio, minimum=1, error=err)
        check_bool(owner, "parallel_resize", self.parallel_resize, error=err)

    @property
    def fill_color(self) -> tuple[int, int, int]:
        """The padding colour as RGB ints."""
        if self.fill is not None:
            return self.fill  # type: ignore[return-value]
        return tuple(int(255 * m) for m in self.mean)  # type: ignore[return-value]
