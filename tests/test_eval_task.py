"""slime_adapters.eval without lmms-eval: the task writer's files and errors, the task's scoring
functions, and the plugin module importing (and refusing to run) without the extra."""

from __future__ import annotations

import importlib.util
import json

import pytest
from PIL import Image

from slime_adapters.eval.task import doc_to_text, doc_to_visual, main, process_results, write_task


@pytest.fixture
def qfile(tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    records = [{"question_id": "q1", "image": "a.png", "question": "Color?", "answer": "red"},
               {"question_id": "q2", "image": "a.png", "question": "Pick", "answer": "B",
                "choices": ["cat", "dog"], "kind": "mc"}]
    path = tmp_path / "q.json"
    path.write_text(json.dumps(records))
    return path


def test_write_task_files(qfile, tmp_path):
    yaml = write_task(qfile, tmp_path / "tasks", fmt="short", max_new_tokens=3)
    assert yaml == tmp_path / "tasks" / "slime_detail" / "slime_detail.yaml"
    text = yaml.read_text()
    data = tmp_path / "tasks" / "slime_detail" / "data.jsonl"
    assert "task: slime_detail\n" in text and "dataset_path: json\n" in text
    assert f"test: {json.dumps(str(data.resolve()))}\n" in text
    assert "max_new_tokens: 3\n" in text and "!function utils.process_results" in text
    assert "from slime_adapters.eval.task import" in (yaml.parent / "utils.py").read_text()
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert rows[0]["prompt"] == "Color?\nAnswer the question using a single word or phrase."
    assert rows[1]["prompt"].startswith("Pick\nA. cat\nB. dog\n")
    assert rows[0]["answers"] == ["red"] and rows[0]["choices"] == [] and rows[1]["kind"] == "mc"
    assert rows[0]["image"] == str((tmp_path / "a.png").resolve())
    assert doc_to_text(rows[0]) == rows[0]["prompt"]
    (im,) = doc_to_visual(rows[0])
    assert im.size == (40, 30) and im.getpixel((0, 0)) == (200, 10, 10)
    assert process_results(rows[0], ["Red."]) == {"accuracy": 1.0, "exact_match": 0.0}
    assert process_results(rows[1], ["B"]) == {"accuracy": 1.0, "exact_match": 1.0}
    assert process_results(rows[1], ["cat"]) == {"accuracy": 0.0, "exact_match": 0.0}


def test_write_task_errors(qfile, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown format 'long'"):
        write_task(qfile, tmp_path, fmt="long")
    with pytest.raises(ValueError, match="must be an identifier"):
        write_task(qfile, tmp_path, name="a-b")
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        write_task(qfile, tmp_path, max_new_tokens=0)
    assert main(["--questions", str(tmp_path / "none.json"), "--out", str(tmp_path)]) == 2
    assert "task: error: question file" in capsys.readouterr().err
    assert not (tmp_path / "slime_detail").exists()


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is not None,
                    reason="lmms-eval is installed")
def test_plugin_without_lmms_eval_says_what_to_install():
    from slime_adapters.eval.lmms_eval_slime import SliMEChat

    with pytest.raises(ImportError, match=r"slime-adapters\[eval\]"):
        SliMEChat(pretrained="x")
