"""AdaptiveSlicer: an image of any size to a global view plus a packed batch of tiles (SPEC §2.1).

Public through :mod:`slime_adapters.slicing` (``from slime_adapters.slicing import AdaptiveSlicer``);
its settings are :class:`~slime_adapters.slicing.config.SlicerConfig`.

Shape legend (einops)::

    b images, P = Σp tiles of a batch, c = 3 channels, t tile side, r rows, k cols
    global_view (c, t, t)   tiles (p, c, t, t)   canvas (r·t, k·t, c) uint8
    SlicedBatch: global_views (b, c, t, t), tiles (P, c, t, t), tiles_per_image (b,)

Pipeline for one image (PIL path): decode with the header checked first, EXIF orientation, any mode
to RGB (alpha composited on the fill colour), the plan from :func:`~slime_adapters.slicing.plan_grid`,
one antialiased bicubic resize (PIL) to ``plan.resized_size``, centred on a ``fill``-coloured canvas,
cut into row-major tiles, normalised ``(x/255 − mean)/std``. Global view: ``"pad"`` (paper) resizes
the image so its longer side is ``t`` and centres it on a ``t×t`` fill square — the same picture as
padding to a square first and then resizing, without building a square of the long side (16 Mpx
for a 4000×100 strip); ``"resize"`` (released code) stretches the image to ``t×t``.

Tensor path: a uint8 tensor ``(c, h, w)`` (or :meth:`AdaptiveSlicer.slice_tensor_batch` on a
``(b, c, h, w)`` batch of same-sized images) is resized with ``F.interpolate(mode="bicubic",
antialias=True)`` on the tensor's device, with no Python loop over images or tiles. Its pixels
match the PIL path within a few uint8 levels (two resampling implementations), not bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from slime_adapters.config import ConfigBase, ConfigurableMixin
from slime_adapters.slicing.batch import SlicedBatch, SlicedImage, collate
from slime_adapters.slicing.config import CLIP_MEAN, CLIP_STD, SlicerConfig
from slime_adapters.slicing.imageio import check_size, load_rgb, open_image, oriented_size
from slime_adapters.slicing.plan import SlicePlan, SlicingError, plan_grid, visual_token_count

__all__ = ["AdaptiveSlicer"]



def _fit_inside(width: int, height: int, side: int) -> tuple[int, int]:
    """Size of ``width×height`` scaled so its longer side is ``side`` (rounded, ≥ 1)."""
    longer = max(width, height)
    return max(1, (width * side + longer // 2) // longer), max(1, (height * side + longer // 2) // longer)


class AdaptiveSlicer(ConfigurableMixin):
    """Cut an image into a global view and a grid of ``tile_size`` tiles (SPEC §2.1).

    Keyword arguments are :class:`SlicerConfig`'s fields, plus ``device`` (where outputs go;
    default: CPU for PIL/path/bytes input, the tensor's device for tensor input) and ``dtype``
    (floating output dtype, default float32; normalisation is computed in float32, or float64
    for float64 output). ``AdaptiveSlicer.reference()`` gives the released code's behaviour.

    Calling the slicer on one image returns a :class:`SlicedImage`; :meth:`slice_many` returns a
    :class:`SlicedBatch`. Every bad input raises :class:`~slime_adapters.slicing.SlicingError`
    (a ``ValueError``) naming the input and the problem.
    """

    config_class: ClassVar[type[ConfigBase]] = SlicerConfig

    def __init__(
        self,
        *,
        tile_size: int = 336,
        max_grid: int = 6,
        max_tiles: int | None = None,
        policy: str = "paper",
        pinpoints: Sequence[tuple[int, int]] | None = None,
        global_view: str = "pad",
        fill: tuple[int, int, int] | None = None,
        alpha: str = "composite",
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        max_pixels: int = 100_000_000,
        min_side: int = 2,
        max_aspect_ratio: float = 100.0,
        parallel_resize: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.config = SlicerConfig(
            tile_size=tile_size,
            max_grid=max_grid,
            max_tiles=max_tiles,
            policy=policy,
            pinpoints=None if pinpoints is None else tuple(tuple(p) for p in pinpoints),
            global_view=global_view,
            fill=fill,
            alpha=alpha,
            mean=mean,
            std=std,
            max_pixels=max_pixels,
            min_side=min_side,
            max_aspect_ratio=max_aspect_ratio,
            parallel_resize=parallel_resize,
        )
        dtype = torch.float32 if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise SlicingError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self.fill = self.config.fill_color
        self._fill_u8 = np.asarray(self.fill, dtype=np.uint8)
        self._executor: ThreadPoolExecutor | None = None
        math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        std64 = np.asarray(self.config.std, dtype=np.float64)
        # (x/255 − mean)/std as one multiply-add on the uint8 values.
        self._scale = torch.tensor(1.0 / (255.0 * std64), dtype=math_dtype).view(3, 1, 1)
        self._bias = torch.tensor(-np.asarray(self.config.mean) / std64, dtype=math_dtype).view(3, 1, 1)

    @classmethod
    def reference(cls, **overrides: Any) -> AdaptiveSlicer:
        """The released SliME code's slicing: ``policy="reference"``, stretched global view,
        black canvas padding, alpha dropped. ``overrides`` change any other keyword."""
        kwargs = {"policy": "reference", "global_view": "resize", "fill": (0, 0, 0), "alpha": "drop"}
        kwargs.update(overrides)
        return cls(**kwargs)

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
        return f"AdaptiveSlicer({fields}, dtype={self.dtype})"

    # ---- planning ----------------------------------------------------------------------------
    def plan(self, width: int, height: int) -> SlicePlan:
        """The plan for a ``width×height`` image under this slicer's policy (no image checks)."""
        c = self.config
        return plan_grid(
            width,
            height,
            tile_size=c.tile_size,
            max_grid=c.max_grid,
            max_tiles=c.max_tiles,
            policy=c.policy,
            pinpoints=c.pinpoints,
        )

    def plan_image(self, source: Any) -> SlicePlan:
        """The plan for an image source, from its header only (no pixel decoding).

        Raises:
            SlicingError: as :meth:`__call__` would for the source's size, type or format.
        """
        if isinstance(source, torch.Tensor):
            _, height, width = self._check_tensor(source, batched=False).shape
        else:
            image, name = open_image(source)
            try:
                self._check_size(name, *image.size)
                width, height = oriented_size(image)
            finally:
                if image is not source:
                    image.close()
        return self.plan(width, height)

    def num_visual_tokens(self, source: Any, **kwargs: Any) -> int:
        """:func:`~slime_adapters.slicing.visual_token_count` of :meth:`plan_image`'s plan."""
        return visual_token_count(self.plan_image(source), **kwargs)

    def _check_size(self, name: str, width: int, height: int) -> None:
        c = self.config
        check_size(
            name,
            width,
            height,
            max_pixels=c.max_pixels,
            min_side=c.min_side,
            max_aspect_ratio=c.max_aspect_ratio,
        )

    # ---- PIL path ----------------------------------------------------------------------------
    def __call__(self, image: Any) -> SlicedImage:
        """Slice one image: a PIL image, a path, bytes, or a uint8 tensor ``(c, h, w)``.

        Returns:
            :class:`SlicedImage` with ``global_view (3, t, t)`` and ``tiles (p, 3, t, t)``.

        Raises:
            SlicingError: unsupported type, missing file, non-image or truncated bytes, zero-size,
                under ``min_side``, over ``max_aspect_ratio`` or ``max_pixels``, a non-uint8 tensor.
        """
        if isinstance(image, torch.Tensor):
            batch = self.slice_tensor_batch(self._check_tensor(image, batched=False).unsqueeze(0))
            return SlicedImage(batch.global_views[0], batch.tiles, batch.plans[0])
        c = self.config
        rgb, _ = load_rgb(
            image,
            fill=self.fill,
            alpha=c.alpha,
            max_pixels=c.max_pixels,
            min_side=c.min_side,
            max_aspect_ratio=c.max_aspect_ratio,
        )
        plan = self.plan(*rgb.size)
        t = c.tile_size
        if c.global_view == "resize":
            view_size, view_offset = (t, t), (0, 0)
        else:
            view_size = _fit_inside(rgb.width, rgb.height, t)
            view_offset = ((t - view_size[0]) // 2, (t - view_size[1]) // 2)
        # The two resizes dominate the cost and PIL releases the GIL while resizing, so they run
        # side by side (same pixels either way).
        if c.parallel_resize:
            pool = self._pool()
            job = pool.submit(rgb.resize, view_size, Image.Resampling.BICUBIC)
            resized = rgb.resize(plan.resized_size, Image.Resampling.BICUBIC)
            small = job.result()
        else:
            resized = rgb.resize(plan.resized_size, Image.Resampling.BICUBIC)
            small = rgb.resize(view_size, Image.Resampling.BICUBIC)
        canvas = _on_canvas(resized, plan.canvas_size, plan.offset, self._fill_u8)
        view = _on_canvas(small, (t, t), view_offset, self._fill_u8)
        # One pass per view: uint8 read, (x·scale + bias) written, no intermediate float copy.
        out = torch.empty((1 + plan.num_tiles, 3, t, t), dtype=self._scale.dtype)
        view_t = rearrange(torch.from_numpy(view), "h w c -> c h w")
        tiles_t = rearrange(torch.from_numpy(canvas), "(r h) (k w) c -> (r k) c h w", h=t, w=t)
        torch.addcmul(self._bias, view_t, self._scale, out=out[0])
        torch.addcmul(self._bias, tiles_t, self._scale, out=out[1:])
        if self.device is not None or out.dtype != self.dtype:
            out = out.to(device=self.device, dtype=self.dtype)
        return SlicedImage(out[0], out[1:], plan)

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slicer")
        return self._executor

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers pickle the slicer; a thread pool cannot travel, each copy makes its own.
        state = dict(self.__dict__)
        state["_executor"] = None
        return state

    def slice_many(self, images: Sequence[Any]) -> SlicedBatch:
        """Slice each image and :func:`collate` the results."""
        return collate([self(image) for image in images])

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixel values 0..255 ``(n, c, t, t)`` (float, modified in place) to normalised ``dtype``
        on the output device."""
        device = self.device if self.device is not None else pixels.device
        pixels = pixels.to(device, non_blocking=True)
        out = pixels.mul_(self._scale.to(device)).add_(self._bias.to(device))
        return out if out.dtype == self.dtype else out.to(self.dtype)

    # ---- tensor path -------------------------------------------------------------------------
    def _check_tensor(self, x: torch.Tensor, *, batched: bool) -> torch.Tensor:
        rank = 4 if batched else 3
        layout = "(b, c, h, w)" if batched else "(c, h, w)"
        name = f"<tensor {tuple(x.shape)} {x.dtype}>"
        if x.dtype != torch.uint8:
            raise SlicingError(f"image {name}: tensor input must be uint8 {layout}, got dtype {x.dtype}")
        if x.dim() != rank or x.shape[-3] not in (1, 3, 4):
            raise SlicingError(f"image {name}: tensor input must be {layout} with c in (1, 3, 4)")
        if batched and x.shape[0] == 0:
            raise SlicingError(f"image {name}: empty batch")
        self._check_size(name, int(x.shape[-1]), int(x.shape[-2]))
        return x

    def slice_tensor_batch(self, images: torch.Tensor) -> SlicedBatch:
        """Slice a batch of same-sized uint8 images ``(b, c, h, w)`` on their device, vectorised.

        ``c`` is 1 (grey), 3 (RGB) or 4 (RGBA: composited on the fill colour, or its alpha dropped,
        as ``alpha`` says). All images share one plan. Returns a :class:`SlicedBatch` with ``tiles (b·p, c, t, t)`` grouped by image.

        Raises:
            SlicingError: not uint8, wrong rank or channel count, an empty batch, or a size the
                slicer rejects.
        """
        self._check_tensor(images, batched=True)
        b, c, h, w = images.shape
        plan = self.plan(w, h)
        t = self.config.tile_size
        device = self.device if self.device is not None else images.device
        x = images.to(device).float()
        fill = torch.tensor(self.fill, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        if c == 1:
            x = x.expand(b, 3, h, w)
        elif c == 4 and self.config.alpha == "drop":
            x = x[:, :3]
        elif c == 4:
            alpha = x[:, 3:] / 255.0
            x = x[:, :3] * alpha + fill * (1.0 - alpha)
            # PIL composites into uint8; round here too so both paths see the same input.
            x = x.round()
        canvas = fill.expand(b, 3, plan.canvas_size[1], plan.canvas_size[0]).clone()
        rw, rh = plan.resized_size
        ox, oy = plan.offset
        canvas[:, :, oy : oy + rh, ox : ox + rw] = _resize(x, rh, rw)
        tiles = rearrange(canvas, "b c (r h) (k w) -> (b r k) c h w", h=t, w=t)
        if self.config.global_view == "resize":
            views = _resize(x, t, t)
        else:
            gw, gh = _fit_inside(w, h, t)
            views = fill.expand(b, 3, t, t).clone()
            gx, gy = (t - gw) // 2, (t - gh) // 2
            views[:, :, gy : gy + gh, gx : gx + gw] = _resize(x, gh, gw)
        out = self._normalise(torch.cat([views, tiles]).to(self._scale.dtype))
        return SlicedBatch(
            global_views=out[:b],
            tiles=out[b:],
            tiles_per_image=torch.full((b,), plan.num_tiles, dtype=torch.long, device=out.device),
            plans=(plan,) * b,
        )


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bicubic resize of float ``(b, c, h, w)`` in 0..255, rounded to uint8 levels as
    PIL stores them."""
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0, 255).round()


def _on_canvas(
    image: Image.Image, size: tuple[int, int], offset: tuple[int, int], fill: np.ndarray
) -> np.ndarray:
    """``image`` placed at ``offset`` on a ``size`` (w, h) uint8 canvas; only the margins are
    filled, so each canvas byte is written once."""
    (cw, ch), (x, y) = size, offset
    pixels = np.asarray(image)
    h, w = pixels.shape[:2]
    canvas = np.empty((ch, cw, 3), dtype=np.uint8)
    canvas[:y] = fill
    canvas[y + h :] = fill
    canvas[y : y + h, :x] = fill
    canvas[y : y + h, x + w :] = fill
    canvas[y : y + h, x : x + w] = pixels
    return canvas
