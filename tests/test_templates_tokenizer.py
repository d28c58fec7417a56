"""recipes.templates.encode_chat: SliME formats by name, and the tokenizer's own chat template (any
other LLM) labelled by the same rule, with every error path."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("transformers")

from recipes.templates import (  # noqa: E402
    IGNORE_INDEX,
    TemplateError,
    chat_stop_token_ids,
    encode_chat,
    get_template,
)

CONV = [
    {"from": "human", "value": "<image>\nwhat color is the square ?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "and the background ?"},
    {"from": "gpt", "value": "grey , mostly"},
]
CORPUS = ["what color is the square ? red and the background grey , mostly\n",
          "user assistant system 12 Be brief."]


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _labelled_runs(tok, enc):
    """The labelled tokens, each contiguous run decoded on its own."""
    runs, run = [], []
    for i, lab in zip(enc.input_ids, enc.labels):
        assert lab in (IGNORE_INDEX, i)
        if lab != IGNORE_INDEX:
            run.append(i)
        elif run:
            runs, run = runs + [run], []
    return [_decode(tok, r) for r in runs + ([run] if run else [])]


def _byte_bpe(specials, **kwargs):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=specials[1:],
                                   **kwargs)


@pytest.fixture(scope="module")
def bpe():
    """The SliME formats' tokens, no chat template."""
    return _byte_bpe(["<unk>", "<s>", "</s>", "<image>", "<|begin_of_text|>",
                      "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                     bos_token="<s>", eos_token="</s>", unk_token="<unk>")


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chatml():
    """A byte-level BPE with a ChatML chat template (as Qwen's and SmolLM2's), no BOS."""
    fast = _byte_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"],
                     eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def test_encode_chat_names_a_slime_format_or_uses_the_tokenizers_own(chatml, bpe):
    assert encode_chat(bpe, CONV, template="vicuna-v1") == \
        get_template("vicuna-v1").encode(bpe, CONV)
    assert encode_chat(bpe, CONV, template="vicuna-v1", system="S") == \
        get_template("vicuna-v1", system="S").encode(bpe, CONV)
    assert chat_stop_token_ids(bpe, "llama-3") == [bpe.convert_tokens_to_ids("<|eot_id|>")]
    conv = [{"from": "human", "value": "what color is the square ?\n<image>"},
            {"from": "gpt", "value": "12"}, {"from": "human", "value": "and the background ?"},
            {"from": "gpt", "value": " grey , mostly\n"}]
    enc = encode_chat(chatml, conv, system="Be brief.")
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nwhat color is the "
            "square ?<|im_end|>\n<|im_start|>assistant\n12<|im_end|>\n<|im_start|>user\nand the "
            "background ?<|im_end|>\n<|im_start|>assistant\n grey , mostly\n<|im_end|>\n")
    assert _decode(chatml, enc.input_ids) == text
    # every token after each generation prompt, through the turn's last special token
    assert _labelled_runs(chatml, enc) == ["12<|im_end|>", " grey , mostly\n<|im_end|>"]
    assert enc.question_ids == chatml("what color is the square ?",
                                      add_special_tokens=False).input_ids
    for k in (1, 3):
        prompt = encode_chat(chatml, conv[:k], system="Be brief.", for_generation=True)
        assert enc.input_ids[:len(prompt.input_ids)] == prompt.input_ids
        assert set(prompt.labels) == {IGNORE_INDEX} and prompt.question_ids == enc.question_ids
        assert _decode(chatml, prompt.input_ids).endswith("<|im_start|>assistant\n")
        n = len(prompt.input_ids)
        assert enc.labels[n - 1] == IGNORE_INDEX and enc.labels[n] == enc.input_ids[n]
    assert chat_stop_token_ids(chatml) == [chatml.convert_tokens_to_ids("<|im_end|>")]


def test_encode_chat_errors(chatml, bpe):
    with pytest.raises(TemplateError, match=r"the tokenizer has no chat_template; name a SliME "
                                            r"format instead"):
        encode_chat(bpe, CONV)
    with pytest.raises(TemplateError, match="has no chat_template"):
        chat_stop_token_ids(bpe)
    with pytest.raises(TemplateError, match="unknown chat template 'chatml'"):
        encode_chat(bpe, CONV, template="chatml")
    with pytest.raises(TemplateError, match="turn 1 holds '<image>'"):
        encode_chat(chatml, [CONV[0], {"from": "gpt", "value": "<image>"}])
    with pytest.raises(TemplateError, match="system must not hold '<image>'"):
        encode_chat(chatml, CONV, system="<image>")
    with pytest.raises(TemplateError, match=r"'chat_template': the image token '<\|im_start\|>' "
                                            r"must appear once, where '<image>' is; the text "
                                            r"holds it 4 more time\(s\)"):
        encode_chat(chatml, CONV, image_token="<|im_start|>")
    with pytest.raises(TemplateError, match="'chat_template' needs the token '<picture>'"):
        encode_chat(chatml, CONV, image_token="<picture>")
    # a chat template that drops earlier answers (as some "thinking" templates do) is refused
    forgetful = copy.deepcopy(chatml)
    forgetful.chat_template = CHATML.replace(
        "{% for m in messages %}", "{% for m in messages %}{% if m['role'] != 'assistant' or "
        "loop.last %}").replace("{% endfor %}", "{% endif %}{% endfor %}")
    with pytest.raises(TemplateError, match=r"'chat_template': this tokenizer tokenises the "
                                            r"generation prompt of answer 1 differently"):
        encode_chat(forgetful, CONV)
    # one that marks the end of the conversation: the first answer's turn ends differently there
    marked = copy.deepcopy(chatml)
    marked.chat_template = CHATML.replace("{% endfor %}",
                                          "{% if loop.last and m['role'] == 'assistant' %}"
                                          "<|endoftext|>{% endif %}{% endfor %}")
    assert _labelled_runs(marked, encode_chat(marked, CONV[:2])) == ["red<|im_end|>\n<|endoftext|>"]
    with pytest.raises(TemplateError, match=r"renders the conversation up to answer 1 "
                                            r"differently from the whole conversation"):
        encode_chat(marked, CONV)
