"""The tokenizer's own chat template (any LLM without a SliME format), under the rules of
:mod:`recipes.templates`: every token after an answer's generation prompt is labelled up to the
answer's last special token, the router reads the turn that holds the image, and every answer's
generation prompt must tokenise to a prefix of the training ids.

Use it through :func:`recipes.templates.encode_chat` / :func:`recipes.templates.chat_stop_token_ids`
with ``template=None``.
"""

from __future__ import annotations

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
    require_fast,
    router_ids,
    token_id,
)

_NAME = "chat_template"
__all__ = ["chat_template_stop_ids", "encode_with_chat_template"]


def encode_with_chat_template(tokenizer: Any, conversations: Sequence[Mapping[str, Any]], *,
                              system: str | None = None, for_generation: bool = False,
                              image_token: str = IMAGE_TOKEN) -> Encoded:
    """See :func:`recipes.templates.encode_chat` (``template=None``)."""
    turns = check_turns(conversations, for_generation, False, _NAME)
    require_fast(tokenizer, _NAME)
    image_id = token_id(tokenizer, image_token, _NAME)
    if system is not None and IMAGE_TOKEN in system:
        raise TemplateError(f"system must not hold {IMAGE_TOKEN!r}")
    messages = [] if system is None else [{"role": "system", "content": system}]
    for i, value in enumerate(turns):
        if i == 0:  # the placeholder first, as the SliME formats put it
            rest = value.replace(IMAGE_TOKEN, "").strip()
            value = image_token + ("\n" + rest if rest else "")
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": value})
    head = len(messages) - len(turns)
    ids = _ids(tokenizer, _render(tokenizer, messages, for_generation))
    check_image_once(ids, image_id, image_token, _NAME)
    labels = [IGNORE_INDEX] * len(ids)
    specials = _special_ids(tokenizer)
    answers = () if for_generation else range(head + 1, len(messages), 2)  # their indices
    for turn, k in enumerate(answers):
        first = check_prefix(tokenizer, _ids(tokenizer, _render(tokenizer, messages[:k], True)),
                             ids, turn, _NAME)
        through = _ids(tokenizer, _render(tokenizer, messages[:k + 1], False))
        if ids[:len(through)] != through or len(through) <= first:
            raise TemplateError(f"the tokenizer's chat template renders the conversation up to "
                                f"answer {turn + 1} differently from the whole conversation, so "
                                f"its tokens cannot be labelled")
        ends = [i for i in range(first, len(through)) if ids[i] in specials]
        last = ends[-1] + 1 if ends else len(through)
        labels[first:last] = ids[first:last]
    return Encoded(ids, labels, router_ids(tokenizer, turns[0]))


def chat_template_stop_ids(tokenizer: Any) -> list[int]:
    """The EOS id and the special tokens that end an assistant turn in the tokenizer's chat
    template (found by rendering a one-turn conversation)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise TemplateError(f"template {_NAME!r}: the tokenizer has no eos token")
    probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "ok"}]
    prompt = _ids(tokenizer, _render(tokenizer, probe[:1], True))
    whole = _ids(tokenizer, _render(tokenizer, probe, False))
    specials = _special_ids(tokenizer)
    out = [int(eos)]
    out += [i for i in whole[len(prompt):] if i in specials and i not in out]
    return out


def _render(tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat_template; name a SliME format instead "
                            "(vicuna-v1, llama-3, plain, ...)")
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation)


def _ids(tokenizer: Any, text: str) -> list[int]:
    # as apply_chat_template(tokenize=True): the template writes its own start token, if any
    return [int(i) for i in tokenizer(text, add_special_tokens=False).input_ids]


def _special_ids(tokenizer: Any) -> set[int]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {int(i) for i, t in added.items()
                                             if getattr(t, "special", False)}
