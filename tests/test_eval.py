"""recipes.eval: a tiny saved model (random weights) evaluated end to end; its predictions and
accuracy equal a direct loop over recipes.chat.respond (one question at a time, greedy); a stopped
run resumes to the same files (a torn last line included); the command's errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from recipes.build import build_model  # noqa: E402
from recipes.chat import load_chat_model, respond, slicer_for  # noqa: E402
from recipes.data import make_color_dataset  # noqa: E402
from recipes.eval import EvalStateError, evaluate_folder, main, read_predictions  # noqa: E402
from recipes.eval_data import build_prompt, load_questions  # noqa: E402
from recipes.eval_metrics import score  # noqa: E402
from recipes.model_folder import save_model_folder  # noqa: E402
from recipes.templates import get_template  # noqa: E402

# its own copy of tests.test_chat.TINY: `make test-lmms-eval` runs this file in a venv where a
# `tests` package installed by a dependency shadows this repository's
TINY = {
    "vision": {"type": "clip", "config": dict(hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4,
                                              image_size=336, patch_size=42)},
    "llm": {"type": "llama", "config": dict(hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, max_position_embeddings=512)},
    "tokenizer": {"type": "word"},
    "adapter": {"projector": {"num_heads": 2}, "compressor": {"num_queries": 16, "num_heads": 2},
                "router": {"gamma": 0.8, "temperature": 0.05}},
}
N, NEW = 7, 4


def direct_predictions(model_dir, questions, fmt="short"):
    """The oracle: recipes.chat.respond, one question at a time."""
    model, tokenizer, extra = load_chat_model(model_dir)
    slicer = slicer_for(model, extra["slicer"])
    return [respond(model, tokenizer, q.image, build_prompt(q, fmt), template="qa",
                    slicer=slicer, max_new_tokens=NEW).text for q in questions]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny model and a question file whose answers are, for every other record, what the
    model says (so accuracy is neither 0 nor 1), in two kinds."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    built = build_model(TINY)
    save_model_folder(built.model, root / "model", tokenizer=built.tokenizer,
                      extra={"template": "qa", "slicer": {"max_tiles": 4}})
    index = make_color_dataset(root / "data", N, seed=3)
    questions, _ = load_questions(index)
    said = direct_predictions(root / "model", questions)
    records = []
    for i, (q, s) in enumerate(zip(questions, said)):
        answer = s if i % 2 == 0 else f"not {s}"
        records.append({"question_id": q.qid, "image": q.image.name, "question": q.question,
                        "answer": answer, "kind": "even" if i % 2 == 0 else "odd"})
    qfile = root / "data" / "questions.jsonl"
    qfile.write_text("".join(json.dumps(r) + "\n" for r in records))
    return root / "model", qfile, said


@pytest.fixture(scope="module")
def full(setup, tmp_path_factory):
    """One complete evaluation (batches of 3), the reference of the other tests."""
    out = tmp_path_factory.mktemp("full")
    return run(setup, out, batch_size=3), out


def run(setup, out, **kw):
    model, qfile, _ = setup
    return evaluate_folder(model, qfile, out, max_new_tokens=NEW, progress=False, **kw)


def test_batched_evaluation_equals_a_direct_loop(setup, full):
    model_dir, qfile, said = setup
    summary, out = full
    rows = [json.loads(line) for line in (out / "predictions.jsonl").open()]
    assert [r["prediction"] for r in rows] == said
    questions, _ = load_questions(qfile)
    direct = [score(p, q.answer)["normalized"] for p, q in zip(said, questions)]
    assert summary["accuracy"] == sum(direct) / N == 4 / N
    assert summary["by_kind"]["even"]["accuracy"] == 1.0
    assert summary["by_kind"]["odd"]["accuracy"] == 0.0
    assert summary["count"] == N and summary["by_kind"]["odd"]["count"] == 3
    assert set(rows[0]) == {"question_id", "kind", "prediction", "answer", "correct", "exact",
                            "visual_tokens", "router_keep_rate"}
    assert all(r["visual_tokens"] > 0 and 0 <= r["router_keep_rate"] <= 1 for r in rows)
    assert json.loads((out / "summary.json").read_text()) == summary
    md = (out / "summary.md").read_text()
    assert "| even | 4 | 100.0% |" in md and "| **all** | 7 | 57.1% |" in md


def test_resume_after_an_interruption_and_a_torn_line(setup, full, tmp_path):
    out = tmp_path / "stopped"

    def stop(done):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(setup, out, batch_size=2, after_batch=stop)
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 2 and not (out / "summary.json").exists()
    with open(out / "predictions.jsonl", "a") as fh:
        fh.write('{"question_id": "col')  # a kill in the middle of a write
    seen = []
    resumed = run(setup, out, batch_size=2, after_batch=seen.append)
    assert seen == [4, 6, 7]  # the first two questions were not asked again
    assert resumed == full[0]  # batches of 2 here, of 3 there
    assert (out / "predictions.jsonl").read_text() == (full[1] / "predictions.jsonl").read_text()


@pytest.mark.slow
def test_resume_after_a_real_kill(setup, full, tmp_path):
    model_dir, qfile, _ = setup
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "recipes.eval", "--model", str(model_dir), "--questions",
           str(qfile), "--out", str(out), "--batch-size", "1", "--max-new-tokens", str(NEW),
           "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[1], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pred = out / "predictions.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not pred.exists() or not pred.read_text().strip()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "summary.json").exists()
    done = len(read_predictions(pred))
    seen = []
    resumed = run(setup, out, batch_size=4, after_batch=seen.append)  # the command's settings
    assert seen == [] if done == N else seen[0] == min(done + 4, N)
    assert resumed == full[0]


def test_other_settings_and_damaged_predictions_are_refused(setup, full, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(full[1], out)
    with pytest.raises(EvalStateError, match="other settings .*format.*--restart"):
        run(setup, out, fmt="none")
    assert run(setup, out, fmt="none", restart=True)["settings"]["format"] == "none"
    lines = (out / "predictions.jsonl").read_text().splitlines()
    (out / "predictions.jsonl").write_text("\n".join([lines[0], "{oops", *lines[2:]]) + "\n")
    with pytest.raises(EvalStateError, match="line 2 is damaged"):
        read_predictions(out / "predictions.jsonl")
    (out / "predictions.jsonl").write_text(lines[1] + "\n")
    with pytest.raises(EvalStateError, match="line 1 is question .* not this question file's"):
        read_predictions(out / "predictions.jsonl", load_questions(setup[1])[0])


def test_command_line(setup, full, tmp_path, capsys):
    model_dir, qfile, _ = setup
    out = tmp_path / "cli"
    shutil.copytree(full[1], out)  # all answered: the command loads, resumes and sums up
    assert main(["--model", str(model_dir), "--questions", str(qfile), "--out", str(out),
                 "--max-new-tokens", str(NEW), "--no-progress"]) == 0
    assert "accuracy 57.1% " in capsys.readouterr().out

    def fails(args, message):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("eval: error: ") and message in err[0], err

    base = ["--out", str(tmp_path / "x")]
    fails(["--model", str(tmp_path / "none"), "--questions", str(qfile), *base],
          "model folder")
    fails(["--model", str(model_dir), "--questions", str(tmp_path / "q.json"), *base],
          "question file")
    broken = qfile.parent / "broken.jsonl"
    broken.write_text(qfile.read_text().replace("img_00002.png", "gone.png"))
    fails(["--model", str(model_dir), "--questions", str(broken), *base],
          "gone.png' does not exist")
    assert main(["--model", str(model_dir), "--questions", str(broken), *base, "--skip-bad",
                 "--no-progress", "--max-new-tokens", "2"]) == 0
    assert "eval: skipped record 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--questions", str(qfile), *base, "--format", "long"])
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--questions", str(qfile), *base, "--batch-size", "0"])


def test_template_is_the_saved_one(setup):
    model, tokenizer, extra = load_chat_model(setup[0])
    assert extra["template"] == "qa" and get_template("qa").name == "qa"
