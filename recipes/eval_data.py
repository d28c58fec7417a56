"""Question files for :mod:`recipes.eval`: reading, checking, and the paper's prompts.

A question file is JSON (a list of records) or JSONL (one record a line). A record::

    {"question_id": "q1", "image": "images/1.png", "question": "What is written on the sign?",
     "answer": "stop", "choices": ["stop", "go"], "kind": "ocr"}

- ``question_id`` (or ``id``): unique; ``image``: a path relative to the question file's folder
  (or ``--image-folder``), or absolute;
- ``question`` (or LLaVA's ``text``); ``answer`` (or ``answers``): a string or a list of accepted
  strings; a LLaVA training record (``conversations``: the first human turn is the question, the
  first gpt turn the answer) is read as well, so :func:`recipes.data.make_color_dataset`'s
  ``data.json`` is a question file;
- optional ``choices``: a list of option texts (lettered A, B, …) or a dict ``{"A": ..., ...}``;
  the answer is then a letter or an option's text; optional ``kind`` (or ``category``), the group
  the summary reports accuracy for (default ``"all"``).

:func:`build_prompt` writes the question the way the paper's Table 6 does: the question, the
options one a line (``A. text``), and the response-formatting prompt of :data:`FORMATS`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from recipes.eval_metrics import letters_for
from recipes.templates import IMAGE_TOKEN

__all__ = ["FORMATS", "Question", "QuestionFileError", "build_prompt", "load_questions"]

FORMATS = {
    "short": "Answer the question using a single word or phrase.",
    "choice": "Answer with the option's letter from the given choices directly.",
    "none": None,
}
_SHOWN = 10  # bad records named in an error message


class QuestionFileError(ValueError):
    """A question file that cannot be read, or holds bad records (each listed)."""


@dataclasses.dataclass(frozen=True)
class Question:
    """One question to evaluate."""

    qid: str
    image: Path
    question: str  # without the image placeholder
    answer: str | tuple[str, ...]
    choices: tuple[str, ...] | None
    kind: str


def build_prompt(question: Question, fmt: str) -> str:
    """The text the model is asked: question, options (``A. text`` a line), formatting prompt.

    Raises:
        ValueError: an unknown ``fmt`` (one of :data:`FORMATS`).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    parts = [question.question]
    if question.choices:
        parts += [f"{letter}. {text}" for letter, text in
                  zip(letters_for(question.choices), question.choices)]
    if FORMATS[fmt]:
        parts.append(FORMATS[fmt])
    return "\n".join(parts)


def _read_records(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise QuestionFileError(f"question file {str(path)!r} is not UTF-8 text: {exc}") from exc
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise QuestionFileError(f"question file {str(path)!r} is not valid JSON: {exc}") \
                from exc
        return data
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise QuestionFileError(f"question file {str(path)!r} line {n} is not valid JSON: "
                                    f"{exc}") from exc
    return records


def _from_conversations(rec: dict) -> tuple[Any, Any]:
    conv = rec.get("conversations")
    if not isinstance(conv, list):
        return None, None
    human = next((t.get("value") for t in conv if isinstance(t, dict)
                  and t.get("from") == "human"), None)
    gpt = next((t.get("value") for t in conv if isinstance(t, dict) and t.get("from") == "gpt"),
               None)
    return human, gpt


def _choices(raw: Any) -> tuple[str, ...] | None | str:
    """The option texts, or a string saying what is wrong."""
    if raw is None:
        return None
    if isinstance(raw, dict):
        keys = sorted(raw)
        if keys != letters_for(keys):
            return f"choices keys must be A, B, C, ... in order, got {keys}"
        raw = [raw[k] for k in keys]
    if not isinstance(raw, list) or len(raw) < 2 or len(raw) > 26 \
            or not all(isinstance(c, str) and c.strip() for c in raw):
        return "choices must be a list (or letter dict) of 2 to 26 non-empty strings"
    return tuple(raw)


def _question(rec: Any, root: Path) -> Question | str:
    """The question of one record, or a string saying what is wrong."""
    if not isinstance(rec, dict):
        return f"is a {type(rec).__name__}, not an object"
    qid = rec.get("question_id", rec.get("id"))
    if qid is None or isinstance(qid, bool) or not isinstance(qid, str | int):
        return "has no question_id (or id)"
    human, gpt = _from_conversations(rec)
    question = rec.get("question", rec.get("text", human))
    answer = rec.get("answer", rec.get("answers", gpt))
    if not isinstance(question, str) or not question.replace(IMAGE_TOKEN, "").strip():
        return "has no question (question, text or a human turn)"
    if isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer):
        answer = tuple(answer)
    elif not isinstance(answer, str):
        return "has no answer (a string or a list of strings)"
    choices = _choices(rec.get("choices"))
    if isinstance(choices, str):
        return choices
    if choices is not None:
        from recipes.eval_metrics import answer_letter

        if any(answer_letter(a, choices) is None
               for a in ((answer,) if isinstance(answer, str) else answer)):
            return f"answer {answer!r} names none of its {len(choices)} choices"
    kind = rec.get("kind", rec.get("category", "all"))
    if not isinstance(kind, str) or not kind:
        return "kind must be a non-empty string"
    image = rec.get("image")
    if not isinstance(image, str) or not image:
        return "has no image path"
    path = Path(image) if Path(image).is_absolute() else root / image
    if not path.is_file():
        return f"image {str(path)!r} does not exist"
    text = question.replace(f"{IMAGE_TOKEN}\n", "").replace(IMAGE_TOKEN, "").strip()
    return Question(qid=str(qid), image=path, question=text, answer=answer, choices=choices,
                    kind=kind)


def load_questions(path: str | Path, *, image_folder: str | Path | None = None,
                   skip_bad: bool = False) -> tuple[list[Question], list[str]]:
    """Read and check a question file.

    Returns:
        ``(questions, problems)``: the good questions in file order, and one line per bad record
        (``record N (id X): what is wrong``; empty unless ``skip_bad``).

    Raises:
        FileNotFoundError: the file or the image folder does not exist.
        QuestionFileError: unreadable JSON, no records, duplicate ids, or (unless ``skip_bad``)
            bad records, the first ten listed with the total.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file {str(path)!r} does not exist")
    root = Path(image_folder) if image_folder is not None else path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    records = _read_records(path)
    if not isinstance(records, list) or not records:
        raise QuestionFileError(f"question file {str(path)!r} holds no records (a JSON list or "
                                "one JSON object a line)")
    questions, problems, seen = [], [], set()
    for i, rec in enumerate(records):
        got = _question(rec, root)
        rid = rec.get("question_id", rec.get("id")) if isinstance(rec, dict) else None
        if isinstance(got, Question) and got.qid in seen:
            got = f"duplicates question_id {got.qid!r}"
        if isinstance(got, str):
            problems.append(f"record {i} (id {rid!r}): {got}")
            continue
        seen.add(got.qid)
        questions.append(got)
    if problems and not skip_bad:
        shown = "; ".join(problems[:_SHOWN])
        more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise QuestionFileError(f"question file {str(path)!r}: {len(problems)} bad record(s) of "
                                f"{len(records)}: {shown}{more} (--skip-bad evaluates the rest)")
    if not questions:
        raise QuestionFileError(f"question file {str(path)!r}: no good records ({problems[0]})")
    return questions, problems
