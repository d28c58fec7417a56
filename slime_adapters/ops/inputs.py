"""Validated attention problems: shape checks, packed lengths, padding layout and masks.

Internal to :mod:`slime_adapters.ops` (the public API is :mod:`slime_adapters.ops.attention`).
Masks follow the library's one convention: ``key_mask`` True = a valid key (as transformers'
``attention_mask``); ``False`` marks padding that no query may see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AttentionInputError",
    "Problem",
    "SeqLens",
    "allowed_mask",
    "dense_from_packed",
    "sanitise_padding",
    "validate",
    "via_padding",
    "zero_rows_without_keys",
]

SeqLens = Sequence[int] | Tensor | None


class AttentionInputError(ValueError):
    """The tensors given to :func:`attention` do not describe a valid attention problem."""


@dataclass(frozen=True)
class Problem:
    """A validated attention call: shapes are checked, packed lengths normalised."""

    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    q_lens: Tensor | None  # (s,) int64 on q.device, packed sequence lengths of the queries
    kv_lens: Tensor | None  # (s,) int64, packed sequence lengths of the keys
    key_mask: Tensor | None  # (b, n) bool, True = a valid key, False = padding (ignored)

    @property
    def packed(self) -> bool:
        return self.q_lens is not None


def _as_lengths(lens: SeqLens, name: str, total: int, device: torch.device) -> Tensor:
    if isinstance(lens, Tensor):
        if lens.dim() != 1 or lens.dtype.is_floating_point or lens.dtype == torch.bool:
            raise AttentionInputError(
                f"{name} must be a 1-D integer tensor or a sequence of ints, got a "
                f"{lens.dim()}-D {lens.dtype} tensor"
            )
        t = lens.to(device=device, dtype=torch.int64)
        # Packed attention reads the lengths on the host anyway (the longest sequence, or the
        # block-diagonal mask), so checking them here costs no extra synchronisation in kind.
        if t.numel() and int(t.min()) < 0:
            raise AttentionInputError(f"{name} must be non-negative, got {t.tolist()}")
        if int(t.sum()) != total:
            raise AttentionInputError(
                f"{name} sums to {int(t.sum())} but the packed dimension has {total} tokens"
            )
    else:
        vals = list(lens)  # type: ignore[arg-type]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in vals):
            raise AttentionInputError(f"{name} must hold ints, got {vals!r}")
        if any(x < 0 for x in vals):
            raise AttentionInputError(f"{name} must be non-negative, got {vals!r}")
        if sum(vals) != total:
            raise AttentionInputError(
                f"{name} sums to {sum(vals)} but the packed dimension has {total} tokens"
            )
        t = torch.tensor(vals, dtype=torch.int64, device=device)
    if t.numel() == 0:
        raise AttentionInputError(f"{name} is empty: a packed input needs at least one sequence")
    return t


def validate(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seqlens: SeqLens,
    kv_seqlens: SeqLens,
    key_mask: Tensor | None,
    scale: float | None,
) -> Problem:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise AttentionInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise AttentionInputError(
                f"{name} must have rank 4 with layout (batch, tokens, heads, head_dim), "
                f"got shape {tuple(t.shape)}"
            )
        if not t.dtype.is_floating_point:
            raise AttentionInputError(f"{name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionInputError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise AttentionInputError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise AttentionInputError(
            f"batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.shape[2] == k.shape[2] == v.shape[2]):
        raise AttentionInputError(
            f"head counts differ: q has {q.shape[2]}, k has {k.shape[2]}, v has {v.shape[2]} "
            "(layout is (batch, tokens, heads, head_dim))"
        )
    if q.shape[3] != k.shape[3]:
        raise AttentionInputError(
            f"q and k head widths differ: {q.shape[3]} vs {k.shape[3]}"
        )
    if k.shape[1] != v.shape[1]:
        raise AttentionInputError(f"k and v token counts differ: {k.shape[1]} vs {v.shape[1]}")
    if k.shape[1] == 0 and q.shape[1] > 0:
        raise AttentionInputError("k and v have no tokens but q has some: nothing to attend to")

    q_lens = kv_lens = None
    if seqlens is None and kv_seqlens is not None:
        raise AttentionInputError("kv_seqlens given without seqlens")
    if seqlens is not None:
        if q.shape[0] != 1:
            raise AttentionInputError(
                f"packed input (seqlens given) needs batch size 1, got {q.shape[0]}"
            )
        if key_mask is not None:
            raise AttentionInputError(
                "seqlens and key_mask are exclusive: packed sequences have no padding"
            )
        q_lens = _as_lengths(seqlens, "seqlens", q.shape[1], q.device)
        kv_lens = (
            q_lens
            if kv_seqlens is None
            else _as_lengths(kv_seqlens, "kv_seqlens", k.shape[1], q.device)
        )
        if kv_seqlens is None and k.shape[1] != q.shape[1]:
            raise AttentionInputError(
                f"seqlens without kv_seqlens needs as many keys as queries, got {q.shape[1]} "
                f"queries and {k.shape[1]} keys; pass kv_seqlens"
            )
        if kv_lens.numel() != q_lens.numel():
            raise AttentionInputError(
                f"seqlens has {q_lens.numel()} sequences but kv_seqlens has {kv_lens.numel()}"
            )
        if not isinstance(seqlens, Tensor) and not isinstance(kv_seqlens, Tensor):
            kv_list = list(seqlens if kv_seqlens is None else kv_seqlens)
            empty = [i for i, (a, b) in enumerate(zip(list(seqlens), kv_list)) if a > 0 and b == 0]
            if empty:
                raise AttentionInputError(
                    f"packed sequences {empty} have queries but no keys: nothing to attend to"
                )
    if key_mask is not None:
        if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool:
            kind = key_mask.dtype if isinstance(key_mask, Tensor) else type(key_mask).__name__
            raise AttentionInputError(
                f"key_mask must be a bool tensor (True = a valid key, False = padding), got {kind}"
            )
        if tuple(key_mask.shape) != (k.shape[0], k.shape[1]):
            raise AttentionInputError(
                f"key_mask must have shape (batch, keys) = {(k.shape[0], k.shape[1])}, "
                f"got {tuple(key_mask.shape)}"
            )
        key_mask = key_mask.to(q.device)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return Problem(q, k, v, float(scale), q_lens, kv_lens, key_mask)


def _segment_ids(lens: Tensor, total: int) -> Tensor:
    """(total,) sequence index of every packed token, computed without a Python loop."""
    return torch.repeat_interleave(
        torch.arange(lens.numel(), device=lens.device), lens, output_size=total
    )


def _packed_index(lens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """For every packed token: (its sequence, its position inside the sequence)."""
    seg = _segment_ids(lens, total)
    starts = torch.cumsum(lens, 0) - lens
    pos = torch.arange(total, device=lens.device) - starts[seg]
    return seg, pos


def _pad(x: Tensor, seg: Tensor, pos: Tensor, num: int, length: int) -> Tensor:
    """(1, total, h, d) packed → (num, length, h, d) padded with zeros, one sequence a row."""
    out = x.new_zeros(num, length, *x.shape[2:])
    return out.index_put((seg, pos), x[0])


def dense_from_packed(p: Problem) -> tuple[Problem, Tensor, Tensor]:
    """Lay packed sequences out as a padded batch with a key mask (True = a real key).

    Costs O(sequences × longest²) scores rather than the (m × n) of one block-diagonal mask, and
    other sequences' tokens are not even present in a row, so nothing they hold can leak. Reads
    the longest length on the host (a device sync when the lengths live on a GPU)."""
    num = p.q_lens.numel()
    q_len = int(p.q_lens.max())
    kv_len = max(int(p.kv_lens.max()), 1)
    seg_q, pos_q = _packed_index(p.q_lens, p.q.shape[1])
    seg_k, pos_k = _packed_index(p.kv_lens, p.k.shape[1])
    valid = torch.zeros(num, kv_len, dtype=torch.bool, device=p.q.device)
    valid = valid.index_put((seg_k, pos_k), torch.ones((), dtype=torch.bool, device=p.q.device))
    dense = Problem(
        _pad(p.q, seg_q, pos_q, num, q_len),
        _pad(p.k, seg_k, pos_k, num, kv_len),
        _pad(p.v, seg_k, pos_k, num, kv_len),
        p.scale,
        None,
        None,
        valid,
    )
    return dense, seg_q, pos_q


def allowed_mask(p: Problem) -> Tensor | None:
    """Boolean mask broadcastable to (b, h, m, n); True where a query may attend to a key."""
    if p.key_mask is not None:
        return p.key_mask[:, None, None, :]  # (b, 1, 1, n)
    return None


def via_padding(impl):
    """Run a dense-only implementation on packed input through the padded layout."""

    def run(p: Problem) -> Tensor:
        if not p.packed:
            return impl(p)
        dense, seg_q, pos_q = dense_from_packed(p)
        return impl(dense)[seg_q, pos_q][None]  # (1, m, h, kv)

    run.__name__ = impl.__name__
    return run


def sanitise_padding(p: Problem) -> tuple[Tensor, Tensor]:
    """Zero padded keys and values, so that NaN or inf stored in padding cannot leak: a masked
    score still multiplies its value (0 · NaN = NaN) and a NaN key poisons the score before the
    mask is applied."""
    if p.key_mask is None:
        return p.k, p.v
    pad = ~p.key_mask[:, :, None, None]
    return p.k.masked_fill(pad, 0), p.v.masked_fill(pad, 0)


def zero_rows_without_keys(p: Problem, out: Tensor) -> Tensor:
    """Queries that can see no key at all (every key padded) get zeros, not NaN."""
    if p.key_mask is None:
        return out
    has_key = p.key_mask.any(dim=1)[:, None, None, None]
    return torch.where(has_key, out, out.new_zeros(()))
