"""What every chat format in :mod:`recipes.templates` shares: the encoded form, the structure
check of a LLaVA conversation, the router-text rule, the generation-prompt prefix check and token
look-ups."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100


class TemplateError(ValueError):
    """A conversation does not fit the template, or an unknown template or token was named."""


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One tokenised conversation (plain Python lists; the collator makes tensors)."""

    input_ids: list[int]
    labels: list[int]
    question_ids: list[int]


def router_ids(tokenizer: Any, first_question: str) -> list[int]:
    """The router's text: the turn that holds the image, without the placeholder."""
    before, _, after = first_question.partition(IMAGE_TOKEN)
    text = " ".join(s.strip() for s in (before, after) if s.strip())
    return text_ids(tokenizer, text) if text else []


def check_prefix(tokenizer: Any, prompt_ids: list[int], ids: list[int], turn: int,
                 name: str) -> int:
    """``len(prompt_ids)``, checked to be a prefix of ``ids``."""
    if ids[:len(prompt_ids)] != prompt_ids:
        at = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b),
                  min(len(prompt_ids), len(ids)))
        raise TemplateError(
            f"template {name!r}: this tokenizer tokenises the generation prompt of answer "
            f"{turn + 1} differently from the training sequence (they part at token {at}: "
            f"{show(tokenizer, prompt_ids[at:at + 2])} vs {show(tokenizer, ids[at:at + 2])}), "
            f"so generation would not see what training saw")
    return len(prompt_ids)


def check_image_once(ids: list[int], image_id: int, image_token: str, name: str) -> None:
    if ids.count(image_id) != 1:
        raise TemplateError(f"template {name!r}: the image token {image_token!r} must appear "
                            f"once, where {IMAGE_TOKEN!r} is; the text holds it "
                            f"{ids.count(image_id) - 1} more time(s)")


def require_fast(tokenizer: Any, name: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError(f"template {name!r} needs a fast (Rust-backed) tokenizer: the answers "
                            f"are labelled by character offsets, which {type(tokenizer).__name__} "
                            f"does not give")


def text_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def show(tokenizer: Any, ids: list[int]) -> str:
    return repr(tokenizer.convert_ids_to_tokens(ids)) if ids else "(end)"


def known_token_id(tokenizer: Any, token: str) -> int | None:
    """The id of ``token`` in the vocabulary; ``None`` when the tokenizer does not hold it (it maps
    it to nothing, or to the unknown token)."""
    value = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if value is None or (unk is not None and value == unk and token != tokenizer.unk_token):
        return None
    return int(value)


def token_id(tokenizer: Any, token: str, template: str) -> int:
    value = known_token_id(tokenizer, token)
    if value is None:
        raise TemplateError(f"template {template!r} needs the token {token!r}, which the "
                            f"tokenizer does not have (add it as a special token)")
    return value


def check_turns(conversations: Sequence[Mapping[str, Any]], for_generation: bool,
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
