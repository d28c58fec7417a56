"""Chat templates: LLaVA-format conversations to token ids with the loss on the answers only.

A conversation is a list of LLaVA turns ``{"from": "human" | "gpt", "value": str}`` that starts with
a human turn and alternates; the first human turn holds the image placeholder ``<image>`` exactly
once (no other turn may hold it). :meth:`ChatTemplate.encode` returns

- ``input_ids``: the whole prompt and answers; ``<image>`` becomes the tokenizer's id for it (one
  placeholder that :func:`slime_adapters.splice.splice_into_embeddings` expands);
- ``labels``: ``input_ids`` on the answers and on the token that ends each answer, ``-100``
  (ignored) everywhere else (everywhere in a generation prompt);
- ``question_ids``: the text of every human turn without the placeholder, for the router.

Every piece of text is tokenised on its own (``add_special_tokens=False``) and the pieces are
concatenated, so a generation prompt (``for_generation=True``: the conversation ends with a human
turn and the ids end where the answer starts) is exactly a prefix of the training sequence of the
same conversation with its answer.

Templates (``get_template(name)``):

===========  ==========================================================================================
``qa``       ``<s> USER: <image> {q} ASSISTANT: {a} </s>``, turns repeated (the demo's format)
``plain``    LLaVA's pre-training format: ``<s> <image> {a} </s>``; the human text is not in the
             prompt (it still drives the router); exactly one human/gpt pair
``vicuna-v1`` ``<s> {system} USER: <image>\\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>``
``llama-3``  ``<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>``
             then ``<|start_header_id|>user<|end_header_id|>\\n\\n{q}<|eot_id|>`` and
             ``<|start_header_id|>assistant<|end_header_id|>\\n\\n{a}<|eot_id|>`` per turn
===========  ==========================================================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAMA3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the "
                 "visual content that the user provides, and assist the user with a variety of "
                 "tasks using natural language.")

__all__ = ["IGNORE_INDEX", "IMAGE_TOKEN", "ChatTemplate", "Encoded", "TemplateError",
           "get_template", "template_names"]


class TemplateError(ValueError):
    """A conversation does not fit the template, or an unknown template or token was named."""


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One tokenised conversation (plain Python lists; the collator makes tensors)."""

    input_ids: list[int]
    labels: list[int]
    question_ids: list[int]


# A piece is ("text", str), ("image",) or ("token", name): name is "bos", "eos" or a literal
# special token that must exist in the tokenizer's vocabulary.
_Piece = tuple


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A chat format: what goes before, between and after the turns.

    ``stop_tokens`` names the tokens that end an answer (generation stops there).
    """

    name: str
    system: str = ""
    single_turn: bool = False
    question_in_prompt: bool = True
    stop_tokens: tuple[str, ...] = ("eos",)

    # -- public ---------------------------------------------------------------------------------
    def encode(self, tokenizer: Any, conversations: Sequence[Mapping[str, Any]], *,
               for_generation: bool = False) -> Encoded:
        """Token ids, labels and question ids of ``conversations`` (see the module docstring).

        Raises:
            TemplateError: the conversation is empty, does not start with a human turn or
                alternate, a value is not a string, ``<image>`` is missing from the first human
                turn or appears anywhere else, a generation prompt does not end with a human turn
                (or a training one with a gpt turn), ``plain`` got more than one pair, or the
                tokenizer lacks a token the template needs.
        """
        turns = _check_turns(conversations, for_generation, self.single_turn, self.name)
        ids: list[int] = []
        labels: list[int] = []
        questions: list[int] = []

        def put(pieces: Sequence[_Piece], target: bool) -> None:
            for piece in pieces:
                new = self._ids(tokenizer, piece)
                ids.extend(new)
                labels.extend(new if target else [IGNORE_INDEX] * len(new))

        put(self._start(), False)
        for index in range(0, len(turns), 2):
            question = turns[index]
            before, _, after = question.partition(IMAGE_TOKEN)
            text = " ".join(s.strip() for s in (before, after) if s.strip())
            questions.extend(_text_ids(tokenizer, text) if text else [])
            put(self._user(question), False)
            # every human turn is followed by an answer, or (the last one) by the generation
            put(self._answer_header(), False)
            if index + 1 < len(turns):
                put(self._answer(turns[index + 1]), not for_generation)
        return Encoded(ids, labels, questions)

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Ids of the tokens that end an answer (for ``generate(eos_token_id=...)``)."""
        return [i for name in self.stop_tokens for i in self._ids(tokenizer, ("token", name))]

    # -- formats --------------------------------------------------------------------------------
    def _start(self) -> list[_Piece]:
        if self.name == "llama-3":
            return [("token", "<|begin_of_text|>"), *_llama3_header("system"),
                    ("text", self.system), ("token", "<|eot_id|>")]
        if self.name == "vicuna-v1":
            return [("token", "bos"), ("text", self.system + " ")]
        return [("token", "bos")]

    def _user(self, value: str) -> list[_Piece]:
        body = _split_image(value) if self.question_in_prompt else [("image",)]
        if self.name == "llama-3":
            return [*_llama3_header("user"), *body, ("token", "<|eot_id|>")]
        if self.name == "vicuna-v1":
            return [("text", "USER: "), *body]
        if self.name == "qa":
            return [("text", "USER:"), *body]
        return body  # plain

    def _answer_header(self) -> list[_Piece]:
        if self.name == "llama-3":
            return _llama3_header("assistant")
        if self.name == "vicuna-v1":
            return [("text", " ASSISTANT: ")]
        if self.name == "qa":
            return [("text", "ASSISTANT:")]
        return []

    def _answer(self, value: str) -> list[_Piece]:
        end = ("token", "<|eot_id|>") if self.name == "llama-3" else ("token", "eos")
        return [("text", value.strip()), end]

    # -- tokens ---------------------------------------------------------------------------------
    def _ids(self, tokenizer: Any, piece: _Piece) -> list[int]:
        if piece[0] == "text":
            return _text_ids(tokenizer, piece[1]) if piece[1] else []
        if piece[0] == "image":
            return [_token_id(tokenizer, IMAGE_TOKEN, self.name)]
        name = piece[1]
        if name in ("bos", "eos"):
            value = getattr(tokenizer, f"{name}_token_id", None)
            if value is None:
                if name == "bos":
                    return []  # tokenizers without a BOS token (e.g. Qwen) start directly
                raise TemplateError(f"template {self.name!r}: the tokenizer has no eos token")
            return [int(value)]
        return [_token_id(tokenizer, name, self.name)]


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _token_id(tokenizer: Any, token: str, template: str) -> int:
    value = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if value is None or (unk is not None and value == unk and token != tokenizer.unk_token):
        raise TemplateError(f"template {template!r} needs the token {token!r}, which the "
                            f"tokenizer does not have (add it as a special token)")
    return int(value)


