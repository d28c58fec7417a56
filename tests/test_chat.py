"""recipes.chat: answers from a tiny saved model (random weights) checked against a greedy decode by
full forward passes, the visual-token report, and the command's exit codes and messages."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from recipes.build import build_model  # noqa: E402
from recipes.model_folder import save_model_folder  # noqa: E402
from recipes.chat import answer, load_chat_model, main, respond, slicer_for  # noqa: E402
from recipes.data import make_color_dataset  # noqa: E402
from recipes.templates import TemplateError, get_template  # noqa: E402
from slime_adapters import SlicingError  # noqa: E402

QUESTION = "what color is the square ?"
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


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    built = build_model(TINY)
    save_model_folder(built.model, root / "model", tokenizer=built.tokenizer,
                      extra={"template": "qa", "slicer": {"max_tiles": 4}})
    make_color_dataset(root / "data", 1, seed=2)
    return root / "model", root / "data" / "img_00000.png"


@pytest.fixture(scope="module")
def loaded(saved):
    return load_chat_model(saved[0])


def greedy_by_forward(model, tokenizer, image, template, steps):
    """The oracle: greedy decoding by full forward passes, no cache; returns per step the chosen
    id's logit and the best logit."""
    from slime_adapters.slicing import collate

    enc = template.encode(tokenizer, [{"from": "human", "value": f"<image>\n{QUESTION}"}],
                          for_generation=True)
    images = collate([slicer_for(model, {"max_tiles": 4})(image)])
    q = torch.tensor([enc.question_ids])
    ids = list(enc.input_ids)
    out = []
    for token in steps:
        x = torch.tensor([ids])
        with torch.no_grad():
            row = model(images=images, input_ids=x, attention_mask=torch.ones_like(x),
                        question_ids=q, question_mask=torch.ones_like(q, dtype=torch.bool)
                        ).logits[0, -1]
        out.append((row[token].item(), row.max().item()))
        ids.append(token)
    return out


def test_answer_is_the_greedy_decode_of_the_model(saved, loaded):
    model, tokenizer, extra = loaded
    assert extra["template"] == "qa" and extra["stage"] is None
    assert extra["slicer"]["max_tiles"] == 4 and extra["slicer"]["tile_size"] == 336
    slicer = slicer_for(model, extra["slicer"])
    assert slicer.config.tile_size == 336 and slicer.config.max_tiles == 4
    template = get_template("qa")
    result = respond(model, tokenizer, saved[1], QUESTION, template="qa", slicer=slicer,
                     max_new_tokens=6)
    assert 1 <= len(result.generated_ids) <= 6
    assert result.generated_ids[:len(result.token_ids)] == result.token_ids
    stops = template.stop_token_ids(tokenizer)
    assert not set(result.token_ids) & set(stops)
    assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True).strip()
    for chosen, best in greedy_by_forward(model, tokenizer, saved[1], template,
                                          result.generated_ids):
        assert chosen >= best - 1e-4, (chosen, best)
    text = answer(model, tokenizer, saved[1], QUESTION, template="qa", slicer=slicer,
                  max_new_tokens=6)
    assert isinstance(text, str) and text == result.text


def test_visual_token_report_and_router_gamma(saved, loaded):
    model, tokenizer, extra = loaded
    slicer = slicer_for(model, extra["slicer"])
    sliced = slicer(saved[1])
    r = respond(model, tokenizer, sliced, QUESTION, template="qa", max_new_tokens=1)
    assert r.local_offered == sliced.num_tiles * 16
    assert 1 <= r.local_kept <= r.local_offered
    assert r.visual_tokens == 64 + 1 + r.local_kept  # global + learned separator + kept local
    assert r.router_keep_rate == r.local_kept / r.local_offered
    everything = respond(model, tokenizer, sliced, QUESTION, template="qa", max_new_tokens=1,
                         router_gamma=1.0)
    assert everything.local_kept == everything.local_offered


