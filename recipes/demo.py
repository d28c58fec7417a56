"""The embedded default job: a short real run of the library on an image it generates itself.

Run with ``make demo`` (or ``python -m recipes.demo``). Needs no download.
"""

from __future__ import annotations

import argparse
import time

import torch

from slime_adapters.ops import backend_reasons, select_backend
from slime_adapters.ops.attention import attention
from slime_adapters.ops.reference import attention_reference


def _generated_image(height: int, width: int, seed: int) -> torch.Tensor:
    """(3, H, W) float image: smooth gradients plus a few bright rectangles."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height)[:, None]
    xs = torch.linspace(0, 1, width)[None, :]
    img = torch.stack([xs.expand(height, width), ys.expand(height, width), (xs * ys)])
    for _ in range(6):
        y0, x0 = torch.randint(0, height - 32, (1,), generator=g).item(), torch.randint(
            0, width - 32, (1,), generator=g).item()
        img[:, y0:y0 + 32, x0:x0 + 32] = torch.rand(3, 1, 1, generator=g)
    return img


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    patch, dim, heads, queries = 14, 64, 4, 16
    img = _generated_image(336, 672, args.seed)  # two 336-px tiles side by side
    tiles = img.unfold(2, 336, 336).permute(2, 0, 1, 3)  # (tiles, 3, 336, 336)
    tokens = tiles.unfold(2, patch, patch).unfold(3, patch, patch)  # (p, 3, 24, 24, 14, 14)
    tokens = tokens.permute(0, 2, 3, 1, 4, 5).reshape(tiles.shape[0], -1, 3 * patch * patch)
    embed = torch.nn.Linear(3 * patch * patch, dim)
    query = torch.nn.Parameter(torch.randn(queries, dim) * 0.02)
    with torch.no_grad():
        kv = embed(tokens).unflatten(-1, (heads, dim // heads))  # (p, 576, h, d)
        q = query.expand(tiles.shape[0], -1, -1).unflatten(-1, (heads, dim // heads))
        chosen = select_backend(q, kv, kv)
        t0 = time.perf_counter()
        out = attention(q, kv, kv)
        dt = time.perf_counter() - t0
        ref = attention_reference(q.double(), kv.double(), kv.double())
    err = (out.double() - ref).abs().max().item()
    print(f"image 672x336 -> {tiles.shape[0]} tiles x {tokens.shape[1]} patch tokens")
    print(f"compressed to {out.shape[1]} query tokens per tile with backend={chosen!r} "
          f"in {dt * 1e3:.2f} ms; max |fast - float64 oracle| = {err:.2e}")
    for name, reasons in backend_reasons(q, kv, kv).items():
        print(f"  backend {name:9s}: {'usable' if not reasons else '; '.join(reasons)}")
    if not err < 1e-4:
        raise SystemExit(f"demo failed: attention disagrees with the oracle by {err:.3g}")


if __name__ == "__main__":
    main()
