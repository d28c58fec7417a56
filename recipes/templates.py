"""Chat templates: LLaVA-format conversations to token ids with the loss on the answers only.

A conversation is a list of LLaVA turns ``{"from": "human" | "gpt", "value": str}`` that starts
with a human turn and alternates; the first human turn holds the image placeholder ``<image>``
exactly once (no other turn may hold it). As LLaVA's ``preprocess_multimodal`` does, the placeholder
is moved to the front of that turn: ``"<image>\\n" + rest.strip()``. :meth:`ChatTemplate.encode`
returns

- ``input_ids``: the whole prompt and answers; the placeholder becomes the tokenizer's id of the
  model's image token (one id that :func:`slime_adapters.splice.splice_into_embeddings` expands);
- ``labels``: ``input_ids`` on the answers and on the tokens of the stop text that ends each
  answer, ``-100`` (ignored) everywhere else (everywhere in a generation prompt);
- ``question_ids``: the text of every human turn without the placeholder, for the router.

The template renders the conversation as one string, character for character what LLaVA's
``Conversation.get_prompt`` / ``preprocess_*`` build (:meth:`ChatTemplate.prompt_text` returns
it), and tokenises it the way LLaVA's ``tokenizer_image_token`` does: one call for the text before
the placeholder and one for the text after it (``add_special_tokens=False``, so the stop tokens
written in the string, e.g. ``</s>`` or ``<|eot_id|>``, are matched as the tokenizer's special
tokens), the image id between them and the tokenizer's BOS id in front where the template starts
with BOS and the tokenizer has one (LLaVA's ids carry a BOS only when the tokenizer adds one itself,
as Llama's and Vicuna's do: for those the ids are LLaVA's exactly).
Tokenising the two sides apart matters for SentencePiece tokenizers
(``Metaspace(prepend_scheme="first")``): the text after the image starts with ``"▁"`` exactly as
in LLaVA, where one call over the whole string would drop it. A token is labelled iff its
character span (``return_offsets_mapping``, so a fast tokenizer is required) overlaps an answer's
span (the answer text and its stop text). A generation prompt (``for_generation=True``: the
conversation ends with a human turn) is the training string cut where the last answer starts;
encoding a training conversation checks that the ids of its last generation prompt are a prefix.

Templates (``get_template(name)``; ``{eos}`` is the tokenizer's EOS text, ``</s>`` for Vicuna):

- ``qa`` (the demo's): ``<bos>USER: <image>\\n{q} ASSISTANT: {a}{eos}USER: {q2} ASSISTANT: ...``
- ``plain``: LLaVA's pre-training format ``<bos><image>{a}\\n``; the human text is not in the
  prompt (it still drives the router); exactly one human/gpt pair; answers end with ``\\n``.
- ``vicuna-v1`` (LLaVA's ``conv_vicuna_v1``):
  ``<bos>{system} USER: <image>\\n{q} ASSISTANT: {a}{eos}USER: {q2} ASSISTANT: {a2}{eos}``;
  a generation prompt ends with ``ASSISTANT:``.
- ``llama-3`` (Meta's format, every message stripped): ``<|begin_of_text|>``, then
  ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{message}<|eot_id|>`` for the system prompt
  and every turn (roles ``system``, ``user``, ``assistant``); a generation prompt ends with the
  assistant header.
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
_LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

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


@dataclasses.dataclass(frozen=True)
class _Rendered:
    text: str  # holds IMAGE_TOKEN once, at image_at
    image_at: int
    answers: tuple[tuple[int, int], ...]  # [start of the answer, end of its stop text)
    stops: tuple[tuple[int, int], ...]  # the stop texts' spans


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A chat format: what goes before, between and after the turns.

    ``stop_tokens`` names what ends an answer: ``"eos"`` (the tokenizer's EOS token) or a literal
    token or text; the first one is written after every answer, and all of them stop generation.
    """

    name: str
    system: str = ""
    single_turn: bool = False
    question_in_prompt: bool = True
    stop_tokens: tuple[str, ...] = ("eos",)

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
        _check_turns(conversations, for_generation, self.single_turn, self.name)

    def prompt_text(self, conversations: Sequence[Mapping[str, Any]], *,
                    for_generation: bool = False, eos_token: str = "</s>") -> str:
        """The string the conversation is rendered as, ``<image>`` in it and without the BOS
        token (LLaVA's ``get_prompt``); ``eos_token`` is the text written for ``"eos"``.

        Raises:
            TemplateError: as :meth:`check`.
        """
        turns = _check_turns(conversations, for_generation, self.single_turn, self.name)
        return self._render(turns, self._stop_text_for(eos_token)).text

    def encode(self, tokenizer: Any, conversations: Sequence[Mapping[str, Any]], *,
               for_generation: bool = False, image_token: str = IMAGE_TOKEN) -> Encoded:
        """Token ids, labels and question ids of ``conversations`` (see the module docstring).

        ``image_token`` is the model's image token: the placeholder ``<image>`` the data writes
        becomes its id, exactly once.

        Raises:
            TemplateError: everything :meth:`check` raises; the tokenizer is not a fast one (the
                labels need character offsets); it lacks the image token, an EOS token or a token
                the template needs; its text holds the image token outside the placeholder; it
                turns an answer's stop text into no token; or (training) the ids of the
                generation prompt are not a prefix of the training ids.
        """
        turns = _check_turns(conversations, for_generation, self.single_turn, self.name)
        if not getattr(tokenizer, "is_fast", False):
            raise TemplateError(f"template {self.name!r} needs a fast (Rust-backed) tokenizer: the "
                                f"answers are labelled by character offsets, which "
                                f"{type(tokenizer).__name__} does not give")
        for token in self._special_tokens():
            _token_id(tokenizer, token, self.name)
        image_id = _token_id(tokenizer, image_token, self.name)
        rendered = self._render(turns, self._stop_text(tokenizer))
        ids, spans = self._tokenise(tokenizer, rendered, image_id)
        if ids.count(image_id) != 1:
            raise TemplateError(f"template {self.name!r}: the image token {image_token!r} must "
                                f"appear once, where {IMAGE_TOKEN!r} is; the text holds it "
                                f"{ids.count(image_id) - 1} more time(s)")
        for start, end in rendered.stops:
            if not any(s < end and e > start for s, e in spans):
                raise TemplateError(f"template {self.name!r} ends each answer with "
                                    f"{rendered.text[start:end]!r}, which the tokenizer turns "
                                    f"into no token")
        answers = () if for_generation else rendered.answers
        # a token with an empty span (whitespace under trim_offsets) is labelled when it lies
        # strictly inside an answer
        labels = [i if any((s < a_end and e > a_start) if e > s else a_start < s < a_end
                           for a_start, a_end in answers)
                  else IGNORE_INDEX for i, (s, e) in zip(ids, spans)]
        if not for_generation:
            prompt = self._render(turns[:-1], self._stop_text(tokenizer))
            prompt_ids, _ = self._tokenise(tokenizer, prompt, image_id)
            if ids[:len(prompt_ids)] != prompt_ids:
                at = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b),
                          min(len(prompt_ids), len(ids)))
                raise TemplateError(
                    f"template {self.name!r}: this tokenizer tokenises the generation prompt "
                    f"differently from the start of the training sequence (they part at token "
                    f"{at}: {_show(tokenizer, prompt_ids[at:at + 2])} vs "
                    f"{_show(tokenizer, ids[at:at + 2])}), so generation would not see what "
                    f"training saw")
        questions: list[int] = []
        for question in turns[0::2]:
            before, _, after = question.partition(IMAGE_TOKEN)
            text = " ".join(s.strip() for s in (before, after) if s.strip())
            questions.extend(_text_ids(tokenizer, text) if text else [])
        return Encoded(ids, labels, questions)

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
            value = _known_token_id(tokenizer, name)
            if value is not None:
                out.append(value)
                continue
            ids = _text_ids(tokenizer, name)
            if not ids:
                raise TemplateError(f"template {self.name!r} ends answers with {name!r}, which "
                                    f"the tokenizer turns into no token")
            out.append(ids[-1])
        return out

    # -- formats --------------------------------------------------------------------------------
    def _special_tokens(self) -> tuple[str, ...]:
        return _LLAMA3_TOKENS if self.name == "llama-3" else ()

    def _bos(self) -> bool:
        return self.name != "llama-3"  # llama-3 writes <|begin_of_text|> in the string

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

    def _render(self, turns: Sequence[str], stop: str) -> _Rendered:
        # (kind, text) pieces; kinds "text", "image", "answer", "stop"
        pieces: list[tuple[str, str]] = []
        llama3 = self.name == "llama-3"
        if llama3:
            pieces.append(("text", "<|begin_of_text|>"))
            if self.system:
                pieces.append(("text", _llama3_header("system") + self.system.strip()
                               + "<|eot_id|>"))
        elif self.name == "vicuna-v1":
            pieces.append(("text", self.system + " "))
        for index in range(0, len(turns), 2):
            human = _human_pieces(turns[index], index == 0, self.question_in_prompt, llama3)
            if llama3:
                pieces += [("text", _llama3_header("user")), *human,
                           ("text", "<|eot_id|>" + _llama3_header("assistant"))]
            elif self.name in ("vicuna-v1", "qa"):
                pieces += [("text", "USER: "), *human, ("text", " ASSISTANT:")]
            else:  # plain
                pieces += human
            if index + 1 < len(turns):
                answer = turns[index + 1]
                if llama3:
                    answer = answer.strip()
                elif self.name != "plain":
                    pieces.append(("text", " "))
                pieces += [("answer", answer), ("stop", stop)]
        text, image_at, answers, stops, start = "", -1, [], [], 0
        for kind, piece in pieces:
            if kind == "image":
                image_at = len(text)
            elif kind == "answer":
                start = len(text)
            text += piece
            if kind == "stop":
                answers.append((start, len(text)))
                stops.append((len(text) - len(piece), len(text)))
        return _Rendered(text, image_at, tuple(answers), tuple(stops))

    # -- tokens ---------------------------------------------------------------------------------
    def _tokenise(self, tokenizer: Any, rendered: _Rendered,
                  image_id: int) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character spans: BOS, the text before the image, the image, the text after."""
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        bos = getattr(tokenizer, "bos_token_id", None)
        if self._bos() and bos is not None:  # tokenizers without BOS (e.g. Qwen) start directly
            ids.append(int(bos))
            spans.append((0, 0))
        after_at = rendered.image_at + len(IMAGE_TOKEN)
        self._extend(tokenizer, rendered.text[:rendered.image_at], 0, ids, spans)
        ids.append(image_id)
        spans.append((rendered.image_at, after_at))
        self._extend(tokenizer, rendered.text[after_at:], after_at, ids, spans)
        return ids, spans

    @staticmethod
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
    # LLaVA's preprocess_multimodal: the placeholder first, then a newline and the stripped text
    rest = value.replace(IMAGE_TOKEN, "").strip()
    return [("image", IMAGE_TOKEN)] + ([("text", "\n" + rest)] if rest and in_prompt else [])


def _llama3_header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _show(tokenizer: Any, ids: list[int]) -> str:
    return repr(tokenizer.convert_ids_to_tokens(ids)) if ids else "(end)"


def _known_token_id(tokenizer: Any, token: str) -> int | None:
    """The id of ``token`` in the vocabulary; ``None`` when the tokenizer does not hold it (it maps
    it to nothing, or to the unknown token)."""
    value = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if value is None or (unk is not None and value == unk and token != tokenizer.unk_token):
        return None
    return int(value)


def _token_id(tokenizer: Any, token: str, template: str) -> int:
    value = _known_token_id(tokenizer, token)
    if value is None:
        raise TemplateError(f"template {template!r} needs the token {token!r}, which the "
                            f"tokenizer does not have (add it as a special token)")
    return value


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
    "plain": ChatTemplate("plain", single_turn=True, question_in_prompt=False,
                          stop_tokens=("\n", "eos")),
    "vicuna-v1": ChatTemplate("vicuna-v1", system=VICUNA_SYSTEM),
    "llama-3": ChatTemplate("llama-3", system=LLAMA3_SYSTEM, stop_tokens=("<|eot_id|>",)),
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
