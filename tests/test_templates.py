"""Chat templates: exact formats, ids equal to LLaVA's tokenisation, answer-only labels by character
span, generation prompts as prefixes, a configurable image token, and every error path."""

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
CORPUS = [VICUNA_SYSTEM, LLAMA3_SYSTEM, "USER: ASSISTANT: user assistant system",
          "what color is the square ? red and the background grey , mostly\n",
          "USER: what color ? ASSISTANT: red USER: and the background ? ASSISTANT: grey"]


@pytest.fixture(scope="module")
def words():
    return build_word_tokenizer(["and", "the", "background", "grey", ",", "mostly"])


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer trained in code, holding every special token a template uses."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<img>", *LLAMA3_TOKENS]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=["<image>", "<img>", *LLAMA3_TOKENS])


def sentencepiece_llama(split_words: bool):
    """transformers' LlamaTokenizerFast (BPE under ``Metaspace(prepend_scheme="first",
    split=False)``, BOS added, ``<image>`` added as a special token as recipes.build does) with
    merges trained in code. ``split_words=True`` trains like SentencePiece (pieces never hold an
    inner "▁"); ``False`` also learns merges across words such as ``"T:▁"``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=split_words)
    trainer = trainers.BpeTrainer(vocab_size=260, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=["\n"])
    tok.train_from_iterator(CORPUS * 3, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    llama = LlamaTokenizerFast(vocab=model["vocab"], merges=merges, add_bos_token=True)
    llama.add_tokens(["<image>"], special_tokens=True)
    return llama


@pytest.fixture(scope="module")
def spm():
    return sentencepiece_llama(split_words=True)


def llava_vicuna_prompt(conv, system=VICUNA_SYSTEM, *, generation=False):
    """LLaVA's conv_vicuna_v1.get_prompt (SeparatorStyle.TWO, sep " ", sep2 "</s>"), written out."""
    seps, roles = [" ", "</s>"], {"human": "USER", "gpt": "ASSISTANT"}
    ret = system + seps[0]
    messages = [(roles[t["from"]], t["value"]) for t in conv]
    if generation:
        messages.append(("ASSISTANT", None))
    for i, (role, message) in enumerate(messages):
        ret += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
    return ret