def _llama3_header(role: str) -> list[_Piece]:
    return [("token", "<|start_header_id|>"), ("text", role), ("token", "<|end_header_id|>"),
            ("text", "\n\n")]


def _split_image(value: str) -> list[_Piece]:
    if IMAGE_TOKEN not in value:
        return [("text", value)] if value.strip() else []
    before, _, after = value.partition(IMAGE_TOKEN)
    pieces: list[_Piece] = []
    if before.strip():
        pieces.append(("text", before))
    pieces.append(("image",))
    if after.strip():
        pieces.append(("text", after))
    return pieces


def _check_turns(conversations: Sequence[Mapping[str, Any]], for_generation: bool,
                 single_turn: bool, name: str) -> list[str]:
    if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence) \
            or not conversations:
        raise TemplateError("conversations must be a non-empty list of turns")
    values = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise TemplateError(f"turn {i} must be a mapping with 'from' and 'value'")
        expected = "human" if i % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise TemplateError(f"turn {i} is from {turn['from']!r}, expected {expected!r} "
                                f"(turns alternate human, gpt, ... starting with human)")
        if not isinstance(turn["value"], str):
            raise TemplateError(f"turn {i} value must be a string, got "
                                f"{type(turn['value']).__name__}")
        count = turn["value"].count(IMAGE_TOKEN)
        if i == 0 and count != 1:
            raise TemplateError(f"turn 0 must hold {IMAGE_TOKEN!r} exactly once, found {count}")
        if i > 0 and count:
            raise TemplateError(f"turn {i} holds {IMAGE_TOKEN!r}; only the first human turn may")
        values.append(turn["value"])
    last = conversations[-1]["from"]
    if for_generation and last != "human":
        raise TemplateError("a generation prompt must end with a human turn")
    if not for_generation and last != "gpt":
        raise TemplateError("a training conversation must end with a gpt turn (its answer)")
    pairs = (len(values) + 1) // 2
    if single_turn and pairs > 1:
        raise TemplateError(f"template {name!r} takes one human/gpt pair, got {pairs}")
    return values


_TEMPLATES = {
    "qa": ChatTemplate("qa"),
    "plain": ChatTemplate("plain", single_turn=True, question_in_prompt=False),
    "vicuna-v1": ChatTemplate("vicuna-v1", system=VICUNA_SYSTEM),
    "llama-3": ChatTemplate("llama-3", system=LLAMA3_SYSTEM, stop_tokens=("<|eot_id|>",)),
}


def template_names() -> list[str]:
    """The names :func:`get_template` accepts."""
    return sorted(_TEMPLATES)


def get_template(name: str, *, system: str | None = None) -> ChatTemplate:
    """The template called ``name`` (``system`` replaces its system prompt).

    Raises:
        TemplateError: an unknown name (the message lists the known ones).
    """
    if name not in _TEMPLATES:
        raise TemplateError(f"unknown chat template {name!r}; known: {template_names()}")
    template = _TEMPLATES[name]
    return template if system is None else dataclasses.replace(template, system=system)
