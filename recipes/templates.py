"""Chat templates: LLaVA-format conversations to token ids, every token generation must produce
labelled and nothing else.

A conversation is a list of LLaVA turns ``{"from": "human" | "gpt", "value": str}`` that starts
with a human turn and alternates; the first human turn holds the image placeholder ``<image>``
exactly once (no other turn may). As the released ``preprocess_multimodal`` does, the placeholder
moves to the front of that turn: ``"<image>\\n" + rest.strip()``. :meth:`ChatTemplate.encode` gives

- ``input_ids``: prompt and answers; the placeholder becomes the id of the model's image token (one
  id that :func:`slime_adapters.splice.splice_into_embeddings` expands);
- ``labels``: for each answer, every token after its generation prompt (the conversation up to its
  question, rendered for generation: Vicuna's ends at ``ASSISTANT:``) through its stop text,
  ``-100`` elsewhere. So the ``▁`` a SentencePiece tokenizer writes before a number is labelled:
  it is the first token generation must produce;
- ``question_ids``: the router's text. **Rule**: the router reads the human turn that holds the
  image (without the placeholder) for every answer, in training and in generation. The visual
  tokens enter the sequence once, in that turn: training routes them once for all answers, and in
  a later turn of a chat they stand in the prompt as routed then. A later question never reaches
  the router (it would, in training, show the first answer questions not asked yet); for the first
  answer this is its own question and the questions so far.

The template renders one string (:meth:`ChatTemplate.prompt_text`: for the SliME formats character
for character the released ``Conversation.get_prompt``) and tokenises it as
``tokenizer_image_token`` does: one call for the text before the placeholder and one after it
(``add_special_tokens=False``, so ``</s>`` or ``<|eot_id|>`` in the string are matched as special
tokens), the image id between and a start token in front. A fast tokenizer is required (labels
use character offsets). For every answer, the ids of its generation prompt must be a prefix of the
training ids: a tokenizer merging across the prompt's end (``":▁"``; byte-level BPE splitting
``"\\n\\n"`` before a word but not at the end of a string) is refused, since generation would
not see what training saw.

Templates (``get_template(name)``; ``{eos}`` is the tokenizer's EOS text, ``</s>`` for Vicuna):

- ``qa`` (the demo's): ``<bos>USER: <image>\\n{q} ASSISTANT: {a}{eos}USER: {q2} ASSISTANT: ...``
- ``plain``: pre-training, ``<bos><image>{a}\\n``; the human text is not in the prompt (it still
  drives the router); exactly one human/gpt pair; answers end with ``\\n``.
- ``vicuna-v1`` (SliME's ``conv_vicuna_v1``):
  ``<bos>{system} USER: <image>\\n{q} ASSISTANT: {a}{eos}USER: {q2} ASSISTANT: {a2}{eos}``.
- ``llama-3`` (SliME's ``conv_llama_3``): ``<|begin_of_text|>``, then
  ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{message}<|eot_id|>`` per turn (``user``,
  ``assistant``), messages as written, no system block unless ``system`` is given; a generation
  prompt ends with the assistant header.
- ``llama-3-meta``: Meta's format, the same with every message stripped and a system block
  (default :data:`LLAMA3_SYSTEM`).

Deliberate differences from the released preprocessing (``tests/test_templates_released.py``
compares them): the start token is the tokenizer's BOS wherever it has one, added by the tokenizer
or not (``<|begin_of_text|>`` for the Llama-3 formats); an empty answer stays an empty turn
(``ASSISTANT: </s>``) where ``get_prompt`` drops its separator and merges it into the next turn; the
image must be in the first human turn.

:func:`encode_chat` takes a name above, or ``None`` for the tokenizer's own ``chat_template`` (any
other LLM, through ``apply_chat_template``), under the same labelling and router rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from recipes._conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    Encoded,
    TemplateError,
    check_image_once,
    check_prefix,
    check_turns,
    known_token_id,
    require_fast,
    router_ids,
    text_ids,
    token_id,
)

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAMA3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the "
                 "visual content that the user provides, and assist the user with a variety of "
                 "tasks using natural language.")
_LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

__all__ = ["IGNORE_INDEX", "IMAGE_TOKEN", "LLAMA3_SYSTEM", "VICUNA_SYSTEM", "ChatTemplate",
           "Encoded", "TemplateError", "chat_stop_token_ids", "encode_chat", "get_template",
           "template_names"]


@dataclasses.dataclass(frozen=True)
class _Rendered:
    text: str  # holds IMAGE_TOKEN once, at image_at
    image_at: int
    prompt_ends: tuple[int, ...]  # where each answer's generation prompt ends
    stops: tuple[tuple[int, int], ...]  # each answer's stop text span


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A chat format: ``style`` (``"qa"``, ``"plain"``, ``"vicuna"`` or ``"llama3"``) fixes what
    goes before, between and after the turns; ``strip`` strips every message (Meta's Llama-3
    format).

    ``stop_tokens`` names what ends an answer: ``"eos"`` (the tokenizer's EOS token) or a literal
    token or text; the first one is written after every answer, and all of them stop generation.
    ``start`` is the token in front of the ids: ``"bos"`` (the tokenizer's BOS, where it has one) or
    a literal token the tokenizer must hold.
    """

    name: str
    style: str
    system: str = ""
    strip: bool = False
    single_turn: bool = False
    question_in_prompt: bool = True
    stop_tokens: tuple[str, ...] = ("eos",)
    start: str = "bos"

    # -- public ---------------------------------------------------------------------------------
    def check(self, conversations: Sequence[Mapping[str, Any]], *,
              for_generation: bool = False) -> None:
        """Check the structure of ``conversations`` for this template (no tokenising).

        Raises:
            TemplateError: the conversation is empty, does not start with a human turn or
                alternate, a value is not a string, ``<image>`` is missing from the first human
                turn or appears anywhere else, a generation prompt does not end with a human turn
                (or a training one with a gpt turn), or ``plain`` got more than one pair.
        """
        check_turns(conversations, for_generation, self.single_turn, self.name)

    def prompt_text(self, conversations: Sequence[Mapping[str, Any]], *,
                    for_generation: bool = False, eos_token: str = "</s>") -> str:
        """The string the conversation is rendered as, ``<image>`` in it and without the start
        token (the released ``get_prompt``); ``eos_token`` is the text written for ``"eos"``.

        Raises:
            TemplateError: as :meth:`check`.
        """
        turns = check_turns(conversations, for_generation, self.single_turn, self.name)
        return self._render(turns, self._stop_text_for(eos_token)).text

    def encode(self, tokenizer: Any, conversations: Sequence[Mapping[str, Any]], *,
               for_generation: bool = False, image_token: str = IMAGE_TOKEN) -> Encoded:
        """Token ids, labels and router text of ``conversations`` (see the module docstring).

        ``image_token`` is the model's image token: the placeholder ``<image>`` the data writes
        becomes its id, exactly once.

        Raises:
            TemplateError: everything :meth:`check` raises; the tokenizer is not a fast one (the
                labels need character offsets); it lacks the image token, an EOS token or a token
                the template needs; its text holds the image token outside the placeholder; it
                turns an answer's stop text into no token; or (training) the ids of an answer's
                generation prompt are not a prefix of the training ids.
        """
        turns = check_turns(conversations, for_generation, self.single_turn, self.name)
        require_fast(tokenizer, self.name)
        for token in self._special_tokens():
            token_id(tokenizer, token, self.name)
        image_id = token_id(tokenizer, image_token, self.name)
        rendered = self._render(turns, self._stop_text(tokenizer))
        ids, spans = self._tokenise(tokenizer, rendered, image_id)
        check_image_once(ids, image_id, image_token, self.name)
        labels = [IGNORE_INDEX] * len(ids)
        for turn, (prompt_end, (start, end)) in enumerate(zip(rendered.prompt_ends,
                                                               rendered.stops)):
            covered = [i for i, (s, e) in enumerate(spans) if s < end and e > start]
            if not covered:
                raise TemplateError(f"template {self.name!r} ends each answer with "
                                    f"{rendered.text[start:end]!r}, which the tokenizer turns "
                                    f"into no token")
            if for_generation:  # a generation prompt carries no labels
                continue
            prompt = dataclasses.replace(rendered, text=rendered.text[:prompt_end])
            first = check_prefix(tokenizer, self._tokenise(tokenizer, prompt, image_id)[0], ids,
                                 turn, self.name)
            labels[first:covered[-1] + 1] = ids[first:covered[-1] + 1]
        return Encoded(ids, labels, router_ids(tokenizer, turns[0]))

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Ids of the tokens that end an answer (for ``generate(eos_token_id=...)``): the EOS id
        for ``"eos"``, a literal token's id, else the last token of the stop text tokenised alone.

        Raises:
            TemplateError: the tokenizer has no EOS token, or turns a stop text into no token.
        """
        out = []
        for name in self.stop_tokens:
            if name == "eos":
                out.append(self._eos(tokenizer)[1])
                continue
            value = known_token_id(tokenizer, name)
            if value is not None:
                out.append(value)
                continue
            ids = text_ids(tokenizer, name)
            if not ids:
                raise TemplateError(f"template {self.name!r} ends answers with {name!r}, which "
                                    f"the tokenizer turns into no token")
            out.append(ids[-1])
        return out

    # -- formats --------------------------------------------------------------------------------
    def _special_tokens(self) -> tuple[str, ...]:
        return _LLAMA3_TOKENS if self.style == "llama3" else ()

    def _stop_text(self, tokenizer: Any) -> str:
        first = self.stop_tokens[0]
        return self._eos(tokenizer)[0] if first == "eos" else first

    def _stop_text_for(self, eos_token: str) -> str:
        return eos_token if self.stop_tokens[0] == "eos" else self.stop_tokens[0]

    def _eos(self, tokenizer: Any) -> tuple[str, int]:
        text = getattr(tokenizer, "eos_token", None)
        value = getattr(tokenizer, "eos_token_id", None)
        if text is None or value is None:
            raise TemplateError(f"template {self.name!r}: the tokenizer has no eos token")
        return str(text), int(value)

    def _message(self, value: str) -> str:
        return value.strip() if self.strip else value

    def _render(self, turns: Sequence[str], stop: str) -> _Rendered:
        # (kind, text) pieces; kinds "text", "image", "prompt end", "stop"
        pieces: list[tuple[str, str]] = []
        llama3 = self.style == "llama3"
        if llama3 and self.system:
            pieces.append(("text", _llama3_header("system") + self._message(self.system)
                           + "<|eot_id|>"))
        elif self.style == "vicuna":
            pieces.append(("text", self.system + " "))
        for index in range(0, len(turns), 2):
            human = _human_pieces(turns[index], index == 0, self.question_in_prompt, self.strip)
            if llama3:
                pieces += [("text", _llama3_header("user")), *human,
                           ("text", "<|eot_id|>" + _llama3_header("assistant"))]
            elif self.style in ("vicuna", "qa"):
                pieces += [("text", "USER: "), *human, ("text", " ASSISTANT:")]
            else:  # plain
                pieces += human
            if index + 1 < len(turns):
                space = "" if llama3 or self.style == "plain" else " "
                pieces += [("prompt end", ""), ("text", space + self._message(turns[index + 1])),
                           ("stop", stop)]
        text, image_at, prompt_ends, stops = "", -1, [], []
        for kind, piece in pieces:
            if kind == "image":
                image_at = len(text)
            elif kind == "prompt end":
                prompt_ends.append(len(text))
            elif kind == "stop":
                stops.append((len(text), len(text) + len(piece)))
            text += piece
        return _Rendered(text, image_at, tuple(prompt_ends), tuple(stops))

    # -- tokens ---------------------------------------------------------------------------------
    def _tokenise(self, tokenizer: Any, rendered: _Rendered,
                  image_id: int) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character spans: start token, the text before the image, the image, the text
        after it."""
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        start = getattr(tokenizer, "bos_token_id", None) if self.start == "bos" \
            else token_id(tokenizer, self.start, self.name)
        if start is not None:  # tokenizers without BOS (e.g. Qwen, SmolLM2) start directly
            ids.append(int(start))
            spans.append((0, 0))
        after_at = rendered.image_at + len(IMAGE_TOKEN)
        _extend(tokenizer, rendered.text[:rendered.image_at], 0, ids, spans)
        ids.append(image_id)
        spans.append((rendered.image_at, after_at))
        _extend(tokenizer, rendered.text[after_at:], after_at, ids, spans)
        return ids, spans


