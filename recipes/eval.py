"""Evaluate a saved SliME model on a question file.

::

    python -m recipes.eval --model DIR --questions FILE --out OUT [--format short|choice|none]
        [--batch-size 8] [--max-new-tokens 16] [--router-gamma G] [--views global|local|both]
        [--template NAME] [--image-folder DIR] [--skip-bad] [--restart] [--device cpu]

(``slime-eval`` is the same command.) ``FILE`` is a LLaVA-format question file
(:mod:`recipes.eval_data`); each question is asked with the paper's response-formatting prompt of
``--format`` (Table 6: ``short`` "Answer the question using a single word or phrase.", ``choice``
"Answer with the option's letter from the given choices directly.", ``none``), answered by greedy
decoding in batches. ``OUT`` receives

- ``predictions.jsonl``: one line per question, in file order: ``question_id``, ``kind``,
  ``prediction``, ``answer``, ``correct`` (the normalised match), ``exact``, ``visual_tokens``,
  ``router_keep_rate`` (``null`` without local tokens);
- ``summary.json`` and ``summary.md``: accuracy (exact and VQA-normalised match,
  :mod:`recipes.eval_metrics`) overall and per ``kind``, mean visual tokens and keep rate;
- ``run.json``: the settings, so that a stopped evaluation run again with the same command goes
  on from its JSONL (a torn last line, from a kill mid-write, is dropped and redone); other
  settings against the same ``OUT`` are refused unless ``--restart``.

A missing model folder, question file or image, bad records (each listed) or bad settings print
one line on stderr and exit with status 2.

For programmatic use: :func:`evaluate` (a loaded model) and :func:`evaluate_folder`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from recipes.chat import (_check_length, generation_inputs, image_token_of, load_chat_model,
                          slicer_for, stage_settings)
from recipes.eval_data import FORMATS, Question, QuestionFileError, build_prompt, load_questions
from recipes.eval_metrics import score
from recipes.templates import IMAGE_TOKEN, ChatTemplate, get_template
from slime_adapters import collate
from slime_adapters.config import atomic_write_text

__all__ = ["EvalStateError", "answer_batch", "answer_prompts", "evaluate", "evaluate_folder",
           "main", "markdown", "read_predictions", "summarize"]

PREDICTIONS, SUMMARY, SUMMARY_MD, RUN = ("predictions.jsonl", "summary.json", "summary.md",
                                         "run.json")


class EvalStateError(ValueError):
    """An output folder whose predictions do not belong to this evaluation."""


def answer_batch(model, tokenizer, questions: Sequence[Question], *, fmt: str,
                 **kwargs) -> list[dict[str, Any]]:
    """:func:`answer_prompts` for questions (their :func:`build_prompt` text and image)."""
    return answer_prompts(model, tokenizer, [build_prompt(q, fmt) for q in questions],
                          [q.image for q in questions], **kwargs)


@torch.no_grad()
def answer_prompts(model, tokenizer, prompts: Sequence[str], images: Sequence[Any], *,
                   template: ChatTemplate, slicer, max_new_tokens: int = 16,
                   views: str | None = None, router_gamma: float | None = None,
                   force_expert: int | None = None) -> list[dict[str, Any]]:
    """Greedy answers to a batch of prompts, one image each (one encoder call, one
    ``generate``): each prompt is the user turn ``<image>\\n{prompt}`` in ``template``.

    Returns one dict per prompt: ``prediction``, ``visual_tokens``, ``router_keep_rate``.

    Raises:
        ValueError: prompts and images that differ in number, a prompt longer than the LLM's
            positions, an image the slicer refuses.
    """
    if len(prompts) != len(images) or not prompts:
        raise ValueError(f"answer_prompts needs one image per prompt, got {len(prompts)} "
                         f"prompt(s) and {len(images)} image(s)")
    image_token = image_token_of(model, tokenizer)
    rows, qrows = [], []
    for prompt in prompts:
        ids, qids, qmask = generation_inputs(
            template, tokenizer, [{"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"}],
            image_token)
        rows.append(ids[0].tolist())
        qrows.append((qids[0].tolist(), qmask[0].tolist()))
    stops = template.stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    width, qwidth = max(map(len, rows)), max(len(q) for q, _ in qrows)
    # left padding: every prompt ends where generation starts
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    qids = torch.tensor([q + [pad] * (qwidth - len(q)) for q, _ in qrows])
    qmask = torch.tensor([m + [False] * (qwidth - len(m)) for _, m in qrows], dtype=torch.bool)
    images = collate([slicer(im) for im in images])
    model.eval()
    visual = model.get_visual_tokens(images=images, question_ids=qids, question_mask=qmask,
                                     views=views, router_gamma=router_gamma,
                                     force_expert=force_expert)
    for r, n in zip(rows, visual.lengths.tolist()):
        _check_length(model, r, int(n), max_new_tokens)
    new = model.generate(input_ids=ids, attention_mask=mask, visual_tokens=visual,
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                         pad_token_id=pad)[:, width:].tolist()
    aux = visual.aux
    out = []
    for i, generated in enumerate(new):
        cut = next((j for j, t in enumerate(generated) if t in stops), len(generated))
        offered = None if aux.num_local is None else int(aux.num_local[i])
        kept = None if aux.num_kept is None else int(aux.num_kept[i])
        out.append({"prediction": tokenizer.decode(generated[:cut],
                                                   skip_special_tokens=True).strip(),
                    "visual_tokens": int(visual.lengths[i]),
                    "router_keep_rate": kept / offered if offered else None})
    return out


def _record(q: Question, answered: dict[str, Any]) -> dict[str, Any]:
    s = score(answered["prediction"], q.answer, q.choices)
    return {"question_id": q.qid, "kind": q.kind, "prediction": answered["prediction"],
            "answer": q.answer if isinstance(q.answer, str) else list(q.answer),
            "correct": s["normalized"], "exact": s["exact"],
            "visual_tokens": answered["visual_tokens"],
            "router_keep_rate": answered["router_keep_rate"]}


def read_predictions(path: str | Path, questions: Sequence[Question] | None = None
                     ) -> list[dict[str, Any]]:
    """The complete lines of a predictions file. A last line that is not complete JSON (a kill
    mid-write) is cut off the file; ``questions``: the records must be theirs, in order.

    Raises:
        EvalStateError: a damaged line before the last, or records of other questions.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records, good = [], 0
    for n, line in enumerate(lines):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "question_id" not in rec:
                raise ValueError("not a prediction record")
        except (ValueError, UnicodeDecodeError) as exc:
            if n == len(lines) - 1 or all(not rest.strip() for rest in lines[n + 1:]):
                with open(path, "r+b") as fh:  # the torn tail is redone
                    fh.truncate(good)
                break
            raise EvalStateError(f"{str(path)!r} line {n + 1} is damaged ({exc}); remove the "
                                 "file or pass --restart") from exc
        records.append(rec)
        good += len(line) + 1
    if questions is not None:
        for i, rec in enumerate(records):
            if i >= len(questions) or rec["question_id"] != questions[i].qid:
                raise EvalStateError(f"{str(path)!r} line {i + 1} is question "
                                     f"{rec['question_id']!r}, not this question file's record "
                                     f"{i}; use another --out or --restart")
    return records


