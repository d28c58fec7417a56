"""Building blocks shared by the modules: the two-layer MLP and fixed 2-D sin-cos positions.

MLP: ``mlp(in_dim, out_dim)`` is ``Linear(in_dim, out_dim) → GELU → Linear(out_dim, out_dim)`` as
an ``nn.Sequential`` (state-dict keys ``0.*`` and ``2.*``, the released ``projection`` layout); the
projector's expert, the query expert's own MLP and the adapter's own local MLP are all this.

Sin-cos positions (MAE / Qwen-VL convention) for square token grids. Layout legend::

    t = r * g + c      token index of row r, column c on a g × g grid (row-major raster order)
    table: (t, d)      d = 4 · k; the first d/2 columns encode the column coordinate c, the
                       last d/2 the row coordinate r, each as [sin(pos · ω), cos(pos · ω)]
                       with ω_i = 10000 ** (-i / (d/4)), i = 0 … d/4 − 1

This is the released resampler's table (its ``get_2d_sincos_pos_embed``: numpy's meshgrid puts
the column coordinate first), written in torch so that it can be built on any device and dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["grid_side", "interpolate_table_bicubic", "mlp", "sincos_2d"]


def mlp(in_dim: int, out_dim: int, *, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None) -> nn.Sequential:
    """``Linear(in_dim, out_dim) → GELU → Linear(out_dim, out_dim)`` (keys ``0.*``, ``2.*``)."""
    fk = {"device": device, "dtype": dtype}
    return nn.Sequential(nn.Linear(in_dim, out_dim, **fk), nn.GELU(),
                         nn.Linear(out_dim, out_dim, **fk))


def grid_side(num_tokens: int, what: str) -> int:
    """Side g of the square grid holding ``num_tokens`` tokens.

    Raises:
        ValueError: ``num_tokens`` is not a perfect square (``what`` names the argument).
    """
    side = math.isqrt(num_tokens) if num_tokens >= 0 else -1
    if side < 1 or side * side != num_tokens:
        raise ValueError(
            f"{what} must be a positive perfect square to lay tokens on a square grid for 2-D "
            f"sin-cos positions, got {num_tokens}"
        )
    return side


def sincos_2d(
    side: int,
    dim: int,
    *,
    ref_side: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The ``(side², dim)`` 2-D sin-cos table of a ``side × side`` grid.

    With ``ref_side`` the cell centres are expressed in the units of a ``ref_side × ref_side``
    grid covering the same square (``pos = (i + 0.5) · ref_side / side − 0.5``, the
    ``align_corners=False`` convention of :func:`torch.nn.functional.interpolate`): the table
    then samples, exactly, the same continuous function as the reference grid's table, so that
    tokens covering the same area of an image carry matching positions. Without it (or with
    ``ref_side == side``) the coordinates are the integers 0 … side − 1.

    The sines and cosines are computed in float64 (float32 where the device has no float64)
    and rounded once to ``dtype``.

    Raises:
        ValueError: ``dim`` is not a positive multiple of 4, or ``side`` is not positive.
    """
    if dim <= 0 or dim % 4:
        raise ValueError(
            f"dim must be a positive multiple of 4 for 2-D sin-cos positions, got {dim}")
    if side < 1:
        raise ValueError(f"side must be positive, got {side}")
    device = torch.device("cpu") if device is None else torch.device(device)
    work = torch.float32 if device.type == "mps" else torch.float64
    pos = torch.arange(side, device=device, dtype=work)
    if ref_side is not None and ref_side != side:
        pos = (pos + 0.5) * (ref_side / side) - 0.5
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=work) / quarter)
    ang = pos[:, None] * omega[None, :]  # (side, d/4)
    emb_1d = torch.cat([ang.sin(), ang.cos()], dim=1)  # (side, d/2)
    rows = emb_1d[:, None, :].expand(side, side, dim // 2)  # indexed [r, c]
    cols = emb_1d[None, :, :].expand(side, side, dim // 2)
    table = torch.cat([cols, rows], dim=-1).reshape(side * side, dim)
    return table.to(dtype)


def interpolate_table_bicubic(table: Tensor, side: int) -> Tensor:
    """Resize a square ``(g², d)`` table to ``(side², d)`` by bicubic interpolation.

    The released resampler's ``get_abs_pos``: ``align_corners=False``, computed in at least
    float32 and returned in the table's dtype. Equal sides return the table unchanged (bicubic
    interpolation at scale one is the identity anyway).
    """
    src = grid_side(table.shape[0], "the position table's row count")
    if src == side:
        return table
    work = torch.promote_types(table.dtype, torch.float32)
    grid = table.to(work).reshape(1, src, src, -1).permute(0, 3, 1, 2)  # (1, d, g, g)
    out = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(side * side, -1).to(table.dtype)