def _extend(tokenizer: Any, text: str, offset: int, ids: list[int],
            spans: list[tuple[int, int]]) -> None:
    if text:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids.extend(int(i) for i in enc["input_ids"])
        spans.extend((offset + s, offset + e) for s, e in enc["offset_mapping"])


def _human_pieces(value: str, first: bool, in_prompt: bool,
                  strip: bool) -> list[tuple[str, str]]:
    if not first:
        return [("text", value.strip() if strip else value)] if in_prompt else []
    # as the released preprocess_multimodal: the placeholder, a newline, the stripped text
    rest = value.replace(IMAGE_TOKEN, "").strip()
    return [("image", IMAGE_TOKEN)] + ([("text", "\n" + rest)] if rest and in_prompt else [])


def _llama3_header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


_TEMPLATES = {
    "qa": ChatTemplate("qa", "qa"),
    "plain": ChatTemplate("plain", "plain", single_turn=True, question_in_prompt=False,
                          stop_tokens=("\n", "eos")),
    "vicuna-v1": ChatTemplate("vicuna-v1", "vicuna", system=VICUNA_SYSTEM),
    "llama-3": ChatTemplate("llama-3", "llama3", stop_tokens=("<|eot_id|>",),
                            start="<|begin_of_text|>"),
    "llama-3-meta": ChatTemplate("llama-3-meta", "llama3", system=LLAMA3_SYSTEM, strip=True,
                                 stop_tokens=("<|eot_id|>",), start="<|begin_of_text|>"),
}


