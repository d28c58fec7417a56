"""Data for the recipes: LLaVA-format conversations, a generated task, answer-only labels.

A LLaVA-format record is ``{"id": ..., "image": "relative/path.png", "conversations": [{"from":
"human", "value": "<image>\\nQuestion?"}, {"from": "gpt", "value": "Answer."}, ...]}``.

:func:`make_color_dataset` writes such a dataset itself (no download): images of varied sizes and
aspect ratios with one small coloured square somewhere, and the question "what color is the
square?". The square is small next to the whole image, so the global 336-px view blurs it and the
local tiles are what makes the answer easy.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from recipes.templates import IGNORE_INDEX, IMAGE_TOKEN, ChatTemplate, TemplateError, get_template
from slime_adapters.config import atomic_write_text
from slime_adapters.slicing import AdaptiveSlicer, SlicedImage, SlicePlan, SlicingError, collate

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 30),
    "purple": (150, 40, 190),
    "orange": (245, 140, 20),
}
QUESTIONS = ("what color is the square ?", "which color does the small square have ?")
_SHOWN = 5  # bad records listed by name when a dataset opens
SIZES = ((336, 336), (672, 336), (336, 672), (600, 480), (900, 500), (400, 1000), (1008, 672))


def make_color_dataset(out_dir: str | Path, num: int, *, seed: int = 0,
                       square: int = 28, clutter: int = 12) -> Path:
    """Write ``num`` generated images and ``data.json`` (LLaVA format) into ``out_dir``.

    ``clutter`` low-contrast rectangles are drawn before the square. Returns the path of
    ``data.json``. Files are written before the index, which is written
    atomically, so an interrupted call leaves no index that points at missing images."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(num):
        w, h = rng.choice(SIZES)
        color = rng.choice(sorted(COLORS))
        base = [rng.randrange(60, 200) for _ in range(3)]
        img = Image.new("RGB", (w, h), tuple(base))
        # low-contrast clutter so the square is not the only structure in the image
        for _ in range(clutter):
            x0, y0 = rng.randrange(0, w - 40), rng.randrange(0, h - 40)
            shade = tuple(min(255, max(0, c + rng.randrange(-40, 40))) for c in base)
            img.paste(shade, (x0, y0, x0 + rng.randrange(20, 80), y0 + rng.randrange(20, 80)))
        x0, y0 = rng.randrange(0, w - square), rng.randrange(0, h - square)
        img.paste(COLORS[color], (x0, y0, x0 + square, y0 + square))
        name = f"img_{i:05d}.png"
        img.save(out / name)
        records.append({
            "id": f"color-{i}",
            "image": name,
            "conversations": [
                {"from": "human", "value": f"{IMAGE_TOKEN}\n{rng.choice(QUESTIONS)}"},
                {"from": "gpt", "value": color},
            ],
        })
    index = out / "data.json"
    atomic_write_text(index, json.dumps(records, indent=1))
    return index