def test_respond_errors(saved, loaded):
    model, tokenizer, _ = loaded
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 0"):
        respond(model, tokenizer, saved[1], QUESTION, max_new_tokens=0)
    with pytest.raises(TemplateError, match="unknown chat template 'nope'"):
        respond(model, tokenizer, saved[1], QUESTION, template="nope")
    with pytest.raises(SlicingError):
        respond(model, tokenizer, b"not an image", QUESTION)
    with pytest.raises(ValueError, match="do not fit AdaptiveSlicer"):
        slicer_for(model, {"tile": 3})
    with pytest.raises(ValueError, match="the saved slicer must be a dict"):
        slicer_for(model, [1])


def test_command_prints_the_answer(saved, loaded, capsys):
    model, tokenizer, extra = loaded
    expect = answer(model, tokenizer, saved[1], QUESTION, template="qa",
                    slicer=slicer_for(model, extra["slicer"]), max_new_tokens=4)
    code = main(["--model", str(saved[0]), "--image", str(saved[1]), "--question", QUESTION,
                 "--max-new-tokens", "4", "--verbose"])
    out, err = capsys.readouterr()
    assert code == 0 and out == expect + "\n"
    assert "visual tokens: " in err and "local tokens" in err and "template qa" in err


def test_command_errors_exit_2_with_one_line(saved, tmp_path, capsys):
    model, image = (str(p) for p in saved)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a png")
    (tmp_path / "empty").mkdir()
    cases = [
        (["--model", str(tmp_path / "none"), "--image", image], "model folder .*none' does not"),
        (["--model", model, "--image", str(tmp_path / "none.png")], "image .*none.png' does not"),
        (["--model", model, "--image", str(junk)], "junk.png"),
        (["--model", model, "--image", image, "--template", "nope"], "unknown chat template"),
        (["--model", str(tmp_path / "empty"), "--image", image], "config.json' does not exist"),
        (["--model", model, "--image", image, "--question", "<image> twice <image>"],
         "turn 0 must hold '<image>' exactly once, found 2"),
    ]
    for args, message in cases:
        assert main(["--question", QUESTION, *args]) == 2, args
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith("chat: error: "), err
        assert re.search(message, err), (message, err)
    for bad in (["--max-new-tokens", "0"], ["--router-gamma", "1.5"]):
        with pytest.raises(SystemExit) as exc:
            main(["--model", model, "--image", image, "--question", QUESTION, *bad])
        assert exc.value.code == 2
        assert bad[0] in capsys.readouterr().err


def test_python_dash_m_exits_2_without_a_traceback(tmp_path):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.chat", "--model", str(tmp_path / "none"), "--image",
         "x.png", "--question", QUESTION], cwd=root, capture_output=True, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "chat: error: model folder" in proc.stderr


def test_command_uses_the_saved_stage_views_and_router_gamma(saved, loaded, tmp_path, capsys):
    """A model saved after stage I answers from global views; a stage's γ is the default."""
    from recipes.chat import stage_settings

    model, tokenizer, extra = loaded
    args = ["--image", str(saved[1]), "--question", QUESTION, "--max-new-tokens", "1", "--verbose"]
    for name, stage, expect in (
            ("g", {"name": "I", "views": "global", "router_gamma": None, "force_expert": None},
             "global view only"),
            ("b", {"name": "III", "views": "both", "router_gamma": 1.0, "force_expert": None},
             r"router kept (\d+) of \1 local tokens")):
        save_model_folder(model, tmp_path / name, tokenizer=tokenizer,
                          extra={**extra, "stage": stage})
        assert stage_settings({"stage": stage}) == {
            k: stage[k] for k in ("views", "router_gamma", "force_expert")}
        assert main(["--model", str(tmp_path / name), *args]) == 0
        assert re.search(expect, capsys.readouterr().err)
    # --router-gamma still overrides the saved γ
    assert main(["--model", str(tmp_path / "b"), *args, "--router-gamma", "0.05"]) == 0
    kept = re.search(r"router kept (\d+) of (\d+)", capsys.readouterr().err)
    assert int(kept.group(1)) < int(kept.group(2))
    assert stage_settings({}) == {"views": None, "router_gamma": None, "force_expert": None}