def template_names() -> list[str]:
    """The names :func:`get_template` accepts."""
    return sorted(_TEMPLATES)


def get_template(name: str, *, system: str | None = None) -> ChatTemplate:
    """The template called ``name`` (``system`` replaces its system prompt).

    Raises:
        TemplateError: an unknown name (the message lists the known ones), or a ``system`` that
            holds ``<image>``.
    """
    if name not in _TEMPLATES:
        raise TemplateError(f"unknown chat template {name!r}; known: {template_names()}")
    if system is not None and IMAGE_TOKEN in system:
        raise TemplateError(f"system must not hold {IMAGE_TOKEN!r}")
    template = _TEMPLATES[name]
    return template if system is None else dataclasses.replace(template, system=system)


def encode_chat(tokenizer: Any, conversations: Sequence[Mapping[str, Any]], *,
                template: str | None = None, system: str | None = None,
                for_generation: bool = False, image_token: str = IMAGE_TOKEN) -> Encoded:
    """Render, tokenise and label a conversation in a named format, or in the tokenizer's own.

    ``template`` names one of :func:`template_names` (SliME's ``vicuna-v1``, ``llama-3``,
    ``plain``, ...: :meth:`ChatTemplate.encode`), or is ``None`` for the tokenizer's
    ``chat_template`` (any other LLM: ``apply_chat_template``, roles ``user`` and ``assistant``,
    the placeholder at the front of the first user message as in LLaVA, and a system message when
    ``system`` is given). Both label every token after each answer's generation prompt
    (``add_generation_prompt=True``) up to the answer's last special token (the end of its turn;
    a newline the chat template writes after it is not labelled) and give the router the text of
    the turn that holds the image.

    Raises:
        TemplateError: as :meth:`ChatTemplate.encode`; for ``None``, also a tokenizer without a
            ``chat_template``, or a chat template whose rendering of the conversation so far is not
            a prefix of the whole (every answer is checked).
    """
    if template is not None:
        return get_template(template, system=system).encode(
            tokenizer, conversations, for_generation=for_generation, image_token=image_token)
    from recipes.templates_tokenizer import encode_with_chat_template

    return encode_with_chat_template(tokenizer, conversations, system=system,
                                     for_generation=for_generation, image_token=image_token)


def chat_stop_token_ids(tokenizer: Any, template: str | None = None) -> list[int]:
    """The ids that end an answer in :func:`encode_chat`'s format ``template``: the template's
    :meth:`~ChatTemplate.stop_token_ids`, or for ``None`` the EOS id and the special tokens the
    tokenizer's chat template ends an assistant turn with.

    Raises:
        TemplateError: an unknown name, or (``None``) a tokenizer without EOS or chat template.
    """
    if template is not None:
        return get_template(template).stop_token_ids(tokenizer)
    from recipes.templates_tokenizer import chat_template_stop_ids

    return chat_template_stop_ids(tokenizer)