def build_word_tokenizer(extra_words: Sequence[str] = ()):
    """A word-level Hugging Face tokenizer over the generated task's words (built in code, offline).

    Special tokens: ``<pad>`` ``<unk>`` ``<s>`` ``</s>`` and the image placeholder ``<image>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN, "USER:", "ASSISTANT:"]
    for q in QUESTIONS:
        words += q.split()
    words += sorted(COLORS) + list(extra_words)
    vocab: dict[str, int] = {}
    for wd in words:
        vocab.setdefault(wd, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=[IMAGE_TOKEN])


@dataclass
class Example:
    """One tokenised conversation turn with its sliced image."""

    image: SlicedImage
    input_ids: torch.Tensor  # (t,) prompt + answer
    labels: torch.Tensor  # (t,) -100 on the prompt
    question_ids: torch.Tensor  # (l,) the question alone, for the router
    answer: str  # the last answer of the conversation
    record: str = ""  # "record N (id ...)" for messages
    truncated: int = 0  # text tokens cut off the end to fit max_length


class LlavaJsonDataset(torch.utils.data.Dataset):
    """A LLaVA-format JSON file: every record's image sliced and its whole conversation tokenised
    by a chat template (:mod:`recipes.templates`), the loss on the answers only.

    Every record is checked when the dataset opens (structure only: no tokenising, no image
    reading), so a bad record stops the run before it starts. Text-only records (no ``"image"``;
    LLaVA-665K holds about 40k) are skipped with a warning; ``skipped_text_only`` counts them and
    ``records`` holds the others.

    Args:
        index: the JSON list of records.
        tokenizer: a fast Hugging Face tokenizer holding ``image_token``.
        slicer: turns each record's image into a global view and tiles.
        template: a :func:`recipes.templates.get_template` name (or a template).
        image_root: the folder image paths are relative to (default: the index's folder).
        image_token: the model's image token; the data's ``<image>`` placeholder becomes its id.
        max_length: the LLM's positions (``None``: no limit). A conversation whose text plus
            visual tokens exceeds it loses text tokens at its end (:attr:`Example.truncated`
            counts them); never a visual token, and never all of its answer tokens: such a
            record raises ``ValueError`` naming it and the lengths.
        visual_tokens: the visual tokens an image costs the LLM, from its slice plan (needed
            with ``max_length``; e.g. a :func:`functools.partial` of
            :func:`slime_adapters.slicing.visual_token_count`).
        check_images: slice every record's image when the dataset opens (the slicer's checks:
            existence, size, aspect ratio, decodability) and raise one ``ValueError`` listing
            every bad record.
        skip_bad_images: drop the records whose image fails that check (``skipped_bad_images``
            counts them, with a warning) instead of raising; implies ``check_images``.

    Raises:
        FileNotFoundError: ``index`` is missing.
        ValueError: ``index`` is not a JSON list; one ``ValueError`` for all the records that are
            not a mapping, have an ``image`` that is not a string, or a conversation that does not
            fit the template (it gives their count and the first few as index, id and reason);
            no record has an image; an unknown template. Reading a record raises ``ValueError``
            naming the record when the tokenizer refuses it, and the slicer's error (naming the
            file) when its image is missing or broken.
    """

    def __init__(self, index: str | Path, *, tokenizer, slicer: AdaptiveSlicer,
                 template: str | ChatTemplate = "qa",
                 image_root: str | Path | None = None, image_token: str = IMAGE_TOKEN,
                 max_length: int | None = None,
                 visual_tokens: Callable[[SlicePlan], int] | None = None,
                 check_images: bool = False, skip_bad_images: bool = False) -> None:
        if max_length is not None and visual_tokens is None:
            raise ValueError("max_length needs visual_tokens (the visual-token count of a plan)")
        self.template = get_template(template) if isinstance(template, str) else template
        index = Path(index)
        if not index.is_file():
            raise FileNotFoundError(f"dataset index {str(index)!r} does not exist")
        try:
            records = json.loads(index.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"dataset index {str(index)!r} is not valid JSON: {exc}") from exc
        if not isinstance(records, list):
            raise ValueError(f"dataset index {str(index)!r} must hold a JSON list of records")
        self.records, self.positions, self.skipped_text_only = [], [], 0
        bad: list[str] = []
        for i, rec in enumerate(records):
            reason = self._problem(rec)
            if reason == "":
                self.records.append(rec)
                self.positions.append(i)
            elif reason is None:
                self.skipped_text_only += 1
            else:
                rec_id = rec.get("id") if isinstance(rec, dict) else None
                bad.append(f"record {i} (id {rec_id!r}): {reason}")
        if bad:
            raise ValueError(f"{len(bad)} of {len(records)} records in {str(index)!r} do not fit "
                             f"the {self.template.name!r} template; the first "
                             f"{min(len(bad), _SHOWN)}: " + "; ".join(bad[:_SHOWN]))
        if self.skipped_text_only:
            warnings.warn(f"{self.skipped_text_only} of {len(records)} records in "
                          f"{str(index)!r} have no 'image' (text-only) and are skipped",
                          stacklevel=2)
        if not self.records:
            raise ValueError(f"dataset index {str(index)!r} holds no record with an image")
        self.root = Path(image_root) if image_root is not None else index.parent
        self.tokenizer = tokenizer
        self.slicer = slicer
        self.image_token = image_token
        self.max_length, self.visual_tokens = max_length, visual_tokens
        self.skipped_bad_images = 0
        if check_images or skip_bad_images:
            self._check_images(index, skip=skip_bad_images)

    def _check_images(self, index: Path, *, skip: bool) -> None:
        """Open, check and decode every record's image (see the class docstring)."""
        bad, keep = [], []
        for k, rec in enumerate(self.records):
            try:
                self.slicer(self.root / rec["image"])  # as training will: header checks, decode
            except SlicingError as exc:
                bad.append(f"record {self.positions[k]} (id {rec.get('id')!r}): {exc}")
            else:
                keep.append(k)
        if not bad:
            return
        if not skip:
            raise ValueError(f"{len(bad)} of {len(self.records)} images of {str(index)!r} are "
                             f"missing or unreadable (pass skip_bad_images to drop them): "
                             + "; ".join(bad))
        self.skipped_bad_images = len(bad)
        self.records = [self.records[k] for k in keep]
        self.positions = [self.positions[k] for k in keep]
        warnings.warn(f"{len(bad)} of {len(bad) + len(keep)} records in {str(index)!r} are "
                      f"skipped for a missing or unreadable image; the first "
                      f"{min(len(bad), _SHOWN)}: " + "; ".join(bad[:_SHOWN]), stacklevel=3)
        if not self.records:
            raise ValueError(f"no record of {str(index)!r} has a readable image")

    def _problem(self, rec: object) -> str | None:
        """The empty string for a good record, None for a text-only one, else why it is bad."""
        if not isinstance(rec, dict):
            return f"must be a JSON object, got {type(rec).__name__}"
        if "image" not in rec:
            return None
        if not isinstance(rec["image"], str):
            return f"'image' must be a string path, got {type(rec['image']).__name__}"
        try:
            self.template.check(rec.get("conversations"))
        except TemplateError as exc:
            return str(exc)
        return ""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Example:
        rec = self.records[i]
        try:
            enc = self.template.encode(self.tokenizer, rec["conversations"],
                                       image_token=self.image_token)
        except TemplateError as exc:
            raise ValueError(f"record {self.positions[i]} (id {rec.get('id')!r}): {exc}") from exc
        answer = rec["conversations"][-1]["value"]
        name = f"record {self.positions[i]} (id {rec.get('id')!r})"
        image = self.slicer(self.root / rec["image"])
        ids, labels, cut = enc.input_ids, enc.labels, 0
        if self.max_length is not None:
            cut = self._overflow(name, image.plan, ids, labels)
            ids, labels = ids[:len(ids) - cut], labels[:len(labels) - cut]
        return Example(image, torch.tensor(ids), torch.tensor(labels),
                       torch.tensor(enc.question_ids), answer, name, cut)

    def _overflow(self, name: str, plan: SlicePlan, ids: list[int], labels: list[int]) -> int:
        """How many text tokens to cut off the end so that the sequence fits ``max_length``.

        Raises:
            ValueError: cutting would reach an image placeholder (its visual tokens) or leave no
                answer token."""
        image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        places = [k for k, t in enumerate(ids) if t == image_id]
        length = len(ids) + len(places) * (self.visual_tokens(plan) - 1)
        cut = max(0, length - self.max_length)
        if not cut:
            return 0
        keep = len(ids) - cut
        if (places and keep <= places[-1]) or all(x == IGNORE_INDEX for x in labels[:keep]):
            raise ValueError(
                f"{name}: {len(ids) - len(places)} text + {length - len(ids) + len(places)} "
                f"visual tokens = {length} exceed the LLM's {self.max_length} positions, and "
                f"cutting the text at the end would leave "
                f"{'part of the image' if places and keep <= places[-1] else 'no answer token'}"
                f"; shorten the record or use fewer tiles (data.slicer.max_tiles)")
        return cut


def collate_examples(examples: Sequence[Example], pad_id: int) -> dict[str, object]:
    """Batch examples: sliced images packed (no tile padding), text right-padded."""
    def pad(seqs, value):
        return torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True,
                                               padding_value=value)

    images = collate([e.image for e in examples])
    input_ids = pad([e.input_ids for e in examples], pad_id)
    return {
        "images": images,
        "input_ids": input_ids,
        "attention_mask": (pad([torch.ones_like(e.input_ids) for e in examples], 0)),
        "labels": pad([e.labels for e in examples], IGNORE_INDEX),
        "question_ids": pad([e.question_ids for e in examples], pad_id),
        "question_mask": pad([torch.ones_like(e.question_ids) for e in examples], 0).bool(),
        "answers": [e.answer for e in examples],
        "records": [e.record for e in examples],
        "truncated": sum(bool(e.truncated) for e in examples),
    }