def llava_tokenizer_image_token(tok, prompt, image_id):
    """LLaVA's mm_utils.tokenizer_image_token, written out: each side of <image> tokenised with the
    tokenizer's special tokens, the BOS of the later chunks dropped."""
    chunks = [tok(chunk).input_ids for chunk in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    sep = [image_id] * (offset + 1)
    for x in [e for pair in zip(chunks, [sep] * len(chunks)) for e in pair][:-1]:
        ids.extend(x[offset:])
    return ids


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
            runs.append(run)
            run = []
    return [_decode(tok, r) for r in runs + ([run] if run else [])]


def test_names_and_unknown_template():
    assert template_names() == ["llama-3", "llama-3-meta", "plain", "qa", "vicuna-v1"]
    with pytest.raises(TemplateError, match=r"unknown chat template 'chatml'; known: \['llama-3'"):
        get_template("chatml")
    with pytest.raises(TemplateError, match="system must not hold '<image>'"):
        get_template("vicuna-v1", system="look: <image>")


def test_qa_format_and_labels(words):
    enc = get_template("qa").encode(words, CONV)
    toks = words.convert_ids_to_tokens(enc.input_ids)
    assert toks == ("<s> USER: <image> what color is the square ? ASSISTANT: red </s> USER: and "
                    "the background ? ASSISTANT: grey , mostly </s>").split()
    target = [i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    assert words.convert_ids_to_tokens(target) == "red </s> grey , mostly </s>".split()
    # the router reads the turn that holds the image, for every answer
    assert words.convert_ids_to_tokens(enc.question_ids) == "what color is the square ?".split()


def test_vicuna_is_llavas_string(bpe):
    template = get_template("vicuna-v1")
    assert template.prompt_text(CONV) == llava_vicuna_prompt(CONV) == (
        f"{VICUNA_SYSTEM} USER: <image>\nwhat color is the square ? ASSISTANT: red</s>"
        "USER: and the background ? ASSISTANT: grey , mostly</s>")
    assert template.prompt_text(CONV[:3], for_generation=True) == \
        llava_vicuna_prompt(CONV[:3], generation=True)
    assert template.prompt_text(CONV[:3], for_generation=True).endswith("background ? ASSISTANT:")
    enc = template.encode(bpe, CONV)
    assert _decode(bpe, enc.input_ids) == "<s>" + llava_vicuna_prompt(CONV)
    # byte-level BPE carries the space before an answer in the answer's first token
    assert [r.strip() for r in _labelled_runs(bpe, enc)] == ["red</s>", "grey , mostly</s>"]


def test_vicuna_ids_equal_llavas_with_a_sentencepiece_tokenizer(spm):
    """The ids LLaVA/SliME trained Vicuna on: the whole prompt string through
    tokenizer_image_token; the old piece-by-piece encoding put extra "▁" tokens in."""
    template = get_template("vicuna-v1", system="S")
    image_id = spm.convert_tokens_to_ids("<image>")
    for conv, generation in ((CONV, False), (CONV[:2], False), (CONV[:3], True), (CONV[:1], True)):
        enc = template.encode(spm, conv, for_generation=generation)
        expect = llava_tokenizer_image_token(
            spm, llava_vicuna_prompt(conv, "S", generation=generation), image_id)
        assert enc.input_ids == expect, (spm.convert_ids_to_tokens(enc.input_ids),
                                         spm.convert_ids_to_tokens(expect))
    enc = template.encode(spm, CONV[:2])
    assert spm.convert_ids_to_tokens(enc.input_ids) == [
        "<s>", "▁", "S", "▁USER:", "▁", "<image>", "▁", "\n", "w", "hat", "▁color", "▁is", "▁the",
        "▁square", "▁?", "▁ASSISTANT:", "▁red", "</s>"]
    enc = template.encode(spm, CONV)
    assert [r.strip() for r in _labelled_runs(spm, enc)] == ["red</s>", "grey , mostly</s>"]
    assert spm.convert_ids_to_tokens([i for i, lab in zip(enc.input_ids, enc.labels)
                                      if lab != IGNORE_INDEX]) == \
        ["▁red", "</s>", "▁grey", "▁,", "▁mostly", "</s>"]


def test_a_tokenizer_that_merges_across_the_prompt_end_is_refused():
    # trained across words, it learns "T:▁": "ASSISTANT:" alone ends in "T", ":" instead
    merged = sentencepiece_llama(split_words=False)
    with pytest.raises(TemplateError, match=r"'vicuna-v1': this tokenizer tokenises the "
                                            r"generation prompt of answer 1 differently .* part "
                                            r"at token 37: \['▁\?▁ASSISTANT', ':'\] vs"):
        get_template("vicuna-v1").encode(merged, CONV[:2])


def test_meta_llama3_exact_text_and_stop_token(bpe):
    template = get_template("llama-3-meta", system="Be brief.")
    conv = [{"from": "human", "value": " what color ?\n<image> "},
            {"from": "gpt", "value": " red\n"},
            {"from": "human", "value": " and ? "}, {"from": "gpt", "value": "grey"}]
    enc = template.encode(bpe, conv)
    text = ("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n<image>\nwhat color ?"
            "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nred<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nand ?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\ngrey<|eot_id|>")
    assert template.prompt_text(conv) == text
    assert _decode(bpe, enc.input_ids) == "<|begin_of_text|>" + text
    assert _labelled_runs(bpe, enc) == ["red<|eot_id|>", "grey<|eot_id|>"]
    assert template.stop_token_ids(bpe) == [bpe.convert_tokens_to_ids("<|eot_id|>")]
    assert get_template("qa").stop_token_ids(bpe) == [bpe.eos_token_id]


def test_plain_is_llavas_pretraining_format(bpe, words):
    template = get_template("plain")
    enc = template.encode(bpe, CONV[:2])
    assert _decode(bpe, enc.input_ids) == "<s><image>red\n"
    assert enc.labels[:2] == [IGNORE_INDEX] * 2 and enc.labels[2:] == enc.input_ids[2:]
    assert _labelled_runs(bpe, enc) == ["red\n"]
    question = bpe("what color is the square ?", add_special_tokens=False).input_ids
    assert enc.question_ids == question
    assert template.stop_token_ids(bpe) == [bpe.convert_tokens_to_ids("Ċ"), bpe.eos_token_id]
    with pytest.raises(TemplateError, match="'plain' takes one human/gpt pair, got 2"):
        template.encode(bpe, CONV)
    # a tokenizer that drops newlines could never learn where a caption ends
    with pytest.raises(TemplateError, match=r"'plain' ends each answer with '\\n', which the "
                                            r"tokenizer turns into no token"):
        template.encode(words, CONV[:2])
    with pytest.raises(TemplateError, match=r"ends answers with '\\n', which the tokenizer"):
        template.stop_token_ids(words)


def test_the_placeholder_moves_to_the_front_as_in_llava(spm):
    conv = [{"from": "human", "value": "  what color is the square ?\n<image>"}, CONV[1]]
    template = get_template("vicuna-v1")
    assert template.prompt_text(conv) == template.prompt_text(CONV[:2])
    assert template.encode(spm, conv) == template.encode(spm, CONV[:2])
    alone = [{"from": "human", "value": "<image>"}]
    assert template.prompt_text(alone, for_generation=True).endswith("USER: <image> ASSISTANT:")
    assert template.encode(spm, alone, for_generation=True).question_ids == []


@pytest.mark.parametrize("name, tok", [("qa", "bpe"), ("plain", "bpe"), ("vicuna-v1", "bpe"),
                                       ("llama-3", "bpe"), ("qa", "spm"), ("plain", "spm"),
                                       ("vicuna-v1", "spm")])
def test_generation_prompt_is_the_training_prefix(name, tok, request):
    tok = request.getfixturevalue(tok)
    conv = CONV[:2] if name == "plain" else CONV
    full = get_template(name).encode(tok, conv)
    prompt = get_template(name).encode(tok, conv[:-1], for_generation=True)
    n = len(prompt.input_ids)
    assert full.input_ids[:n] == prompt.input_ids
    assert set(prompt.labels) == {IGNORE_INDEX}
    # everything after the prompt is the last answer and its stop token, all of it labelled
    assert full.labels[n:] == full.input_ids[n:]
    assert _decode(tok, full.input_ids[n:-1]).strip() == conv[-1]["value"]
    assert full.input_ids[-1] in get_template(name).stop_token_ids(tok)
    assert prompt.question_ids == full.question_ids


def test_configurable_image_token(bpe):
    img, image = bpe.convert_tokens_to_ids("<img>"), bpe.convert_tokens_to_ids("<image>")
    template = get_template("vicuna-v1")
    default = template.encode(bpe, CONV)
    enc = template.encode(bpe, CONV, image_token="<img>")
    assert enc.input_ids.count(img) == 1 and image not in enc.input_ids
    at = default.input_ids.index(image)
    assert enc.input_ids == default.input_ids[:at] + [img] + default.input_ids[at + 1:]
    assert enc.labels[at] == IGNORE_INDEX and enc.question_ids == default.question_ids
    conv = [CONV[0], CONV[1], {"from": "human", "value": "is <img> a tag ?"}, CONV[3]]
    with pytest.raises(TemplateError, match=r"image token '<img>' must appear once, where "
                                            r"'<image>' is; the text holds it 1 more time"):
        template.encode(bpe, conv, image_token="<img>")
    with pytest.raises(TemplateError, match="'vicuna-v1' needs the token '<picture>'"):
        template.encode(bpe, CONV, image_token="<picture>")


def test_a_slow_tokenizer_is_refused(words):
    from transformers import PreTrainedTokenizer

    class Slow(PreTrainedTokenizer):
        """A whitespace tokenizer in Python (no character offsets)."""

        def __init__(self):
            self.vocab = dict(words.get_vocab())
            super().__init__(bos_token="<s>", eos_token="</s>", unk_token="<unk>")

        def get_vocab(self):
            return dict(self.vocab)

        @property
        def vocab_size(self):
            return len(self.vocab)

        def _tokenize(self, text, **kwargs):
            return text.split()

        def _convert_token_to_id(self, token):
            return self.vocab.get(token, self.vocab["<unk>"])

        def _convert_id_to_token(self, index):
            return {v: k for k, v in self.vocab.items()}[index]

    slow = Slow()
    assert not slow.is_fast
    with pytest.raises(TemplateError, match=r"'qa' needs a fast \(Rust-backed\) tokenizer: the "
                                            r"answers are labelled by character offsets, which "
                                            r"Slow does not give"):
        get_template("qa").encode(slow, CONV)


BAD = [
    ([], False, "non-empty list of turns"),
    ("hello", False, "non-empty list of turns"),
    (None, False, "non-empty list of turns"),
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
]


@pytest.mark.parametrize("conv, gen, match", BAD)
def test_bad_conversations(conv, gen, match, words):
    with pytest.raises(TemplateError, match=match):
        get_template("qa").check(conv, for_generation=gen)
    with pytest.raises(TemplateError, match=match):
        get_template("qa").encode(words, conv, for_generation=gen)
    with pytest.raises(TemplateError, match=match):
        get_template("qa").prompt_text(conv, for_generation=gen)


def test_check_accepts_what_encode_accepts(words):
    assert get_template("qa").check(CONV) is None
    assert get_template("qa").check(CONV[:3], for_generation=True) is None
    with pytest.raises(TemplateError, match="'plain' takes one human/gpt pair, got 2"):
        get_template("plain").check(CONV)


def test_missing_tokens_are_named(words):
    with pytest.raises(TemplateError, match="'llama-3' needs the token '<|begin_of_text|>'"):
        get_template("llama-3").encode(words, CONV[:2])
    no_eos = build_word_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(TemplateError, match="'qa': the tokenizer has no eos token"):
        get_template("qa").encode(no_eos, CONV[:2])
    with pytest.raises(TemplateError, match="'qa': the tokenizer has no eos token"):
        get_template("qa").stop_token_ids(no_eos)


def test_dataset_multi_turn_image_token_and_bad_records(tmp_path, bpe, words):
    index = make_color_dataset(tmp_path, 3, seed=1)
    records = json.loads(index.read_text())
    records[0]["conversations"] = CONV
    index.write_text(json.dumps(records))
    ds = LlavaJsonDataset(index, tokenizer=words, slicer=AdaptiveSlicer(max_tiles=2))
    ex = ds[0]
    assert ex.answer == "grey , mostly"
    assert words.convert_ids_to_tokens(ex.input_ids[ex.labels != IGNORE_INDEX].tolist()) == \
        "red </s> grey , mostly </s>".split()
    ds = LlavaJsonDataset(index, tokenizer=bpe, slicer=AdaptiveSlicer(max_tiles=2),
                          template="vicuna-v1", image_token="<img>")
    ids = ds[1].input_ids.tolist()
    assert ids.count(bpe.convert_tokens_to_ids("<img>")) == 1
    assert bpe.convert_tokens_to_ids("<image>") not in ids

    # every record is checked at open; one error lists the bad ones
    records[1]["conversations"] = [CONV[0], {"from": "human", "value": "x"}]
    records[2]["image"] = 7
    records.append("not a record")
    index.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=(
            r"^3 of 4 records in '.*data.json' do not fit the 'qa' template; the first 3: "
            r"record 1 \(id 'color-1'\): turn 1 is from 'human', expected 'gpt' .*; "
            r"record 2 \(id 'color-2'\): 'image' must be a string path, got int; "
            r"record 3 \(id None\): must be a JSON object, got str$")):
        LlavaJsonDataset(index, tokenizer=words, slicer=AdaptiveSlicer())
    many = [{"id": f"b{i}", "image": "x.png", "conversations": []} for i in range(7)]
    index.write_text(json.dumps(many))
    with pytest.raises(ValueError, match=r"7 of 7 records .* the first 5: record 0 \(id 'b0'\): "
                                         r"conversations must be .*record 4 \(id 'b4'\)[^;]*$"):
        LlavaJsonDataset(index, tokenizer=words, slicer=AdaptiveSlicer())
    with pytest.raises(TemplateError, match="unknown chat template"):
        LlavaJsonDataset(index, tokenizer=words, slicer=AdaptiveSlicer(), template="nope")


def test_dataset_skips_text_only_records_and_names_the_record_on_read(tmp_path, words):
    index = make_color_dataset(tmp_path, 2, seed=1)
    records = json.loads(index.read_text())
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "hi"},
                                              {"from": "gpt", "value": "hello"}]}
    index.write_text(json.dumps([text_only, records[0], text_only, records[1]]))
    with pytest.warns(UserWarning, match=r"2 of 4 records in '.*' have no 'image' \(text-only\) "
                                         r"and are skipped"):
        ds = LlavaJsonDataset(index, tokenizer=words, slicer=AdaptiveSlicer(max_tiles=2),
                              template="plain")
    assert ds.skipped_text_only == 2 and len(ds) == 2 and ds.positions == [1, 3]
    assert [r["id"] for r in ds.records] == ["color-0", "color-1"]
    # a tokenizer problem shows when a record is read, naming the record by its place in the file
    with pytest.raises(ValueError, match=r"record 3 \(id 'color-1'\): template 'plain' ends each"):
        ds[1]
    index.write_text(json.dumps([text_only]))
    with pytest.warns(UserWarning, match="1 of 1 records"), \
            pytest.raises(ValueError, match="holds no record with an image"):
        LlavaJsonDataset(index, tokenizer=words, slicer=AdaptiveSlicer())
    records[0]["image"] = "missing.png"
    index.write_text(json.dumps(records))
    ds = LlavaJsonDataset(index, tokenizer=words, slicer=AdaptiveSlicer(max_tiles=2))
    with pytest.raises(Exception, match="missing.png"):
        ds[0]


