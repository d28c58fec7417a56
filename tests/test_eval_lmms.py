"""The lmms-eval plugin: ``--model slime`` resolves to this package's model, ``lmms_eval`` runs
the offline task on a tiny saved model on the CPU and its accuracy and answers equal
``recipes.eval``'s on the same records; ``loglikelihood`` agrees with greedy decoding.

lmms-eval is not in the default test venv (it pulls in torchvision, which does not import beside
the CPU torch wheel): ``make test-lmms-eval`` runs this file in its own venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed; `make test-lmms-eval` runs "
                    "these tests in their own venv")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from recipes.build import build_model  # noqa: E402
from recipes.chat import load_chat_model, respond, slicer_for  # noqa: E402
from recipes.data import make_color_dataset  # noqa: E402
from recipes.eval import evaluate_folder  # noqa: E402
from recipes.eval_data import build_prompt, load_questions  # noqa: E402
from recipes.model_folder import save_model_folder  # noqa: E402
from slime_adapters.eval.task import write_task  # noqa: E402

# its own copy of tests.test_chat.TINY: in the lmms-eval venv a `tests` package installed by a
# dependency shadows this repository's, so tests.test_chat cannot be imported here
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
N, NEW = 5, 4
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny model and a question file whose even records' answers are what the model
    says (accuracy 3/5)."""
    root = tmp_path_factory.mktemp("lmms")
    torch.manual_seed(1)
    built = build_model(TINY)
    save_model_folder(built.model, root / "model", tokenizer=built.tokenizer,
                      extra={"template": "qa", "slicer": {"max_tiles": 4}})
    questions, _ = load_questions(make_color_dataset(root / "data", N, seed=4))
    model, tokenizer, extra = load_chat_model(root / "model")
    slicer = slicer_for(model, extra["slicer"])
    said = [respond(model, tokenizer, q.image, build_prompt(q, "short"), template="qa",
                    slicer=slicer, max_new_tokens=NEW).text for q in questions]
    qfile = root / "data" / "questions.jsonl"
    qfile.write_text("".join(json.dumps({
        "question_id": q.qid, "image": q.image.name, "question": q.question,
        "answer": s if i % 2 == 0 else f"not {s}", "kind": "k"}) + "\n"
        for i, (q, s) in enumerate(zip(questions, said))))
    return root, qfile, said


def test_the_model_name_resolves_to_this_package():
    from lmms_eval.models import get_model

    from slime_adapters.eval.lmms_eval_slime import SliMEChat, SliMESimple

    assert get_model("slime") is SliMEChat and SliMEChat.is_simple is False
    assert get_model("slime", force_simple=True) is SliMESimple


def test_lmms_eval_on_the_local_task_equals_recipes_eval(setup):
    root, qfile, said = setup
    write_task(qfile, root / "tasks", max_new_tokens=NEW)
    ours = evaluate_folder(root / "model", qfile, root / "ours", max_new_tokens=NEW,
                           progress=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(root / "hf")}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "slime", "--model_args",
           f"pretrained={root / 'model'},attn_implementation=sdpa", "--tasks", "slime_detail",
           "--include_path", str(root / "tasks"), "--batch_size", "2", "--device", "cpu",
           "--output_path", str(root / "results"), "--log_samples"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (root / "results").rglob("*results.json")]
    assert len(results) == 1
    metrics = results[0]["results"]["slime_detail"]
    assert metrics["accuracy,none"] == pytest.approx(ours["accuracy"]) == 3 / N
    assert metrics["exact_match,none"] == pytest.approx(ours["exact_match"])
    samples = [json.loads(line) for p in (root / "results").rglob("*slime_detail*.jsonl")
               for line in p.read_text().splitlines()]
    got = {s["doc_id"]: s["filtered_resps"] for s in samples}
    got = [got[i] if isinstance(got[i], str) else got[i][0] for i in range(N)]
    theirs = [json.loads(line)["prediction"]
              for line in (root / "ours" / "predictions.jsonl").read_text().splitlines()]
    assert got == theirs == said


def test_loglikelihood_agrees_with_greedy_decoding(setup):
    from slime_adapters.eval.lmms_eval_slime import SliMESimple

    root, qfile, said = setup
    lm = SliMESimple(pretrained=str(root / "model"))
    questions, _ = load_questions(qfile)
    for q, s in list(zip(questions, said))[:3]:
        prompt = build_prompt(q, "short")
        lp, greedy = lm._logprob(prompt, q.image, s)
        assert greedy and lp < 0
        first = s.split()[0]
        lp1, greedy1 = lm._logprob(prompt, q.image, first)
        other = "red" if first != "red" else "blue"
        lp2, greedy2 = lm._logprob(prompt, q.image, other)
        assert greedy1 and not greedy2 and lp2 < lp1 and lp <= lp1 + 1e-6
    with pytest.raises(ValueError, match="unknown model_args"):
        SliMESimple(pretrained=str(root / "model"), gamma=0.5)
    with pytest.raises(ValueError, match="router_gamma must be in"):
        SliMESimple(pretrained=str(root / "model"), router_gamma=2)
    with pytest.raises(NotImplementedError, match="decodes greedily"):
        lm._answer(["x"], [questions[0].image], {"do_sample": True, "temperature": 0.7})
