"""AdaptiveSlicer rendering: tiles, global views, modes, inputs, tensor path, collate, bad input."""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from slime_adapters.testing import slice_image_reference
from slime_adapters.slicing import (
    AdaptiveSlicer,
    SlicedBatch,
    SlicedImage,
    SlicerConfig,
    SlicingError,
    collate,
    plan_grid,
    visual_token_count,
)

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
T = 336


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """Undo the CLIP normalisation: (..., 3, t, t) -> 0..255 float64."""
    x = x.double().numpy()
    return (x * STD[:, None, None] + MEAN[:, None, None]) * 255.0


def smooth(w: int, h: int) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack(
        [127 + 100 * np.sin(xx / 37.0), 127 + 100 * np.cos(yy / 23.0), 40 + 150 * (xx + yy) / (w + h)], -1
    )
    return Image.fromarray(a.astype(np.uint8))


def png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w×h RGB pixels, followed by a few bytes of data only."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def palette_image() -> Image.Image:
    image = Image.new("P", (40, 30), 1)
    image.putpalette([0, 0, 0, 1, 2, 3] + [0, 0, 0] * 254)
    return image


# ---- geometry ---------------------------------------------------------------------------------
def test_corner_markers_land_in_the_right_tiles():
    w, h = 1000, 700
    a = np.full((h, w, 3), 128, dtype=np.uint8)
    colours = {"tl": (255, 0, 0), "tr": (0, 255, 0), "bl": (0, 0, 255), "br": (255, 255, 0)}
    m = 40
    a[:m, :m], a[:m, -m:] = colours["tl"], colours["tr"]
    a[-m:, :m], a[-m:, -m:] = colours["bl"], colours["br"]
    out = AdaptiveSlicer()(Image.fromarray(a))
    plan = out.plan
    cols, rows = plan.grid
    assert out.tiles.shape == (cols * rows, 3, T, T)
    (ox, oy), (rw, rh) = plan.offset, plan.resized_size
    corners = {"tl": (ox, oy), "tr": (ox + rw - 1, oy), "bl": (ox, oy + rh - 1), "br": (ox + rw - 1, oy + rh - 1)}
    tiles = to_pixels(out.tiles)
    for name, (x, y) in corners.items():
        r, c = y // T, x // T
        index = r * cols + c  # row-major
        pixel = tiles[index, :, y - r * T, x - c * T]
        assert np.abs(pixel - colours[name]).max() < 3, (name, index, pixel)
        for other in range(cols * rows):
            if other != index:
                hit = np.all(np.abs(tiles[other] - np.array(colours[name])[:, None, None]) < 3, axis=0)
                assert not hit.any(), f"{name} marker leaked into tile {other}"


def test_global_view_is_padded_not_stretched_in_paper_mode():
    green = Image.new("RGB", (600, 300), (0, 200, 0))
    paper = to_pixels(AdaptiveSlicer()(green).global_view)
    fill = np.array([int(255 * m) for m in MEAN])
    # 600x300 -> 336x168 centred: rows 0..83 and 252..335 are fill
    assert np.abs(paper[:, :84] - fill[:, None, None]).max() < 1e-3
    assert np.abs(paper[:, 252:] - fill[:, None, None]).max() < 1e-3
    assert np.abs(paper[:, 85:251] - np.array([0, 200, 0])[:, None, None]).max() < 1e-3
    stretched = to_pixels(AdaptiveSlicer.reference()(green).global_view)
    assert np.abs(stretched - np.array([0, 200, 0])[:, None, None]).max() < 1e-3


@pytest.mark.parametrize(
    "size, kwargs",
    [
        ((1000, 700), {}),
        ((97, 413), {}),
        ((500, 400), {"policy": "reference", "global_view": "resize", "fill": (0, 0, 0)}),
        ((336, 2352), {"policy": "reference"}),
        ((1300, 500), {"policy": "pinpoints", "max_tiles": 4}),
        ((640, 480), {"tile_size": 224, "max_tiles": 5, "fill": (10, 20, 30), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.25, 1.0)}),
    ],
)
def test_matches_the_float64_loop_oracle(size, kwargs):
    image = smooth(*size)
    fast = AdaptiveSlicer(dtype=torch.float64, **kwargs)
    out = fast(image)
    cfg = fast.config
    view, tiles = slice_image_reference(
        image, out.plan, global_view=cfg.global_view, fill=cfg.fill_color, mean=cfg.mean, std=cfg.std
    )
    for got, want in ((out.global_view, view), (out.tiles, tiles)):
        assert got.shape == want.shape
        err = (got - want).abs()
        assert err.max().item() < 1e-12, f"worst {err.max().item()} at {np.unravel_index(err.argmax(), err.shape)}"
    f32 = AdaptiveSlicer(**kwargs)(image)
    assert f32.tiles.dtype == torch.float32
    assert (f32.tiles.double() - tiles).abs().max().item() < 1e-5


