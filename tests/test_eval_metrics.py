"""recipes.eval_metrics and recipes.eval_data: the VQA answer normalisation, exact / normalised /
option-letter scoring and the paper's prompts, against hand-checked cases."""

from __future__ import annotations

import json

import pytest

from recipes.eval_data import FORMATS, Question, QuestionFileError, build_prompt, load_questions
from recipes.eval_metrics import choice_letter, normalize_answer, score


@pytest.mark.parametrize("raw, expected", [
    ("Yes.", "yes"),                       # a period not before a digit goes
    ("Two", "2"),                          # number words become digits
    ("none", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),                  # only none / zero ... ten
    ("the dog", "dog"),                    # articles go
    ("A Red Car!", "red car"),
    ("an apple on the table", "apple on table"),
    ("1,000", "1000"),                     # digit-comma-digit: punctuation deleted, not spaced
    ("3.5", "3.5"),                        # a period before a digit stays
    ("black-and-white", "black and white"),  # inner punctuation becomes a space
    ("t-shirt, blue", "t shirt blue"),     # ", " touches a space: deleted; "-" spaced
    ("(a) cat", "cat"),                    # ") " deleted, "(" spaced, then the article goes
    ("well... yes", "well yes"),
    ("  Hello\tWorld\n", "hello world"),
    ("dont", "don't"),                     # apostrophe-less contractions are repaired
    ("what's", "what's"),
    ("a/b", "b"),                          # "/" spaced, then "a" is an article
    ("", ""),
])
def test_normalize_answer_hand_checked(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_answer_refuses_non_strings():
    with pytest.raises(TypeError, match="must be a string, got int"):
        normalize_answer(3)


@pytest.mark.parametrize("pred, answer, exact, normalized", [
    ("red", "red", True, True),
    (" red ", "red", True, True),          # surrounding whitespace does not count
    ("Red", "red", False, True),           # case counts only for exact match
    ("Two", "2", False, True),
    ("the cat.", "cat", False, True),
    ("yes", ["no", "Yes"], False, True),   # any accepted answer
    ("blue", ["no", "Yes"], False, False),
    ("red car", "red", False, False),      # no partial credit
])
def test_score_open_answers(pred, answer, exact, normalized):
    assert score(pred, answer) == {"exact": exact, "normalized": normalized}


CHOICES = ["cat", "dog", "a cow"]


@pytest.mark.parametrize("pred, answer, exact, normalized", [
    ("B", "B", True, True),
    ("B.", "B", True, True),
    ("(B) dog", "B", False, True),
    ("B) dog", "dog", False, True),        # the answer may be the option's text
    ("dog", "B", False, True),             # the prediction may be the option's text
    ("cow", "C", False, True),             # ... compared in normal form
    ("b", "B", False, True),
    ("C", "B", False, False),
    ("D", "B", False, False),              # no such option
    ("Answer: B", "B", False, False),      # no leading letter and no option's text
])
def test_score_choices(pred, answer, exact, normalized):
    assert score(pred, answer, CHOICES) == {"exact": exact, "normalized": normalized}


def test_choice_letter():
    assert choice_letter("A. cat", CHOICES) == "A"
    assert choice_letter("the dog", CHOICES) == "B"
    assert choice_letter("horse", CHOICES) is None


def test_score_errors():
    with pytest.raises(TypeError, match="prediction must be a string"):
        score(1, "a")
    with pytest.raises(ValueError, match="non-empty list of strings"):
        score("x", [])
    with pytest.raises(ValueError, match="names none of the options"):
        score("A", "Z", ["x", "y"])


def test_prompts_are_the_papers():
    q = Question(qid="1", image=None, question="What is it?", answer="B",
                 choices=("cat", "dog"), kind="all")
    assert build_prompt(q, "choice") == ("What is it?\nA. cat\nB. dog\nAnswer with the option's "
                                         "letter from the given choices directly.")
    open_q = Question(qid="2", image=None, question="Color?", answer="red", choices=None,
                      kind="all")
    assert build_prompt(open_q, "short") == ("Color?\nAnswer the question using a single word "
                                             "or phrase.")
    assert build_prompt(open_q, "none") == "Color?"
    assert FORMATS["none"] is None
    with pytest.raises(ValueError, match="unknown format 'long'"):
        build_prompt(open_q, "long")


def test_question_file_forms_and_bad_records(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    good = [{"question_id": 1, "image": "x.png", "question": "<image>\nQ?", "answer": "a",
             "category": "ocr"},
            {"id": "c", "image": "x.png", "conversations": [
                {"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "red"}]},
            {"id": "m", "image": "x.png", "text": "pick", "answer": "dog",
             "choices": {"A": "cat", "B": "dog"}}]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in good) + "\n")
    questions, problems = load_questions(path)
    assert problems == []
    assert [(q.qid, q.question, q.answer, q.kind) for q in questions] == [
        ("1", "Q?", "a", "ocr"), ("c", "what?", "red", "all"), ("m", "pick", "dog", "all")]
    assert questions[2].choices == ("cat", "dog")

    bad = good + [{"id": "noimg", "image": "missing.png", "question": "q", "answer": "a"},
                  {"id": "noans", "image": "x.png", "question": "q"},
                  {"id": 1, "image": "x.png", "question": "q", "answer": "a"},
                  {"id": "ch", "image": "x.png", "question": "q", "answer": "E",
                   "choices": ["a", "b"]},
                  [1, 2]]
    path.write_text(json.dumps(bad))
    with pytest.raises(QuestionFileError) as err:
        load_questions(path)
    msg = str(err.value)
    assert "5 bad record(s) of 8" in msg
    for part in ("record 3 (id 'noimg'): image", "missing.png' does not exist",
                 "record 4 (id 'noans'): has no answer", "record 5 (id 1): duplicates",
                 "record 6 (id 'ch'): answer 'E' names none", "record 7 (id None): is a list"):
        assert part in msg
    questions, problems = load_questions(path, skip_bad=True)
    assert len(questions) == 3 and len(problems) == 5

    with pytest.raises(FileNotFoundError, match="question file .*nope.json' does not exist"):
        load_questions(tmp_path / "nope.json")
    path.write_text("[{")
    with pytest.raises(QuestionFileError, match="is not valid JSON"):
        load_questions(path)
    path.write_text("[]")
    with pytest.raises(QuestionFileError, match="holds no records"):
        load_questions(path)
