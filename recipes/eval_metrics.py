"""Scoring answers: exact match, the VQA evaluation's answer normalisation, and option letters.

:func:`normalize_answer` follows the rules of the VQA benchmark's evaluation script:

- newlines and tabs become spaces, the text is stripped and lower-cased;
- punctuation (``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``) is deleted where it touches a space
  or where the text holds a digit-comma-digit group (``1,000`` → ``1000``), and replaced by a space
  elsewhere (``black-and-white`` → ``black and white``); a period not followed by a digit is
  deleted (``3.5`` keeps its period, ``yes.`` loses it);
- number words ``none``, ``zero`` … ``ten`` become digits (``none`` → ``0``), the articles ``a``,
  ``an``, ``the`` are dropped, and the common apostrophe-less contractions get their apostrophe
  back (``dont`` → ``don't``).

:func:`score` gives one prediction's ``exact`` and ``normalized`` match against one answer or a
list of accepted answers (any of them counts), and for a multiple-choice question the option
letter the prediction names (:func:`choice_letter`).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence

__all__ = ["ARTICLES", "NUMBER_WORDS", "answer_letter", "choice_letter", "letters_for",
           "normalize_answer", "score"]

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")
# the contractions VQA annotators wrote without their apostrophe (a subset of the VQA script's)
_CONTRACTIONS = {"aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't",
                 "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
                 "hasnt": "hasn't", "havent": "haven't", "isnt": "isn't", "itd": "it'd",
                 "itll": "it'll", "ive": "i've", "shouldnt": "shouldn't", "thats": "that's",
                 "theres": "there's", "theyre": "they're", "wasnt": "wasn't", "werent": "weren't",
                 "whats": "what's", "wont": "won't", "wouldnt": "wouldn't", "youre": "you're"}


def _punctuation(text: str) -> str:
    digit_comma = _DIGIT_COMMA.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        if digit_comma or f"{p} " in text or f" {p}" in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def normalize_answer(text: str) -> str:
    """The VQA evaluation's normal form of an answer (see the module docstring).

    Raises:
        TypeError: ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"an answer must be a string, got {type(text).__name__}")
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    words = []
    for word in _punctuation(text).split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def letters_for(choices: Sequence[str]) -> list[str]:
    """``A``, ``B``, … for the options (at most 26)."""
    if len(choices) > 26:
        raise ValueError(f"at most 26 options are supported, got {len(choices)}")
    return list(string.ascii_uppercase[:len(choices)])


_LETTER = re.compile(r"^\W*\(?([A-Za-z])(?:[).:,\s]|$)")


def choice_letter(prediction: str, choices: Sequence[str]) -> str | None:
    """The option letter a prediction names: a leading letter (``B``, ``(B)``, ``B.``, ``B)
    text``, ``b``) among the options' letters, else the one option whose text the prediction is
    (after :func:`normalize_answer`); ``None`` when it names none."""
    letters = letters_for(choices)
    m = _LETTER.match(prediction.strip())
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    said = normalize_answer(prediction)
    hits = [letter for letter, text in zip(letters, choices) if normalize_answer(text) == said]
    return hits[0] if len(hits) == 1 else None


def answer_letter(answer: str, choices: Sequence[str]) -> str | None:
    """The option an answer names: a bare letter, or the one option with its text."""
    letters = letters_for(choices)
    if answer.strip().upper() in letters:
        return answer.strip().upper()
    return choice_letter(answer, choices)


def score(prediction: str, answer: str | Sequence[str],
          choices: Sequence[str] | None = None) -> Mapping[str, bool]:
    """``{"exact": ..., "normalized": ...}`` for one prediction.

    ``exact``: the prediction, stripped, equals an accepted answer, stripped. ``normalized``:
    their :func:`normalize_answer` forms are equal. With ``choices`` (the option texts, lettered
    ``A``, ``B``, …), the answer is a letter or an option's text and both metrics compare option
    letters: ``exact`` the prediction's leading letter alone (``"B"``, ``"B."``), ``normalized``
    :func:`choice_letter`'s reading of it.

    Raises:
        TypeError: a prediction or answer that is not a string (or list of strings).
        ValueError: no accepted answer, or a choice answer that names no option.
    """
    if not isinstance(prediction, str):
        raise TypeError(f"a prediction must be a string, got {type(prediction).__name__}")
    accepted = [answer] if isinstance(answer, str) else list(answer)
    if not accepted or not all(isinstance(a, str) for a in accepted):
        raise ValueError(f"the answer must be a string or a non-empty list of strings, got "
                         f"{answer!r}")
    if choices is not None:
        wanted = {answer_letter(a, choices) for a in accepted}
        if None in wanted:
            raise ValueError(f"the answer {answer!r} names none of the options "
                             f"{letters_for(choices)}")
        bare = prediction.strip().rstrip(".").strip()
        return {"exact": bare in wanted,
                "normalized": choice_letter(prediction, choices) in wanted}
    pred = prediction.strip()
    norm = normalize_answer(prediction)
    return {"exact": any(pred == a.strip() for a in accepted),
            "normalized": any(norm == normalize_answer(a) for a in accepted)}