def test_dtype_shape_and_normalisation():
    solid = Image.new("RGB", (500, 400), (10, 100, 250))
    out = AdaptiveSlicer()(solid)
    assert isinstance(out, SlicedImage)
    assert out.global_view.shape == (3, T, T) and out.tiles.shape == (4, 3, T, T)
    assert out.global_view.dtype == torch.float32 and out.num_tiles == 4
    # an interior pixel of the image is exactly (v/255 - mean)/std
    want = (np.array([10, 100, 250]) / 255.0 - MEAN) / STD
    np.testing.assert_allclose(out.tiles[0, :, 300, 300].numpy(), want, rtol=0, atol=1e-5)
    raw = AdaptiveSlicer(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), dtype=torch.bfloat16)(solid)
    assert raw.tiles.dtype == torch.bfloat16
    assert abs(raw.tiles[0, 2, 300, 300].item() - 250 / 255) < 4e-3
    assert 0.0 <= raw.tiles.float().min() and raw.tiles.float().max() <= 1.0


def test_reference_mode_quirks_render():
    ref = AdaptiveSlicer.reference()
    small = ref(smooth(300, 300))
    assert small.plan.grid == (1, 2) and small.tiles.shape == (2, 3, T, T)
    # black canvas padding in the reference: the lower tile's bottom rows are black
    assert np.abs(to_pixels(small.tiles[1])[:, -10:]).max() < 1e-3
    tall = ref(smooth(336, 2352))
    assert tall.plan.grid == (1, 7) and tall.tiles.shape == (7, 3, T, T)


