"""Chat templates: exact formats, answer-only labels, generation prompts as prefixes, errors."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from recipes.data import LlavaJsonDataset, build_word_tokenizer, make_color_dataset  # noqa: E402
from recipes.templates import (  # noqa: E402
    IGNORE_INDEX,
    LLAMA3_SYSTEM,
    VICUNA_SYSTEM,
    TemplateError,
    get_template,
    template_names,
)
from slime_adapters import AdaptiveSlicer  # noqa: E402

LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CONV = [
    {"from": "human", "value": "<image>\nwhat color is the square ?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "and the background ?"},
    {"from": "gpt", "value": "grey , mostly"},
]


@pytest.fixture(scope="module")
def words():
    return build_word_tokenizer(["and", "the", "background", "grey", ",", "mostly"])


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer trained in code, holding every special token a template uses."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>", *LLAMA3_TOKENS]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([VICUNA_SYSTEM, LLAMA3_SYSTEM, "USER: ASSISTANT: user assistant",
                             "what color is the square ? red and the background grey mostly"],
                            trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=["<image>", *LLAMA3_TOKENS])


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _target_text(tok, enc):
    return [_decode(tok, [i]) for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]


def test_names_and_unknown_template():
    assert template_names() == ["llama-3", "plain", "qa", "vicuna-v1"]
    with pytest.raises(TemplateError, match=r"unknown chat template 'chatml'; known: \['llama-3'"):
        get_template("chatml")


def test_qa_format_and_labels(words):
    enc = get_template("qa").encode(words, CONV)
    toks = words.convert_ids_to_tokens(enc.input_ids)
    assert toks == ("<s> USER: <image> what color is the square ? ASSISTANT: red </s> USER: and "
                    "the background ? ASSISTANT: grey , mostly </s>").split()
    assert words.convert_ids_to_tokens([i for i, lab in zip(enc.input_ids, enc.labels)
                                        if lab != IGNORE_INDEX]) == "red </s> grey , mostly </s>".split()
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(enc.input_ids, enc.labels))
    assert words.convert_ids_to_tokens(enc.question_ids) == \
        "what color is the square ? and the background ?".split()


def test_vicuna_exact_text(bpe):
    enc = get_template("vicuna-v1").encode(bpe, CONV)
    assert _decode(bpe, enc.input_ids) == (
        f"<s>{VICUNA_SYSTEM} USER: <image>\nwhat color is the square ? ASSISTANT: red</s>"
        "USER: and the background ? ASSISTANT: grey , mostly</s>")
    assert "".join(_target_text(bpe, enc)) == "red</s>grey , mostly</s>"


def test_llama3_exact_text_and_stop_token(bpe):
    template = get_template("llama-3", system="Be brief.")
    enc = template.encode(bpe, CONV[:2])
    assert _decode(bpe, enc.input_ids) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nwhat color is the square ?"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nred<|eot_id|>")
    assert "".join(_target_text(bpe, enc)) == "red<|eot_id|>"
    assert template.stop_token_ids(bpe) == [bpe.convert_tokens_to_ids("<|eot_id|>")]
    assert get_template("qa").stop_token_ids(bpe) == [bpe.eos_token_id]


def test_plain_keeps_the_question_for_the_router_only(words):
    enc = get_template("plain").encode(words, CONV[:2])
    assert words.convert_ids_to_tokens(enc.input_ids) == ["<s>", "<image>", "red", "</s>"]
    assert enc.labels[:2] == [IGNORE_INDEX] * 2 and enc.labels[2:] == enc.input_ids[2:]
    assert words.convert_ids_to_tokens(enc.question_ids) == "what color is the square ?".split()
    with pytest.raises(TemplateError, match="'plain' takes one human/gpt pair, got 2"):
        get_template("plain").encode(words, CONV)


@pytest.mark.parametrize("name", ["qa", "plain", "vicuna-v1", "llama-3"])
def test_generation_prompt_is_the_training_prefix(name, bpe):
    conv = CONV[:2] if name == "plain" else CONV
    full = get_template(name).encode(bpe, conv)
    prompt = get_template(name).encode(bpe, conv[:-1], for_generation=True)
    n = len(prompt.input_ids)
    assert full.input_ids[:n] == prompt.input_ids
    assert set(prompt.labels) == {IGNORE_INDEX}
    # everything after the prompt is the last answer and its stop token, all of it labelled
    assert full.labels[n:] == full.input_ids[n:]
    assert _decode(bpe, full.input_ids[n:-1]) == conv[-1]["value"]
    assert full.input_ids[-1] in get_template(name).stop_token_ids(bpe)
    assert prompt.question_ids == full.question_ids


@pytest.mark.parametrize("conv, gen, match", [
    ([], False, "non-empty list of turns"),
    ("hello", False, "non-empty list of turns"),
    ([{"from": "human"}], False, "turn 0 must be a mapping with 'from' and 'value'"),
    ([{"from": "gpt", "value": "x"}], False, "turn 0 is from 'gpt', expected 'human'"),
    ([{"from": "human", "value": 3}], False, "turn 0 value must be a string, got int"),
    ([{"from": "human", "value": "no image"}, {"from": "gpt", "value": "x"}], False,
     "turn 0 must hold '<image>' exactly once, found 0"),
    ([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}], False,
     "exactly once, found 2"),
    ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "<image>"}], False,
     "turn 1 holds '<image>'; only the first human turn may"),
    ([{"from": "human", "value": "<image>"}], False, "must end with a gpt turn"),
    ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}], True,
     "must end with a human turn"),
])
def test_bad_conversations(conv, gen, match, words):
    with pytest.raises(TemplateError, match=match):
        get_template("qa").encode(words, conv, for_generation=gen)


def test_missing_special_token_is_named(words):
    with pytest.raises(TemplateError, match="'llama-3' needs the token '<|begin_of_text|>'"):
        get_template("llama-3").encode(words, CONV[:2])


def test_dataset_multi_turn_and_bad_records(tmp_path, words):
    index = make_color_dataset(tmp_path, 2, seed=1)
    records = json.loads(index.read_text())
    records[0]["conversations"] = CONV
    records[1]["conversations"] = [CONV[0], {"from": "human", "value": "x"}]
    index.write_text(json.dumps(records))
    ds = LlavaJsonDataset(index, tokenizer=words, slicer=AdaptiveSlicer(max_tiles=2))
    ex = ds[0]
    assert ex.answer == "grey , mostly"
    assert words.convert_ids_to_tokens(ex.input_ids[ex.labels != IGNORE_INDEX].tolist()) == \
        "red </s> grey , mostly </s>".split()
    with pytest.raises(ValueError, match=r"record 1 \(id 'color-1'\): turn 1 is from 'human'"):
        ds[1]
    with pytest.raises(TemplateError, match="unknown chat template"):
        LlavaJsonDataset(index, tokenizer=words, slicer=AdaptiveSlicer(), template="nope")
    records[0]["image"] = "missing.png"
    index.write_text(json.dumps(records))
    ds = LlavaJsonDataset(index, tokenizer=words, slicer=AdaptiveSlicer(max_tiles=2))
    with pytest.raises(Exception, match="missing.png"):
        ds[0]