def test_whitespace_tokens_inside_an_answer_are_labelled_under_trimmed_offsets():
    """GPT-2-style tokenizers trim offsets: a whitespace-only token gets an empty span, yet it is
    part of the answer and must carry the loss."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=["<image>"])
    answer = "red\n\n  grey"
    enc = get_template("vicuna-v1").encode(
        fast, [{"from": "human", "value": "<image>\nwhat color ?"},
               {"from": "gpt", "value": answer}])
    prompt = get_template("vicuna-v1").encode(
        fast, [{"from": "human", "value": "<image>\nwhat color ?"}], for_generation=True)
    n = len(prompt.input_ids)
    assert enc.labels[:n] == [IGNORE_INDEX] * n
    assert enc.labels[n:] == enc.input_ids[n:]  # every answer token, whitespace included
    assert _decode(fast, enc.input_ids[n:]).strip() == answer + "</s>"


THREE = CONV + [{"from": "human", "value": "  and the square ?  "}, {"from": "gpt", "value": "red"}]


@pytest.mark.parametrize("name", ["qa", "vicuna-v1", "llama-3", "llama-3-meta"])
def test_router_text_is_the_same_at_training_and_in_chat_turn_by_turn(name, bpe):
    """One rule: every answer's router text is the turn that holds the image, in training (one
    encoding for all answers) and in recipes.chat's generation inputs for each turn."""
    from recipes.chat import generation_inputs

    template = get_template(name)
    training = template.encode(bpe, THREE)
    first = bpe("what color is the square ?", add_special_tokens=False).input_ids
    assert training.question_ids == first  # no later question reaches the router
    for k in range(0, len(THREE), 2):
        ids, question_ids, mask = generation_inputs(template, bpe, THREE[:k + 1], "<image>")
        assert question_ids[0].tolist() == training.question_ids and bool(mask.all())
        assert training.input_ids[:ids.shape[1]] == ids[0].tolist()  # the same visual tokens
    # a question with no text routes as "no text" in chat, and has none in training
    alone = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "red"}]
    assert template.encode(bpe, alone).question_ids == []
    _, question_ids, mask = generation_inputs(template, bpe, alone[:1], "<image>")
    assert question_ids.shape == (1, 1) and not bool(mask.any())
