"""The demo pipeline at a tiny size (seconds): every stage runs, the outputs hold what the report
promises, bad arguments are refused before anything is written."""

from __future__ import annotations

import json

import pytest

from recipes import demo
from recipes.demo_report import notes, summarise

TINY = ["--train", "6", "--val", "2", "--test", "4", "--steps", "2", "2", "2",
        "--stage0-steps", "2", "--stage0-batch", "4", "--stage0-pool", "4",
        "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, demo.main(TINY + ["--out", str(out)])


def test_tiny_demo_writes_the_table_the_png_and_the_report(run):
    out, report = run
    assert (out / "results.png").stat().st_size > 1000
    assert "| slime-all-local |" in (out / "results.md").read_text()
    saved = json.loads((out / "report.json").read_text())
    assert saved["rows"] == report["rows"] and saved["args"]["steps"] == [2, 2, 2]
    assert set(saved["chance"]) == {"detail", "global"}
    keys = {"variant", "kind", "size_bucket", "accuracy", "n", "visual_tokens_mean",
            "local_kept_fraction", "seed"}
    assert all(set(r) == keys for r in saved["rows"])
    by = {(r["variant"], r["kind"], r["size_bucket"]): r for r in saved["rows"]}
    for v in demo.VARIANTS:
        assert by[(v, "detail", "all")]["n"] == 4 and by[(v, "global", "all")]["n"] == 4
    # global views only: 144 tokens per image, no local tokens; gamma = 1 keeps every local token
    assert by[("global-only", "detail", "all")]["visual_tokens_mean"] == 144
    assert by[("global-only", "detail", "all")]["local_kept_fraction"] is None
    assert by[("slime-all-local", "detail", "all")]["local_kept_fraction"] == 1.0
    kept = by[("slime", "detail", "all")]["local_kept_fraction"]
    assert 0 < kept < 1
    assert (by[("slime", "detail", "all")]["visual_tokens_mean"]
            < by[("slime-all-local", "detail", "all")]["visual_tokens_mean"])
    stages = [(s.get("variant"), s["stage"]) for s in saved["stages"]]
    assert stages == [(None, "0"), ("global-only", "I"), ("global-only", "III-global"),
                      ("slime", "I"), ("slime", "II"), ("slime", "III")]
    assert all(s["steps"] == 2 for s in saved["stages"][3:])


def test_a_second_run_reuses_the_data_and_the_frozen_encoder(run, capsys):
    out, _ = run
    before = (out / "data" / "train" / "data.json").stat().st_mtime_ns
    report = demo.main(TINY + ["--out", str(out), "--steps", "1", "1", "1"])
    assert report["stages"][0]["cached"] is True
    assert (out / "data" / "train" / "data.json").stat().st_mtime_ns == before
    assert "encoder is reused" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--steps", "0", "1", "1"], "--steps must be three numbers >= 1, got 0 1 1"),
    (["--train", "0"], "--train must be at least 1, got 0"),
    (["--gamma", "1.5"], "--gamma must lie in"),
    (["--train", "1", "--batch-size", "4"], "fewer than --batch-size 4"),
])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--out", str(tmp_path / "run")] + args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_summary_rows_and_the_flag_for_a_loss_that_did_not_fall():
    results = [{"correct": c, "kind": k, "size_bucket": b, "visual_tokens": t, "kept": kept,
                "local": 96} for c, k, b, t, kept in [
                    (True, "detail", ">1000", 200, 50), (False, "detail", ">1000", 180, 30),
                    (True, "global", "<=336", 150, 5)]]
    rows = {(r["kind"], r["size_bucket"]): r for r in summarise(results, variant="v", seed=1)}
    assert rows[("detail", ">1000")]["accuracy"] == 0.5
    assert rows[("detail", ">1000")]["visual_tokens_mean"] == 190
    assert rows[("detail", "all")]["local_kept_fraction"] == 80 / 192
    assert rows[("global", "<=336")]["n"] == 1 and ("detail", "<=336") not in rows
    report = {"rows": [], "stages": [{"variant": "slime", "stage": "II", "loss_fell": False},
                                     {"variant": "slime", "stage": "III", "loss_fell": True}]}
    assert notes(report) == ["the loss did not fall in: slime II"]
