"""splice_into_embeddings against a per-sample loop oracle, on plain tensors and a tiny HF Llama."""

from __future__ import annotations

import pytest
import torch

from slime_adapters.testing import splice_reference
from slime_adapters.splice import splice_into_embeddings

IMG = 7


def _batch(seed=0, d=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([
        [1, IMG, 3, 4, 5, 0, 0],
        [IMG, 2, IMG, 9, 8, 3, 2],
        [5, 6, 4, 3, 2, 1, 1],
    ])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1] * 7, [1] * 7])
    labels = torch.randint(0, 50, ids.shape, generator=g)
    embeds = torch.randn(*ids.shape, d, generator=g, dtype=torch.float64)
    lengths = torch.tensor([4, 1, 6])
    packed = torch.randn(int(lengths.sum()), d, generator=g, dtype=torch.float64)
    return embeds, ids, labels, mask, packed, lengths


@pytest.mark.parametrize("drop_padding", [False, True])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_matches_loop_oracle(padding_side, drop_padding):
    embeds, ids, labels, mask, packed, lengths = _batch()
    out = splice_into_embeddings(embeds, ids, IMG, (packed, lengths), labels=labels,
                                 attention_mask=mask, padding_side=padding_side,
                                 drop_padding=drop_padding)
    ref = splice_reference(embeds, ids, IMG, packed, lengths, labels=labels, attention_mask=mask,
                           padding_side=padding_side, drop_padding=drop_padding)
    torch.testing.assert_close(out.inputs_embeds, ref["inputs_embeds"], rtol=0, atol=0)
    assert torch.equal(out.attention_mask, ref["attention_mask"])
    assert torch.equal(out.labels, ref["labels"])
    # row 1 has two images (1 + 6 tokens) and five text tokens: the longest row
    assert out.inputs_embeds.shape[1] == 5 + 1 + 6


def test_positions_and_labels_round_trip():
    embeds, ids, labels, mask, packed, lengths = _batch(seed=3)
    out = splice_into_embeddings(embeds, ids, IMG, (packed, lengths), labels=labels)
    starts = out.image_positions
    visual = torch.zeros_like(out.attention_mask, dtype=torch.bool)
    for k, (row, col) in enumerate(starts.tolist()):
        n = int(lengths[k])
        visual[row, col:col + n] = True
        # the image's tokens sit contiguously where the placeholder was, in order
        torch.testing.assert_close(out.inputs_embeds[row, col:col + n],
                                   packed[int(lengths[:k].sum()):int(lengths[:k + 1].sum())])
        assert (out.labels[row, col:col + n] == -100).all()
    for row in range(ids.shape[0]):
        text = ids[row] != IMG
        kept = out.attention_mask[row].bool() & ~visual[row]
        # removing the visual tokens gives back the text embeddings and labels, in order
        torch.testing.assert_close(out.inputs_embeds[row][kept], embeds[row][text])
        assert torch.equal(out.labels[row][kept], labels[row][text])
        n_valid = int(out.attention_mask[row].sum())
        assert torch.equal(out.position_ids[row, :n_valid], torch.arange(n_valid))


def test_gradients_reach_visual_tokens_and_text():
    embeds, ids, labels, mask, packed, lengths = _batch()
    embeds.requires_grad_()
    packed.requires_grad_()
    out = splice_into_embeddings(embeds, ids, IMG, (packed, lengths))
    out.inputs_embeds.sum().backward()
    assert torch.equal(packed.grad, torch.ones_like(packed))
    assert torch.equal(embeds.grad, (ids != IMG).double()[..., None].expand_as(embeds))


def test_placeholder_count_mismatch_raises():
    embeds, ids, labels, mask, packed, lengths = _batch()
    with pytest.raises(ValueError, match="found 3 image placeholder tokens .* but 2 images"):
        splice_into_embeddings(embeds, ids, IMG, (packed[:5], lengths[:2]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(packed_width=5), r"visual tokens must be \(n, 6\)"),
        (dict(ids_shape=True), "input_ids must be"),
        (dict(labels_shape=True), "labels must be"),
        (dict(padding_side="middle"), "padding_side"),
        (dict(bad_sum=True), "lengths sum to"),
        (dict(drop_padding=True), "drop_padding=True needs the attention_mask"),
        (dict(negative=True), "non-negative"),
    ],
)
def test_bad_input(kwargs, match):
    embeds, ids, labels, mask, packed, lengths = _batch()
    if kwargs.get("packed_width"):
        packed = packed[:, :5]
    if kwargs.get("ids_shape"):
        ids = ids[:, :4]
    if kwargs.get("labels_shape"):
        labels = labels[:2]
    if kwargs.get("bad_sum"):
        packed = packed[:-1]
    if kwargs.get("negative"):
        lengths = torch.tensor([-1, 6, 6])
    with pytest.raises(ValueError, match=match):
        splice_into_embeddings(embeds, ids, IMG, (packed, lengths), labels=labels,
                               padding_side=kwargs.get("padding_side", "right"),
                               drop_padding=kwargs.get("drop_padding", False))


def test_tiny_llama_forward_on_spliced_embeddings():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.tensor([[1, IMG, 3, 4, 5], [IMG, 2, 9, 8, 3]])
    labels = ids.clone()
    emb = model.get_input_embeddings()(ids)
    lengths = torch.tensor([3, 2])
    packed = torch.randn(5, 32)
    out = splice_into_embeddings(emb, ids, IMG, (packed, lengths), labels=labels)
    res = model(inputs_embeds=out.inputs_embeds, attention_mask=out.attention_mask,
                labels=out.labels, position_ids=out.position_ids)
    assert torch.isfinite(res.loss)
    # the row without padding must give the same logits as a direct forward on its own
    row = 0
    n = int(out.attention_mask[row].sum())
    alone = model(inputs_embeds=out.inputs_embeds[row:row + 1, :n]).logits
    torch.testing.assert_close(res.logits[row:row + 1, :n], alone, rtol=1e-4, atol=1e-4)
    # labels: text labels kept in order, visual positions ignored
    assert out.labels[0].tolist() == [1, -100, -100, -100, 3, 4, 5]
    assert out.labels[1].tolist() == [-100, -100, 2, 9, 8, 3, -100]


def test_drop_padding_left_pads_for_generation():
    embeds, ids, labels, mask, packed, lengths = _batch()
    out = splice_into_embeddings(embeds, ids, IMG, (packed, lengths), attention_mask=mask,
                                 padding_side="left", drop_padding=True)
    # every row ends with its last real token; row 0 loses its two padding tokens
    assert out.attention_mask[:, -1].tolist() == [1, 1, 1]
    torch.testing.assert_close(out.inputs_embeds[0, -1], embeds[0, 4])
    assert int(out.attention_mask[0].sum()) == 4 + 4


def test_labels_at_input_padding_are_ignored():
    embeds, ids, labels, mask, packed, lengths = _batch()
    out = splice_into_embeddings(embeds, ids, IMG, (packed, lengths), labels=labels,
                                 attention_mask=mask)
    padded = out.attention_mask == 0
    assert padded.any() and (out.labels[padded] == -100).all()
