"""An offline lmms-eval task over a local question file.

::

    python -m slime_adapters.eval.task --questions FILE --out TASKS [--name slime_detail]
        [--format short|choice|none] [--max-new-tokens 16] [--image-folder DIR]
    lmms_eval --model slime --model_args pretrained=MODEL --tasks slime_detail \\
        --include_path TASKS --batch_size 8 --output_path RESULTS

writes ``TASKS/NAME/``: ``data.jsonl`` (the checked questions of a LLaVA-format question file,
:mod:`recipes.eval_data`, with absolute image paths and the prompt of ``--format``), ``NAME.yaml``
(lmms-eval loads the JSONL with ``datasets``' ``json`` builder: no download) and ``utils.py``
(which imports the task's functions from here). The task's metrics are those of ``slime-eval``
(:func:`recipes.eval_metrics.score`): ``accuracy`` (the VQA-normalised match, or the option
letter with choices) and ``exact_match``, averaged. Same prompt, same greedy decoding and same
scoring as ``slime-eval`` on the same file, so the two accuracies are equal.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recipes.eval_data import FORMATS, build_prompt, load_questions
from recipes.eval_metrics import score
from slime_adapters.config import atomic_write_text

__all__ = ["doc_to_text", "doc_to_visual", "main", "process_results", "write_task"]

_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answers
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
  num_beams: 1
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
  format: {fmt}
"""
_UTILS = ('"""The functions of the task (slime_adapters.eval.task)."""\n\n'
          "from slime_adapters.eval.task import doc_to_text, doc_to_visual, process_results  "
          "# noqa: F401\n")


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    """The question's image, opened (PIL)."""
    from PIL import Image

    with Image.open(doc["image"]) as im:
        im.load()
        return [im.copy()]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question with its options and the formatting prompt (written by :func:`write_task`)."""
    return doc["prompt"]


def process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """``accuracy`` and ``exact_match`` of the answer (:func:`recipes.eval_metrics.score`)."""
    s = score(results[0], doc["answers"], doc.get("choices") or None)
    return {"accuracy": float(s["normalized"]), "exact_match": float(s["exact"])}


def write_task(question_file: str | Path, out: str | Path, *, name: str = "slime_detail",
               fmt: str = "short", max_new_tokens: int = 16,
               image_folder: str | Path | None = None) -> Path:
    """Write the task folder ``out/name`` (see the module docstring); returns its YAML's path.

    Raises:
        FileNotFoundError / QuestionFileError: as :func:`recipes.eval_data.load_questions` (every
            bad record listed).
        ValueError: an unknown format, a bad name or ``max_new_tokens``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    if not name.isidentifier():
        raise ValueError(f"the task name must be an identifier, got {name!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    questions, _ = load_questions(question_file, image_folder=image_folder)
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"question_id": q.qid, "image": str(q.image.resolve()), "question": q.question,
             "prompt": build_prompt(q, fmt),
             "answers": [q.answer] if isinstance(q.answer, str) else list(q.answer),
             "choices": list(q.choices or []), "kind": q.kind} for q in questions]
    data = folder / "data.jsonl"
    atomic_write_text(data, "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(folder / "utils.py", _UTILS)
    yaml = folder / f"{name}.yaml"
    atomic_write_text(yaml, _YAML.format(name=name, data=json.dumps(str(data.resolve())),
                                         max_new_tokens=max_new_tokens, fmt=fmt))
    return yaml


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slime_adapters.eval.task",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", required=True, help="question file (JSON or JSONL)")
    parser.add_argument("--out", required=True, help="folder for lmms-eval's --include_path")
    parser.add_argument("--name", default="slime_detail")
    parser.add_argument("--format", default="short", choices=sorted(FORMATS))
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--image-folder", default=None)
    args = parser.parse_args(argv)
    try:
        path = write_task(args.questions, args.out, name=args.name, fmt=args.format,
                          max_new_tokens=args.max_new_tokens, image_folder=args.image_folder)
    except (FileNotFoundError, ValueError) as exc:
        print(f"task: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
