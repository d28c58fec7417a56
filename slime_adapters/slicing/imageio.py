"""Safe image decoding for the slicer: any source and any PIL mode to an upright RGB PIL image.

No torch here. Every failure is a :class:`~slime_adapters.slicing.SlicingError` naming the input
(a path, ``<N bytes>`` or ``<PIL image MODE WxH>``) and the problem, raised before PIL or numpy can
crash or hand back a garbage array. The size checks run on the header, before pixels are decoded.

Mode conversion (to RGB):

* alpha modes (RGBA, LA, PA, RGBa, La, and P/L/RGB with a transparency key) are composited onto the
  fill colour, so transparent areas look like padding rather than black (``alpha="drop"``
  discards the alpha channel instead, as the released code's ``convert("RGB")`` does);
* I;16, I;16B, I;16L, I;16N are 16-bit samples: 0…65535 maps to 0…255 (÷257, rounded);
* I (32-bit integers) is read by its value range: samples within 0…255 are 8-bit values (as PIL
  converts them), within 0…65535 16-bit ones (÷257), anything else (negative, larger) is refused;
* F is taken as 0…255 and clipped (PIL's own conversion); NaN or ±inf samples are refused;
* every other mode (1, L, P, CMYK, YCbCr, LAB, HSV, RGBX, …) through PIL's ``convert("RGB")``
  (CMYK without an ICC profile, as PIL converts it).

Note: PIL's process-wide ``Image.MAX_IMAGE_PIXELS`` still applies on top of ``max_pixels`` (we never
change it), and with ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` set by the caller, PIL fills
truncated files with grey instead of failing; we leave that global to the caller.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from slime_adapters.slicing.plan import SlicingError

__all__ = [
    "check_size",
    "decode",
    "describe_source",
    "load_rgb",
    "open_image",
    "oriented_size",
    "to_rgb",
]

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
# EXIF orientations 5–8 rotate by 90°, so width and height swap.
_SWAPS_AXES = frozenset({5, 6, 7, 8})
_ORIENTATION_TAG = 0x0112


def describe_source(source: Any) -> str:
    """A short name of an image source for error messages."""
    if isinstance(source, str | os.PathLike):
        return repr(os.fspath(source))
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.width}x{source.height}>"
    return f"<{type(source).__name__}>"


def open_image(source: Any) -> tuple[Image.Image, str]:
    """Open ``source`` lazily (header only) and return ``(image, name)``.

    Raises:
        SlicingError: a missing path, bytes that are not an image, an unsupported source type, or
            PIL's own decompression-bomb refusal.
    """
    name = describe_source(source)
    if isinstance(source, Image.Image):
        return source, name
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise SlicingError(f"image {name}: no such file")
        fp: Any = path
    elif isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise SlicingError(f"image {name}: empty bytes")
        fp = io.BytesIO(bytes(source))
    else:
        raise SlicingError(
            f"image {name}: expected a PIL image, a path, bytes or a uint8 tensor (C, H, W)"
        )
    try:
        return Image.open(fp), name
    except UnidentifiedImageError as exc:
        raise SlicingError(f"image {name}: not a recognised image format") from exc
    except Image.DecompressionBombError as exc:
        raise SlicingError(f"image {name}: refused as a decompression bomb by PIL: {exc}") from exc
    except OSError as exc:
        raise SlicingError(f"image {name}: cannot be opened: {exc}") from exc


def oriented_size(image: Image.Image, *, decoded: bool = False) -> tuple[int, int]:
    """``(width, height)`` after EXIF orientation. With ``decoded=False`` no pixels are decoded:
    a PNG whose header holds no eXIf chunk counts as upright (PIL's PNG ``getexif`` would decode
    the whole file to look for a late one)."""
    w, h = image.size
    return (h, w) if _orientation(image, decoded=decoded) in _SWAPS_AXES else (w, h)


def _orientation(image: Image.Image, *, decoded: bool) -> int:
    if not decoded and image.format == "PNG" and "exif" not in image.info:
        return 1
    return image.getexif().get(_ORIENTATION_TAG, 1)


def check_size(
    name: str, width: int, height: int, *, max_pixels: int, min_side: int, max_aspect_ratio: float
) -> None:
    """Raise :class:`SlicingError` for a zero-size, too small, too elongated or too large image."""
    if width <= 0 or height <= 0:
        raise SlicingError(f"image {name}: zero-size image ({width}x{height})")
    if width * height > max_pixels:
        raise SlicingError(
            f"image {name}: {width}x{height} = {width * height} pixels exceeds max_pixels="
            f"{max_pixels} (a possible decompression bomb); refused before decoding"
        )
    if min(width, height) < min_side:
        raise SlicingError(
            f"image {name}: {width}x{height} has a side under min_side={min_side} pixels"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect_ratio:
        raise SlicingError(
            f"image {name}: aspect ratio {width}x{height} (1:{ratio:.0f}) exceeds "
            f"max_aspect_ratio={max_aspect_ratio:g}"
        )


def decode(image: Image.Image, name: str) -> Image.Image:
    """Decode the pixels and apply the EXIF orientation.

    Raises:
        SlicingError: truncated or corrupt data.
    """
    # read before decoding, as plan_image does: a PNG eXIf chunk after the pixel data (which
    # browsers ignore too) must not rotate the slice of an image planned as upright
    orientation = _orientation(image, decoded=False)
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise SlicingError(f"image {name}: refused as a decompression bomb by PIL: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - corrupt data surfaces as OSError, struct.error, zlib.error, ...
        raise SlicingError(f"image {name}: truncated or corrupt image data: {exc}") from exc
    # exif_transpose copies even when there is nothing to do; skip it for upright images.
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        transposed = ImageOps.exif_transpose(image)
        if transposed is not None:
            image = transposed
    return image


def to_rgb(image: Image.Image, fill: tuple[int, int, int], *, alpha: str = "composite",
           name: str | None = None) -> Image.Image:
    """Convert any PIL mode to RGB (see the module docstring); RGB input is returned as is.

    ``alpha="drop"`` ignores transparency (PIL's plain ``convert("RGB")``, what the released
    SliME code does) instead of compositing on ``fill``. ``name`` names the image in errors.

    Raises:
        SlicingError: mode I samples outside 0…65535, mode F samples that are NaN or ±inf."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _SIXTEEN_BIT:
        samples = np.asarray(image).astype(np.float32)
        scale = 257.0
        if mode == "I" and samples.size:
            low, high = float(samples.min()), float(samples.max())
            if low < 0 or high > 65535:
                raise SlicingError(
                    f"image {name or describe_source(image)}: mode I samples span {low:g}…"
                    f"{high:g}, neither 8-bit (0…255) nor 16-bit (0…65535) values; rescale it")
            scale = 1.0 if high <= 255 else 257.0
        grey = np.clip(np.rint(samples / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F" and not np.isfinite(np.asarray(image)).all():
        raise SlicingError(f"image {name or describe_source(image)}: mode F holds NaN or "
                           f"infinite samples")
    if alpha == "composite" and (mode in _ALPHA_MODES or "transparency" in image.info):
        rgba = image.convert("LA").convert("RGBA") if mode == "La" else image.convert("RGBA")
        background = Image.new("RGB", rgba.size, fill)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode == "La":
        image = image.convert("LA")
    return image.convert("RGB")


def load_rgb(
    source: Any,
    *,
    fill: tuple[int, int, int],
    alpha: str = "composite",
    max_pixels: int,
    min_side: int,
    max_aspect_ratio: float,
) -> tuple[Image.Image, str]:
    """Open, check (on the header), decode, orient and convert ``source``; ``(rgb_image, name)``.

    Raises:
        SlicingError: see :func:`open_image`, :func:`check_size` and :func:`decode`.
    """
    image, name = open_image(source)
    owned = image is not source
    try:
        # Every size check is symmetric in width and height, so the stored (unrotated) size from
        # the header is enough, and nothing (not even EXIF) is read before the checks pass.
        check_size(
            name,
            *image.size,
            max_pixels=max_pixels,
            min_side=min_side,
            max_aspect_ratio=max_aspect_ratio,
        )
        rgb = to_rgb(decode(image, name), fill, alpha=alpha, name=name)
    except BaseException:
        if owned:
            image.close()
        raise
    return rgb, name