def summarize(records: Sequence[dict[str, Any]], settings: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """Accuracy (exact and normalised) overall and per kind, mean visual tokens and keep rate."""

    def group(rows):
        n = len(rows)
        rates = [r["router_keep_rate"] for r in rows if r["router_keep_rate"] is not None]
        return {"count": n, "accuracy": sum(r["correct"] for r in rows) / n,
                "exact_match": sum(r["exact"] for r in rows) / n,
                "visual_tokens": sum(r["visual_tokens"] for r in rows) / n,
                "router_keep_rate": sum(rates) / len(rates) if rates else None}

    kinds = sorted({r["kind"] for r in records})
    return {**group(records), "by_kind": {k: group([r for r in records if r["kind"] == k])
                                          for k in kinds},
            "settings": dict(settings or {})}


def markdown(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table."""

    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}%"

    lines = ["| kind | questions | accuracy (normalised) | exact match | visual tokens | "
             "router keep rate |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, g in [*summary["by_kind"].items(), ("**all**", summary)]:
        lines.append(f"| {name} | {g['count']} | {pct(g['accuracy'])} | {pct(g['exact_match'])}"
                     f" | {g['visual_tokens']:.1f} | {pct(g['router_keep_rate'])} |")
    s = summary["settings"]
    head = ", ".join(f"{k} {v}" for k, v in s.items() if k not in ("model", "questions"))
    return (f"# Evaluation of {s.get('model', 'a model')}\n\nQuestions: {s.get('questions', '?')}"
            f"\n\nSettings: {head}\n\n" + "\n".join(lines) + "\n")


def evaluate(model, tokenizer, questions: Sequence[Question], out: str | Path, *,
             fmt: str = "short", template: ChatTemplate | str = "qa", slicer=None,
             batch_size: int = 8, max_new_tokens: int = 16, views: str | None = None,
             router_gamma: float | None = None, force_expert: int | None = None,
             settings: dict[str, Any] | None = None, restart: bool = False, progress: bool = True,
             after_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Answer ``questions`` into ``out`` (resuming from its predictions) and write the summary.

    ``settings``: what ``run.json`` records (the model folder, question file, …); a folder that
    holds another run's settings is refused unless ``restart``. ``after_batch(done)`` runs after
    each batch is written.

    Returns:
        The summary (:func:`summarize`).

    Raises:
        ValueError: ``batch_size`` or ``max_new_tokens`` < 1, an unknown format;
            :class:`EvalStateError`: ``out`` holds another evaluation.
    """
    from tqdm import tqdm

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    for name, v in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    template = get_template(template) if isinstance(template, str) else template
    slicer = slicer or slicer_for(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = {**(settings or {}), "format": fmt, "template": template.name,
           "max_new_tokens": max_new_tokens, "views": views, "router_gamma": router_gamma,
           "force_expert": force_expert, "question_ids": len(questions)}
    pred_path, run_path = out / PREDICTIONS, out / RUN
    if restart:
        pred_path.unlink(missing_ok=True)
    elif run_path.is_file() and pred_path.is_file():
        old = json.loads(run_path.read_text(encoding="utf-8"))
        if old != run:
            changed = sorted(k for k in set(old) | set(run) if old.get(k) != run.get(k))
            raise EvalStateError(f"{str(out)!r} holds an evaluation with other settings "
                                 f"({', '.join(changed)}); use another --out or --restart")
    atomic_write_text(run_path, json.dumps(run, indent=1))
    records = read_predictions(pred_path, questions)
    bar = tqdm(total=len(questions), initial=len(records), desc="eval", unit="q",
               disable=not progress, file=sys.stderr)
    with open(pred_path, "a", encoding="utf-8") as fh:
        for start in range(len(records), len(questions), batch_size):
            batch = questions[start:start + batch_size]
            answered = answer_batch(model, tokenizer, batch, fmt=fmt, template=template,
                                    slicer=slicer, max_new_tokens=max_new_tokens, views=views,
                                    router_gamma=router_gamma, force_expert=force_expert)
            new = [_record(q, a) for q, a in zip(batch, answered)]
            fh.write("".join(json.dumps(r) + "\n" for r in new))
            fh.flush()
            os.fsync(fh.fileno())
            records += new
            bar.update(len(new))
            if after_batch is not None:
                after_batch(len(records))
    bar.close()
    summary = summarize(records, {k: v for k, v in run.items() if k != "question_ids"})
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=1))
    atomic_write_text(out / SUMMARY_MD, markdown(summary))
    return summary


def evaluate_folder(model_dir: str | Path, question_file: str | Path, out: str | Path, *,
                    fmt: str = "short", template: str | None = None,
                    image_folder: str | Path | None = None, skip_bad: bool = False,
                    device: str = "cpu", router_gamma: float | None = None,
                    views: str | None = None, **kwargs) -> dict[str, Any]:
    """Load a saved model folder and :func:`evaluate` it on a question file. The chat template,
    slicer and stage settings (views, γ, forced expert) are the saved ones unless given.

    Raises:
        FileNotFoundError: the model folder, question file or image folder is missing.
        QuestionFileError: bad records (listed), unless ``skip_bad``.
        ValueError: a damaged model folder, a template the tokenizer lacks, bad settings.
    """
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model folder {str(model_dir)!r} does not exist")
    questions, problems = load_questions(question_file, image_folder=image_folder,
                                         skip_bad=skip_bad)
    model, tokenizer, extra = load_chat_model(model_dir, device=device)
    tmpl = get_template(template or extra.get("template") or "qa")
    tmpl.stop_token_ids(tokenizer)  # a template whose stop text the tokenizer lacks
    stage = stage_settings(extra)
    settings = {"model": str(model_dir), "questions": str(question_file),
                "skipped_records": len(problems)}
    summary = evaluate(model, tokenizer, questions, out, fmt=fmt, template=tmpl,
                       slicer=slicer_for(model, extra.get("slicer")),
                       views=views or stage["views"],
                       router_gamma=router_gamma if router_gamma is not None
                       else stage["router_gamma"], force_expert=stage["force_expert"],
                       settings=settings, **kwargs)
    if problems:
        summary["skipped"] = problems
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slime-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved model folder (training's final/)")
    parser.add_argument("--questions", required=True, help="question file (JSON or JSONL)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", default="short", choices=sorted(FORMATS),
                        help="the response-formatting prompt (paper, Table 6)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--router-gamma", type=float, default=None,
                        help="the router's γ in (0, 1] (default: the saved stage's or model's)")
    parser.add_argument("--views", choices=("global", "local", "both"), default=None,
                        help="the views the adapter uses (default: the saved stage's)")
    parser.add_argument("--template", default=None, help="chat template (default: the saved)")
    parser.add_argument("--image-folder", default=None,
                        help="images are relative to this (default: the question file's folder)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="evaluate the good records and list the bad ones in the summary")
    parser.add_argument("--restart", action="store_true",
                        help="start again instead of going on from OUT's predictions")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for flag, value in (("--batch-size", args.batch_size),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.router_gamma is not None and not 0 < args.router_gamma <= 1:
        parser.error(f"--router-gamma must be in (0, 1], got {args.router_gamma}")
    try:
        summary = evaluate_folder(
            args.model, args.questions, args.out, fmt=args.format, template=args.template,
            image_folder=args.image_folder, skip_bad=args.skip_bad, device=args.device,
            router_gamma=args.router_gamma, views=args.views, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, restart=args.restart,
            progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:  # QuestionFileError, SlicingError included
        print(f"eval: error: {exc}", file=sys.stderr)
        return 2
    for line in summary.get("skipped", []):
        print(f"eval: skipped {line}", file=sys.stderr)
    print(f"accuracy {100 * summary['accuracy']:.1f}% (exact {100 * summary['exact_match']:.1f}%)"
          f" on {summary['count']} questions; {Path(args.out) / SUMMARY_MD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
