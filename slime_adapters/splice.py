"""Splice visual tokens into an LLM's ``inputs_embeds`` at image-placeholder positions.

Legend::

    b  text sequences      t  tokens per sequence (with one placeholder per image)
    d  LLM width           i  images (placeholders) in the whole batch, in row-major order
    t' tokens per sequence after splicing (the longest spliced sequence; the rest padded)

Every placeholder token is replaced by its image's visual tokens; the k-th placeholder of the
batch (row-major: sequence 0 first, left to right) takes the k-th image of the
:class:`~slime_adapters.adapter.VisualTokens`. All rows are built in one scatter; there is no loop
over sequences or images. Labels gain ``ignore_index`` at visual positions and at padding, the
attention mask gains 1 at visual positions and 0 at padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SplicedInputs", "splice_into_embeddings"]


@dataclass
class SplicedInputs:
    """LLM inputs after splicing: pass them as ``inputs_embeds``, ``attention_mask``, ``labels``."""

    inputs_embeds: Tensor  # (b, t', d)
    attention_mask: Tensor  # (b, t') long
    labels: Tensor | None  # (b, t') long, or None when no labels were given
    position_ids: Tensor  # (b, t') long: 0, 1, ... over the non-padding tokens of each row
    image_positions: Tensor  # (i, 2) long: (row, first column) of each image's tokens


def splice_into_embeddings(
    input_embeds: Tensor,
    input_ids: Tensor,
    image_token_id: int,
    visual_tokens,
    labels: Tensor | None = None,
    attention_mask: Tensor | None = None,
    *,
    ignore_index: int = -100,
    padding_side: str = "right",
    drop_padding: bool = False,
) -> SplicedInputs:
    """Replace each image placeholder by that image's visual tokens, for the whole batch at once.

    Args:
        input_embeds: ``(b, t, d)`` token embeddings (placeholder rows are ignored).
        input_ids: ``(b, t)`` token ids; ``image_token_id`` marks a placeholder.
        image_token_id: the placeholder id.
        visual_tokens: a :class:`~slime_adapters.adapter.VisualTokens` (``packed`` ``(Σ n_i, d)``
            and ``lengths`` ``(i,)``), or a ``(packed, lengths)`` pair.
        labels: optional ``(b, t)``; placeholders' labels are dropped, visual positions and padding
            get ``ignore_index``.
        attention_mask: optional ``(b, t)``; its values are carried over for text tokens.
        ignore_index: the label of positions that carry no loss.
        padding_side: ``"right"`` (training) or ``"left"`` (batched generation).
        drop_padding: drop text tokens whose ``attention_mask`` is 0 (the input's own padding),
            so that every row ends with its last real token: what left-padded generation needs.

    Returns:
        :class:`SplicedInputs`.

    Raises:
        ValueError: the number of placeholders differs from the number of images, or shapes,
            widths or options do not fit.
    """
    if isinstance(visual_tokens, tuple):
        packed, lengths = visual_tokens
    else:
        packed, lengths = visual_tokens.packed, visual_tokens.lengths
    if input_embeds.dim() != 3:
        raise ValueError(f"input_embeds must be (b, t, d), got shape {tuple(input_embeds.shape)}")
    b, t, d = input_embeds.shape
    if tuple(input_ids.shape) != (b, t):
        raise ValueError(
            f"input_ids must be (b, t) = {(b, t)} like input_embeds, got {tuple(input_ids.shape)}"
        )
    if packed.dim() != 2 or packed.shape[1] != d:
        raise ValueError(
            f"visual tokens must be (n, {d}) to match the LLM width, got {tuple(packed.shape)}"
        )
    for name, x in (("labels", labels), ("attention_mask", attention_mask)):
        if x is not None and tuple(x.shape) != (b, t):
            raise ValueError(f"{name} must be (b, t) = {(b, t)}, got {tuple(x.shape)}")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")

    device = input_embeds.device
    lengths = torch.as_tensor(lengths, device=device, dtype=torch.long)
    is_image = input_ids == image_token_id  # (b, t)
    num_placeholders = int(is_image.sum())
    if num_placeholders != lengths.numel():
        raise ValueError(
            f"found {num_placeholders} image placeholder tokens (id {image_token_id}) in input_ids "
            f"but {lengths.numel()} images' visual tokens"
        )
    if lengths.dim() != 1 or (lengths.numel() and int(lengths.min()) < 0):
        raise ValueError(f"visual token lengths must be a 1-D non-negative list, got {lengths.tolist()}")
    if int(lengths.sum()) != packed.shape[0]:
        raise ValueError(
            f"visual token lengths sum to {int(lengths.sum())} but packed holds {packed.shape[0]}"
        )

    if drop_padding and attention_mask is None:
        raise ValueError("drop_padding=True needs the attention_mask that marks the padding")
    is_text = ~is_image
    if drop_padding:
        is_text = is_text & (attention_mask != 0)
    # Width of every input position once spliced: 1 for text, n_k for the k-th placeholder,
    # 0 for dropped padding.
    width = is_text.long()
    width = width.masked_scatter(is_image, lengths)
    end = torch.cumsum(width, dim=1)  # exclusive end column of every input position
    start = end - width
    new_len = end[:, -1] if t else torch.zeros(b, dtype=torch.long, device=device)
    t_new = int(new_len.max()) if b else 0
    shift = (t_new - new_len) if padding_side == "left" else torch.zeros_like(new_len)
    start = start + shift[:, None]

    out = input_embeds.new_zeros(b, t_new, d)
    out_mask = torch.zeros(b, t_new, dtype=torch.long, device=device)
    out_labels = None if labels is None else labels.new_full((b, t_new), ignore_index)

    # Text tokens keep their own embedding, mask and label.
    text_rows, text_cols = torch.nonzero(is_text, as_tuple=True)
    dest = start[text_rows, text_cols]
    out[text_rows, dest] = input_embeds[text_rows, text_cols]
    out_mask[text_rows, dest] = (
        1 if attention_mask is None else attention_mask[text_rows, text_cols].long()
    )
    if out_labels is not None:
        text_labels = labels[text_rows, text_cols]
        if attention_mask is not None:
            # the input's own padding carries no loss, whatever label the caller put there
            text_labels = text_labels.masked_fill(attention_mask[text_rows, text_cols] == 0,
                                                  ignore_index)
        out_labels[text_rows, dest] = text_labels

    # Visual tokens: token j of image k goes to (row of placeholder k, its start column + j).
    img_rows, img_cols = torch.nonzero(is_image, as_tuple=True)  # row-major = image order
    image_of = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths,
                                       output_size=packed.shape[0])
    first = torch.cumsum(lengths, 0) - lengths
    offset = torch.arange(packed.shape[0], device=device) - first[image_of]
    v_rows = img_rows[image_of]
    v_cols = start[img_rows, img_cols][image_of] + offset
    out[v_rows, v_cols] = packed.to(out.dtype)
    out_mask[v_rows, v_cols] = 1

    position_ids = (torch.cumsum(out_mask, dim=1) - 1).clamp(min=0)
    image_positions = torch.stack([img_rows, start[img_rows, img_cols]], dim=1)
    return SplicedInputs(out, out_mask, out_labels, position_ids, image_positions)
