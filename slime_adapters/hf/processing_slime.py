"""``SliMEImageProcessor`` (the adaptive slicer as a Hugging Face image processor) and
``SliMEProcessor`` (tokenizer + image processor + chat template).

Shapes of what they return (a :class:`transformers.BatchFeature` of tensors)::

    pixel_values       (b, 3, T, T)  global views          tile_pixel_values (P, 3, T, T) tiles
    image_grids        (b, 2)        (cols, rows) per image
    input_ids, attention_mask  (n, t)  one image placeholder per image
    question_ids, question_mask (n, l) the text that steers the router (the human turns)
    labels             (n, t)        with a conversation that ends with an answer: the answers'
                                     ids, -100 elsewhere
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import BatchFeature, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor

from slime_adapters.slicing.batch import SlicedImage, collate
from slime_adapters.slicing.config import SlicerConfig
from slime_adapters.slicing.slicer import AdaptiveSlicer
from slime_adapters.hf.configuration_slime import encoder_kind

__all__ = ["SliMEImageProcessor", "SliMEProcessor", "conversation_turns"]

_SLICER_KEYS = tuple(f for f in SlicerConfig.__dataclass_fields__ if f != "kind")


class SliMEImageProcessor(BaseImageProcessor):
    """:class:`slime_adapters.AdaptiveSlicer` as an image processor: each image becomes a global
    view and its tiles, normalised with the encoder's own mean and std.

    Keyword arguments are :class:`slime_adapters.SlicerConfig`'s fields (``tile_size``,
    ``max_tiles``, ``policy``, ``mean``, ``std``, ...). :meth:`for_encoder` takes the tile size
    and normalisation from a vision config (and the encoder folder's own
    ``preprocessor_config.json`` when there is one).

    Raises:
        ValueError: a keyword the slicer does not have or refuses.
    """

    model_input_names = ["pixel_values", "tile_pixel_values", "image_grids"]

    def __init__(self, **kwargs: Any) -> None:
        settings = {k: kwargs.pop(k) for k in list(kwargs) if k in _SLICER_KEYS}
        kwargs.pop("image_processor_type", None)
        unknown = sorted(k for k in kwargs if not k.startswith("_")
                         and k not in ("processor_class", "auto_map"))
        if unknown:
            raise ValueError(f"SliMEImageProcessor: unknown keyword(s) {unknown}; the slicer's "
                             f"are {list(_SLICER_KEYS)}")
        super().__init__(**kwargs)
        try:
            self.slicer = AdaptiveSlicer(**settings)
        except TypeError as exc:
            raise ValueError(f"SliMEImageProcessor: {exc}") from exc
        for key in _SLICER_KEYS:
            value = getattr(self.slicer.config, key)
            setattr(self, key, list(value) if isinstance(value, tuple) else value)

    @classmethod
    def for_encoder(cls, vision_config, encoder_folder: str | Path | None = None,
                    **slicer: Any) -> SliMEImageProcessor:
        """The processor for an encoder: tile size = its ``image_size``; mean / std from
        ``encoder_folder/preprocessor_config.json`` (``image_mean`` / ``image_std``) when it
        exists, else the encoder family's (CLIP's or SigLIP's). ``slicer`` overrides any key."""
        _, _, mean, std = encoder_kind(vision_config)
        settings = {"tile_size": int(vision_config.image_size), "mean": mean, "std": std}
        own = Path(encoder_folder) / "preprocessor_config.json" if encoder_folder else None
        if own is not None and own.is_file():
            try:
                data = json.loads(own.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{str(own)!r} is not valid JSON: {exc}") from exc
            for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
                if isinstance(data, dict) and data.get(theirs) is not None:
                    settings[ours] = tuple(data[theirs])
        settings.update(slicer)
        return cls(**settings)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("slicer", None)
        return out

    def slice(self, images: Any) -> list[SlicedImage]:
        """Slice one image or a list (paths, PIL images, bytes, uint8 tensors, or already
        :class:`SlicedImage`); the slicer's errors name the input."""
        if images is None:
            return []
        if not isinstance(images, list | tuple):
            images = [images]
        return [im if isinstance(im, SlicedImage) else self.slicer(im) for im in images]

    def __call__(self, images: Any, return_tensors: str | None = "pt", **_: Any) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors)

    def preprocess(self, images: Any, return_tensors: str | None = "pt") -> BatchFeature:
        """``BatchFeature`` of ``pixel_values``, ``tile_pixel_values`` and ``image_grids``."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"SliMEImageProcessor returns torch tensors only, got "
                             f"return_tensors={return_tensors!r}")
        sliced = self.slice(images)
        if not sliced:
            raise ValueError("SliMEImageProcessor: no images given")
        batch = collate(sliced)
        return BatchFeature({"pixel_values": batch.global_views, "tile_pixel_values": batch.tiles,
                             "image_grids": batch.grids})


def conversation_turns(conversation: Sequence[Mapping[str, Any]], image_token: str
                       ) -> tuple[list[dict[str, str]], list[Any]]:
    """LLaVA turns (``{"from": "human" | "gpt", "value": ...}``) and the images of a
    conversation given in either LLaVA's form or Hugging Face's (``{"role": "user" |
    "assistant", "content": str | [{"type": "image", "image": ...}, {"type": "text", "text":
    ...}]}``). An image item becomes the placeholder ``image_token`` at its place in the text.

    Raises:
        ValueError: an unknown role or content item, or a system message (the chat template
            writes its own system prompt).
    """
    turns, images = [], []
    roles = {"user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt"}
    for i, msg in enumerate(conversation):
        if not isinstance(msg, Mapping):
            raise ValueError(f"conversation[{i}] must be a dict, got {type(msg).__name__}")
        if "from" in msg:
            turns.append({"from": msg["from"], "value": msg.get("value")})
            continue
        role = msg.get("role")
        if role == "system":
            raise ValueError(f"conversation[{i}]: system messages are not supported; the chat "
                             "template writes its own system prompt")
        if role not in roles:
            raise ValueError(f"conversation[{i}]: unknown role {role!r} (user or assistant)")
        content = msg.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            parts = []
            for j, item in enumerate(content):
                kind = item.get("type") if isinstance(item, Mapping) else None
                if kind == "image":
                    parts.append(image_token)
                    image = item.get("image", item.get("url", item.get("path")))
                    if image is not None:
                        images.append(image)
                elif kind == "text":
                    parts.append(str(item.get("text", "")))
                else:
                    raise ValueError(f"conversation[{i}].content[{j}]: type must be 'image' or "
                                     f"'text', got {kind!r}")
            text = "\n".join(parts)
        else:
            raise ValueError(f"conversation[{i}].content must be a string or a list of items")
        turns.append({"from": roles[role], "value": text})
    return turns, images


def _encode_turns(template: str | None, tokenizer, turns, *, for_generation: bool,
                  image_token: str):
    """The one place that renders and labels a conversation: a named SliME chat format, or the
    tokenizer's own chat template for ``None`` (:func:`recipes.templates.encode_chat`)."""
    from recipes.templates import encode_chat

    return encode_chat(tokenizer, turns, template=template, for_generation=for_generation,
                       image_token=image_token)


