"""A port of SliME's released text preprocessing (github yfzhang114/SliME at 5c89ec9:
``llava/conversation.py`` ``Conversation.get_prompt`` for ``conv_vicuna_v1`` / ``conv_llama_3`` /
``conv_llava_plain``, ``llava/mm_utils.py`` ``tokenizer_image_token`` and ``llava/train/train.py``
``preprocess_multimodal`` / ``preprocess_plain`` / ``preprocess_v1`` / ``preprocess_llama3``),
written from what that code does, for comparing :mod:`recipes.templates` with it.

Each ``released_*`` function takes one LLaVA conversation and returns ``Released(input_ids, labels,
flagged)``: ``flagged`` is where the released code prints "WARNING: tokenization mismatch" and
blanks every label (its own bookkeeping failed). The image becomes ``image_id`` (the released code
writes ``IMAGE_TOKEN_INDEX = -200`` there; the library writes the tokenizer's image token id).

Behaviour reproduced on purpose, bookkeeping slips included:

- ``preprocess_multimodal``: a turn holding ``<image>`` becomes ``("<image>\\n" + rest.strip())
  .strip()``, whatever turn it is;
- ``get_prompt``: an empty message is written as ``ROLE:`` without its separator; ``conv_llama_3``
  renders no system block, keeps messages as written and writes ``<|eot_conversation|>`` after each
  answer, removed before tokenising but used to cut rounds;
- ``tokenizer_image_token``: every chunk around ``<image>`` tokenised with the tokenizer's own
  special tokens; when the first chunk starts with BOS, the first id of each later chunk is dropped;
- ``preprocess_v1``: labels start at 1 (a BOS assumed), instruction length = tokens of
  ``"... ASSISTANT: "`` minus 2, one id fewer per later round when the tokenizer is not ``legacy``
  (the released code reads ``tokenizer.legacy`` directly; a tokenizer without the attribute is read
  here as not legacy, as ``preprocess_llama3`` reads it); total length counts ids other than the pad
  id (the released recipe pads with the unknown token);
- ``preprocess_llama3``: labels start at 0, the instruction is everything up to the assistant header
  inclusive, one id fewer per later round when not ``legacy``;
- ``preprocess_plain``: ``"<image>" + answer + "\\n"``, the first ``len(ids of "<image>")`` ids
  ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any

IGNORE = -100
IMAGE = "<image>"
V1_SEP, V1_SEP2 = " ", "</s>"
LLAMA3_SEP2 = "<|eot_conversation|>"


@dataclasses.dataclass(frozen=True)
class Released:
    input_ids: list[int]
    labels: list[int]
    flagged: bool


def multimodal(conv: list[dict[str, str]]) -> list[tuple[str, str]]:
    """``preprocess_multimodal`` on one conversation: ``[(from, value), ...]``."""
    out = []
    for turn in conv:
        value = turn["value"]
        if IMAGE in value:
            value = (IMAGE + "\n" + value.replace(IMAGE, "").strip()).strip()
        out.append((turn["from"], value))
    return out


def prompt_v1(conv, system: str, *, generation: bool = False) -> str:
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    messages = [(roles[who], value) for who, value in multimodal(conv)]
    if generation:
        messages.append(("ASSISTANT", None))
    text = system + V1_SEP
    for i, (role, message) in enumerate(messages):
        text += f"{role}: {message}{(V1_SEP, V1_SEP2)[i % 2]}" if message else f"{role}:"
    return text


def _header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def prompt_llama3(conv, *, generation: bool = False) -> str:
    """``conv_llama_3.get_prompt`` (with its round marker ``<|eot_conversation|>``)."""
    messages = [value for _, value in multimodal(conv)] + ([None] if generation else [])
    text = ""
    for i, message in enumerate(messages):
        if i % 2 == 0:
            text += _header("user") + f"{message}<|eot_id|>"
        elif message is None:
            text += _header("assistant")
        else:
            text += _header("assistant") + f"{message}<|eot_id|>" + LLAMA3_SEP2
    return text


def tokenizer_image_token(tok: Any, prompt: str, image_id: int) -> list[int]:
    chunks = [list(tok(piece).input_ids) for piece in prompt.split(IMAGE)]
    drop = int(bool(chunks[0]) and chunks[0][0] == tok.bos_token_id)
    ids = chunks[0][:1] if drop else []
    for j, chunk in enumerate(chunks):
        if j:
            ids.append(image_id)
        ids.extend(chunk[drop:])
    return ids


def released_plain(tok: Any, conv, image_id: int) -> Released:
    ids = tokenizer_image_token(tok, IMAGE + conv[1]["value"] + "\n", image_id)
    n = len(tokenizer_image_token(tok, IMAGE, image_id))
    return Released(ids, [IGNORE] * n + ids[n:], False)


def _legacy(tok: Any) -> bool:
    return bool(getattr(tok, "legacy", False))


def _finish(ids: list[int], labels: list[int], cur: int, total: int) -> Released:
    labels[cur:] = [IGNORE] * max(0, len(labels) - cur)
    if cur != total:
        return Released(ids, [IGNORE] * len(ids), True)
    return Released(ids, labels, False)


def released_v1(tok: Any, conv, image_id: int, system: str) -> Released:
    text = prompt_v1(conv, system)
    ids = tokenizer_image_token(tok, text, image_id)
    labels = list(ids)
    pad = tok.unk_token_id
    total = sum(1 for i in ids if i != pad)
    sep = V1_SEP + "ASSISTANT: "
    cur = 1
    labels[:cur] = [IGNORE]
    for i, rnd in enumerate(text.split(V1_SEP2)):
        if rnd == "":
            break
        parts = rnd.split(sep)
        if len(parts) != 2:
            break
        round_len = len(tokenizer_image_token(tok, rnd, image_id))
        instruction_len = len(tokenizer_image_token(tok, parts[0] + sep, image_id)) - 2
        if i != 0 and not _legacy(tok):
            round_len, instruction_len = round_len - 1, instruction_len - 1
        labels[cur:cur + instruction_len] = [IGNORE] * len(labels[cur:cur + instruction_len])
        cur += round_len
    return _finish(ids, labels, cur, total)


def released_llama3(tok: Any, conv, image_id: int) -> Released:
    text = prompt_llama3(conv)
    ids = tokenizer_image_token(tok, text.replace(LLAMA3_SEP2, ""), image_id)
    labels = list(ids)
    sep = _header("assistant")
    cur = 0
    for i, rnd in enumerate(text.split(LLAMA3_SEP2)):
        if rnd == "":
            break
        parts = rnd.split(sep)
        if len(parts) != 2:
            break
        round_len = len(tokenizer_image_token(tok, rnd, image_id))
        instruction_len = len(tokenizer_image_token(tok, parts[0] + sep, image_id))
        if i != 0 and not _legacy(tok):
            round_len, instruction_len = round_len - 1, instruction_len - 1
        labels[cur:cur + instruction_len] = [IGNORE] * len(labels[cur:cur + instruction_len])
        cur += round_len
    return _finish(ids, labels, cur, len(ids))