# ---- modes and orientation --------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, expect",
    [
        (lambda: Image.new("L", (40, 30), 77), (77, 77, 77)),
        (lambda: Image.new("1", (40, 30), 1), (255, 255, 255)),
        (lambda: Image.new("CMYK", (40, 30), (0, 255, 255, 0)), (255, 0, 0)),
        (lambda: Image.new("RGBA", (40, 30), (200, 10, 10, 255)), (200, 10, 10)),
        (lambda: Image.new("RGBA", (40, 30), (200, 10, 10, 0)), "fill"),
        (lambda: Image.new("LA", (40, 30), (90, 0)), "fill"),
        (lambda: Image.fromarray(np.full((30, 40), 65535, dtype=np.uint16)), (255, 255, 255)),
        (lambda: Image.fromarray(np.full((30, 40), 257 * 40, dtype=np.uint16)), (40, 40, 40)),
        (lambda: Image.new("I", (40, 30), 257 * 90), (90, 90, 90)),
        (lambda: Image.new("F", (40, 30), 33.0), (33, 33, 33)),
        (lambda: palette_image(), (1, 2, 3)),
    ],
)
def test_every_mode_becomes_rgb(make, expect):
    slicer = AdaptiveSlicer(fill=(5, 6, 7))
    out = slicer(make())
    want = np.array((5, 6, 7) if expect == "fill" else expect, dtype=np.float64)
    centre = to_pixels(out.global_view)[:, T // 2, T // 2]
    assert np.abs(centre - want).max() < 1e-3, (centre, want)


def test_alpha_drop_keeps_the_colour_under_transparent_pixels():
    image = Image.new("RGBA", (40, 30), (200, 10, 10, 0))
    for slicer in (AdaptiveSlicer(alpha="drop"), AdaptiveSlicer.reference()):
        assert np.abs(to_pixels(slicer(image).global_view)[:, T // 2, T // 2] - [200, 10, 10]).max() < 1e-3
    tensor = torch.tensor([200, 10, 10, 0], dtype=torch.uint8).view(1, 4, 1, 1).expand(1, 4, 30, 40)
    out = AdaptiveSlicer(alpha="drop").slice_tensor_batch(tensor.contiguous())
    assert np.abs(to_pixels(out.global_views[0])[:, T // 2, T // 2] - [200, 10, 10]).max() < 1e-3


def test_palette_transparency_is_composited_on_fill():
    image = Image.new("P", (40, 30), 0)
    image.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    image.info["transparency"] = 0
    out = AdaptiveSlicer(fill=(5, 6, 7))(image)
    assert np.abs(to_pixels(out.global_view)[:, T // 2, T // 2] - [5, 6, 7]).max() < 1e-3


def test_exif_orientation_is_applied():
    a = np.zeros((30, 60, 3), dtype=np.uint8)  # 60 wide, 30 high, red on the left half
    a[:, :30] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90° clockwise
    data = encode(Image.fromarray(a), "PNG", exif=exif)
    slicer = AdaptiveSlicer()
    assert slicer.plan_image(data).image_size == (30, 60)
    out = slicer(data)
    assert out.plan.image_size == (30, 60)
    view = to_pixels(out.global_view)
    # after a clockwise turn the left (red) half is on top
    assert np.abs(view[:, 40, T // 2] - [255, 0, 0]).max() < 2
    assert np.abs(view[:, T - 40, T // 2] - [0, 0, 0]).max() < 2


# ---- inputs and the tensor path ---------------------------------------------------------------
def test_pil_path_bytes_and_tensor_inputs_agree(tmp_path):
    image = smooth(420, 310)
    path = tmp_path / "img.png"
    image.save(path)
    slicer = AdaptiveSlicer()
    base = slicer(image)
    for source in (path, str(path), encode(image), bytearray(encode(image))):
        other = slicer(source)
        assert other.plan == base.plan
        assert torch.equal(other.tiles, base.tiles) and torch.equal(other.global_view, base.global_view)
    tensor = slicer(torch.from_numpy(np.array(image)).permute(2, 0, 1))
    assert tensor.plan == base.plan
    diff = np.abs(to_pixels(tensor.tiles) - to_pixels(base.tiles))
    assert diff.max() < 4 and diff.mean() < 0.3, (diff.max(), diff.mean())


def test_tensor_batch_is_vectorised_per_image_equivalent():
    slicer = AdaptiveSlicer(fill=(0, 0, 0))
    images = [np.array(smooth(400, 300).rotate(angle)) for angle in (0, 90, 180)]
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    out = slicer.slice_tensor_batch(batch)
    assert isinstance(out, SlicedBatch)
    p = out.plans[0].num_tiles
    assert out.tiles.shape == (3 * p, 3, T, T) and out.tiles_per_image.tolist() == [p] * 3
    for i in range(3):
        one = slicer(batch[i])
        assert torch.allclose(one.tiles, out.tiles[i * p : (i + 1) * p], atol=1e-5)
        assert torch.allclose(one.global_view, out.global_views[i], atol=1e-5)
    grey = slicer.slice_tensor_batch(batch[:, :1])
    rgba = slicer.slice_tensor_batch(torch.cat([batch, torch.zeros_like(batch[:, :1])], 1))
    assert torch.allclose(grey.tiles[:, 0], grey.tiles[:, 1] * STD[1] / STD[0] + (MEAN[1] - MEAN[0]) / STD[0], atol=1e-5)
    assert np.abs(to_pixels(rgba.tiles)).max() < 1e-3  # fully transparent on a black fill


def test_collate_packs_tiles_without_padding():
    slicer = AdaptiveSlicer()
    items = [slicer(smooth(*s)) for s in ((300, 300), (1000, 700), (336, 800))]
    batch = collate(items)
    counts = [item.num_tiles for item in items]
    assert batch.tiles.shape[0] == sum(counts) and batch.tiles_per_image.tolist() == counts
    assert batch.tiles_per_image.dtype == torch.long
    assert batch.global_views.shape == (3, 3, T, T)
    assert batch.grids.tolist() == [list(item.plan.grid) for item in items]
    start = 0
    for item, n in zip(items, counts):
        assert torch.equal(batch.tiles[start : start + n], item.tiles)
        start += n
    assert torch.equal(slicer.slice_many([smooth(300, 300)]).tiles, items[0].tiles)
    assert batch.to(torch.float16).tiles.dtype == torch.float16


def test_collate_rejects_bad_lists():
    slicer = AdaptiveSlicer()
    with pytest.raises(SlicingError, match="non-empty list"):
        collate([])
    with pytest.raises(SlicingError, match=r"items\[1\] is a str"):
        collate([slicer(smooth(50, 50)), "x"])
    with pytest.raises(SlicingError, match=r"items\[1\] has global view .*bfloat16"):
        collate([slicer(smooth(50, 50)), AdaptiveSlicer(dtype=torch.bfloat16)(smooth(50, 50))])


def test_tokens_from_the_header_only():
    slicer = AdaptiveSlicer()
    data = png_header(3000, 2000)  # no real pixel data behind the header
    plan = slicer.plan_image(data)
    assert plan == plan_grid(3000, 2000)
    assert slicer.num_visual_tokens(data, num_queries=144) == visual_token_count(plan)
    assert slicer.plan_image(torch.zeros(3, 400, 500, dtype=torch.uint8)).image_size == (500, 400)


def test_config_round_trip_pickle_and_reference_preset(tmp_path):
    slicer = AdaptiveSlicer(policy="pinpoints", pinpoints=[(672, 336), (336, 336)], fill=(1, 2, 3))
    path = tmp_path / "slicer.json"
    slicer.config.to_json(path)
    again = AdaptiveSlicer.from_config(SlicerConfig.from_json(path))
    assert again.config == slicer.config and again.config.pinpoints == ((672, 336), (336, 336))
    image = smooth(500, 300)
    assert torch.equal(again(image).tiles, slicer(image).tiles)
    clone = pickle.loads(pickle.dumps(slicer))
    assert torch.equal(clone(image).tiles, slicer(image).tiles)
    ref = AdaptiveSlicer.reference()
    assert (ref.config.policy, ref.config.global_view, ref.config.fill, ref.config.alpha) == (
        "reference", "resize", (0, 0, 0), "drop"
    )
    assert AdaptiveSlicer().fill == (122, 116, 104)  # int(255 * CLIP mean), as expand2square
    serial = AdaptiveSlicer(parallel_resize=False)
    assert torch.equal(serial(image).tiles, AdaptiveSlicer()(image).tiles)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(policy="llava"), "policy must be one of"),
        (dict(global_view="crop"), "global_view must be one of"),
        (dict(alpha="white"), "alpha must be one of"),
        (dict(fill=(0, 0)), "fill must be three ints"),
        (dict(fill=(0, 0, 300)), "fill must be three ints"),
        (dict(std=(1.0, 0.0, 1.0)), "std must be 3 finite numbers > 0"),
        (dict(mean=(0.5, 0.5)), "mean must be 3 finite numbers"),
        (dict(max_pixels=0), "max_pixels must be an int >= 1"),
        (dict(min_side=0), "min_side must be an int >= 1"),
        (dict(max_aspect_ratio=0.5), "max_aspect_ratio must be a finite number >= 1"),
        (dict(parallel_resize="yes"), "parallel_resize must be True or False, got 'yes'"),
        (dict(max_tiles=0), "max_tiles must be an int >= 1 or None"),
        (dict(policy="reference", max_tiles=4), "max_tiles is not used"),
        (dict(dtype=torch.int32), "dtype must be a floating torch.dtype"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(SlicingError, match=match):
        AdaptiveSlicer(**kwargs)


# ---- bad input --------------------------------------------------------------------------------
def test_zero_size_image():
    with pytest.raises(SlicingError, match=r"<PIL image RGB 0x0>: zero-size image \(0x0\)"):
        AdaptiveSlicer()(Image.new("RGB", (0, 0)))


def test_one_pixel_image():
    with pytest.raises(SlicingError, match=r"<PIL image RGB 1x1>: 1x1 has a side under min_side=2"):
        AdaptiveSlicer()(Image.new("RGB", (1, 1)))


def test_extreme_aspect_ratio():
    with pytest.raises(SlicingError, match=r"aspect ratio 2x4000 \(1:2000\) exceeds max_aspect_ratio=100"):
        AdaptiveSlicer()(Image.new("RGB", (2, 4000)))
    # a tensor gets the same check
    with pytest.raises(SlicingError, match=r"<tensor \(3, 3000, 3\) torch.uint8>: aspect ratio"):
        AdaptiveSlicer()(torch.zeros(3, 3000, 3, dtype=torch.uint8))


def test_decompression_bomb_is_refused_before_decoding():
    # 12000x12000 = 144 Mpx claimed by the header, only a few bytes of pixel data behind it: a
    # decode would fail as truncated, so the max_pixels message proves nothing was decoded.
    data = png_header(12000, 12000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(SlicingError, match=r"<\d+ bytes>: 12000x12000 = 144000000 pixels exceeds max_pixels=100000000"):
            AdaptiveSlicer()(data)
        with pytest.raises(SlicingError, match="exceeds max_pixels"):
            AdaptiveSlicer().plan_image(data)
    with pytest.raises(SlicingError, match="exceeds max_pixels=10000"):
        AdaptiveSlicer(max_pixels=10_000)(smooth(200, 200))
    # beyond PIL's own hard limit, PIL refuses at open and we say so
    with pytest.raises(SlicingError, match="refused as a decompression bomb by PIL"):
        AdaptiveSlicer()(png_header(30000, 30000))


def test_truncated_jpeg():
    data = encode(smooth(400, 300), "JPEG", quality=90)
    with pytest.raises(SlicingError, match=r"<\d+ bytes>: truncated or corrupt image data"):
        AdaptiveSlicer()(data[: len(data) // 2])


def test_non_image_bytes():
    with pytest.raises(SlicingError, match=r"<22 bytes>: not a recognised image format"):
        AdaptiveSlicer()(b"certainly not an image")
    with pytest.raises(SlicingError, match=r"<0 bytes>: empty bytes"):
        AdaptiveSlicer()(b"")


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(SlicingError, match=r"nope.jpg': no such file"):
        AdaptiveSlicer()(missing)


def test_float_tensor_and_bad_tensors():
    with pytest.raises(SlicingError, match=r"<tensor \(3, 40, 40\) torch.float32>: tensor input must be uint8"):
        AdaptiveSlicer()(torch.rand(3, 40, 40))
    with pytest.raises(SlicingError, match=r"must be \(c, h, w\) with c in \(1, 3, 4\)"):
        AdaptiveSlicer()(torch.zeros(2, 40, 40, dtype=torch.uint8))
    with pytest.raises(SlicingError, match=r"must be \(b, c, h, w\)"):
        AdaptiveSlicer().slice_tensor_batch(torch.zeros(3, 40, 40, dtype=torch.uint8))
    with pytest.raises(SlicingError, match="empty batch"):
        AdaptiveSlicer().slice_tensor_batch(torch.zeros(0, 3, 40, 40, dtype=torch.uint8))


def test_unsupported_source_type():
    with pytest.raises(SlicingError, match=r"<list>: expected a PIL image, a path, bytes or a uint8 tensor"):
        AdaptiveSlicer()([1, 2, 3])


def released_anyres(image: Image.Image, processor) -> torch.Tensor:
    """The released ``process_anyres_image`` pipeline, transcribed: reference grid, resize with
    ceil rounding, black centred canvas, row-major crops, stretched global view, CLIP preprocess."""
    import math as m

    from slime_adapters.slicing import reference_candidates

    w, h = image.size
    best, best_used, best_waste = None, 0, float("inf")
    for cols, rows in reference_candidates(w, h):
        cw, ch = cols * T, rows * T
        s = min(cw / w, ch / h)
        used = min(int(w * s) * int(h * s), w * h)
        if used > best_used or (used == best_used and cw * ch - used < best_waste):
            best, best_used, best_waste = (cw, ch), used, cw * ch - used
    cw, ch = best
    scale_w, scale_h = cw / w, ch / h  # the released float order: ceil(300 * (336/300)) = 337
    if scale_w < scale_h:
        nw, nh = cw, min(m.ceil(h * scale_w), ch)
    else:
        nw, nh = min(m.ceil(w * scale_h), cw), ch
    canvas = Image.new("RGB", (cw, ch), (0, 0, 0))
    canvas.paste(image.resize((nw, nh)), ((cw - nw) // 2, (ch - nh) // 2))
    patches = [canvas.crop((x, y, x + T, y + T)) for y in range(0, ch, T) for x in range(0, cw, T)]
    views = [image.resize((T, T))] + patches
    return torch.stack([processor(v, return_tensors="pt")["pixel_values"][0] for v in views])


@pytest.mark.parametrize("size", [(300, 300), (500, 400), (1000, 700), (336, 2352), (1920, 1080)])
def test_reference_preset_reproduces_the_released_pipeline(size):
    clip = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    processor = clip.CLIPImageProcessorPil(
        size={"shortest_edge": T}, crop_size={"height": T, "width": T}
    )
    image = smooth(*size)
    want = released_anyres(image, processor)
    out = AdaptiveSlicer.reference()(image)
    got = torch.cat([out.global_view[None], out.tiles])
    assert got.shape == want.shape
    err = (got - want).abs()
    assert err.max().item() < 1e-5, f"worst {err.max().item()} at {np.unravel_index(err.argmax(), err.shape)}"