def _prompt_text(template: str | None, tokenizer, turns, *, for_generation: bool) -> str:
    if template is None:
        raise ValueError("tokenize=False needs a named chat format (the processor's template "
                         "is the tokenizer's own chat template)")
    from recipes.templates import get_template

    return get_template(template).prompt_text(turns, for_generation=for_generation,
                                              eos_token=tokenizer.eos_token or "</s>")


class SliMEProcessor(ProcessorMixin):
    """Tokenizer + :class:`SliMEImageProcessor` + a SliME chat format (``template``: a
    :func:`recipes.templates.get_template` name: ``qa``, ``plain``, ``vicuna-v1``, ``llama-3``,
    ...; ``None``: the tokenizer's own chat template).

    ``processor(images=..., text=...)`` tokenises prompts that are already written (one
    ``image_token`` per image; the whole text without the placeholder steers the router);
    :meth:`apply_chat_template` writes the prompt with the chat format, marks the question for
    the router and, for a conversation that ends with an answer, the labels.
    """

    def __init__(self, image_processor=None, tokenizer=None, template: str | None = "qa",
                 image_token: str = "<image>", chat_template=None, **kwargs) -> None:
        self.template = template
        self.image_token = image_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "question_ids", "question_mask",
                *self.image_processor.model_input_names]

    def _pad(self, rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, r in enumerate(rows):  # host-side batching of token lists, not a model forward
            if r:
                if left:
                    out[i, width - len(r):] = torch.tensor(r)
                else:
                    out[i, :len(r)] = torch.tensor(r)
        return out

    def _batch(self, rows: dict[str, list[list[int]]], images: list[Any]) -> BatchFeature:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        data = {"input_ids": self._pad(rows["input_ids"], pad, left),
                "attention_mask": self._pad([[1] * len(r) for r in rows["input_ids"]], 0, left)}
        # a question with no text (the template took it all) routes as "no text"
        q = [r or [pad] for r in rows["question_ids"]]
        data["question_ids"] = self._pad(q, pad, False)
        data["question_mask"] = self._pad([[int(bool(r))] * len(qq) for r, qq in
                                           zip(rows["question_ids"], q)], 0, False).bool()
        if "labels" in rows:
            data["labels"] = self._pad(rows["labels"], -100, left)
        found = int((data["input_ids"] == self.image_token_id).sum())
        if found != len(images):
            raise ValueError(f"the text holds {found} image placeholder(s) "
                             f"({self.image_token!r}) but {len(images)} image(s) were given")
        if images:
            data.update(self.image_processor(images))
        return BatchFeature(data)

    def __call__(self, images: Any = None, text: str | list[str] | None = None,
                 **_: Any) -> BatchFeature:
        """Tokenise written prompts (one ``image_token`` per image, images in order).

        Raises:
            ValueError: no text, or placeholders and images that do not match in number.
        """
        if text is None:
            raise ValueError("SliMEProcessor needs text (with one image placeholder per image)")
        texts = [text] if isinstance(text, str) else list(text)
        images = self.image_processor.slice(images)
        tok = self.tokenizer
        rows = {"input_ids": [tok(t, add_special_tokens=False)["input_ids"] for t in texts]}
        bos = getattr(tok, "bos_token_id", None)
        rows["input_ids"] = [([bos] if bos is not None else []) + r for r in rows["input_ids"]]
        rows["question_ids"] = [tok(t.replace(self.image_token, " ").strip(),
                                    add_special_tokens=False)["input_ids"] for t in texts]
        return self._batch(rows, images)

    def apply_chat_template(self, conversation, add_generation_prompt: bool | None = None,
                            tokenize: bool = True, return_dict: bool = True, images=None,
                            **_: Any):
        """Render one conversation (a list of messages) or a batch of them with the processor's
        chat format. Messages are Hugging Face's (``role`` / ``content``, image items carry their
        image) or LLaVA's (``from`` / ``value`` with ``<image>``; pass the images in
        ``images``). A conversation that ends with a user turn gets a generation prompt;
        one that ends with an answer gets ``labels`` on its answers (``add_generation_prompt``
        must then be false or None).

        Returns:
            The prompt string(s) when ``tokenize`` is false, else a :class:`BatchFeature` with
            the model's inputs (the ids alone when ``return_dict`` is false).

        Raises:
            ValueError: a conversation the chat format refuses (naming the problem),
                placeholders and images that do not match.
        """
        single = bool(conversation) and isinstance(conversation[0], Mapping)
        batch = [conversation] if single else list(conversation)
        extra = self.image_processor.slice(images)
        rows: dict[str, list[list[int]]] = {"input_ids": [], "question_ids": [], "labels": []}
        texts, all_images = [], []
        for conv in batch:
            turns, found = conversation_turns(conv, self.image_token)
            gen = turns[-1]["from"] == "human" if turns else True
            if add_generation_prompt and not gen:
                raise ValueError("add_generation_prompt=True but the conversation ends with an "
                                 "answer")
            all_images += found
            if not tokenize:
                texts.append(_prompt_text(self.template, self.tokenizer, turns,
                                          for_generation=gen))
                continue
            enc = _encode_turns(self.template, self.tokenizer, turns, for_generation=gen,
                                image_token=self.image_token)
            rows["input_ids"].append(enc.input_ids)
            rows["question_ids"].append(enc.question_ids)
            rows["labels"].append(enc.labels)
        if not tokenize:
            return texts[0] if single else texts
        if all(all(x == -100 for x in r) for r in rows["labels"]):
            del rows["labels"]
        out = self._batch(rows, self.image_processor.slice(all_images) + extra)
        return out if return_dict else out["input_ids"]
