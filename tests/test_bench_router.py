"""Smoke test of benchmarks/bench_router.py at a tiny size: output files, fast == oracle, and the
sparsity rows make sense. Times are recorded, never asserted."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from benchmarks import bench_router  # noqa: E402
from benchmarks._common import peak_memory_bytes, result_stem, summarise  # noqa: E402


def test_tiny_run_writes_results_and_agrees_with_oracle(tmp_path, capsys):
    assert bench_router.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    import torch

    stem = result_stem("bench_router", torch.device("cpu"))
    js = tmp_path / f"{stem}.json"
    assert js.is_file()
    for suffix in ("_kept_vs_gamma.png", "_recall_vs_kept.png"):
        png = tmp_path / f"{stem}{suffix}"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert data["checks_passed"] is True
    for c in data["checks"]:
        assert c["router_equals_oracle"] and c["legacy_equals_released_code"], c
        assert c["released_equals_released_code"] and c["router_max_score_error"] < 1e-10
    table = data["sparsity"]
    rows = [dict(zip(table["columns"], r)) for r in table["rows"]]
    assert {r["method"] for r in rows} == {"router", "released", "legacy", "random"}
    args = data["args"]
    expected = (len(args["tokens"]) * len(args["text_lens"]) * len(args["signals"])
                * len(args["temperatures"]) * len(args["gammas"]) * 4)
    assert len(rows) == expected
    for r in rows:
        assert 0 < r["kept_mean"] <= 1 and 0 <= r["recall_mean"] <= 1
        if r["gamma"] == 1.0:
            assert r["kept_mean"] == 1.0 and r["recall_mean"] == 1.0
    # the random baseline keeps exactly the router's budget
    for r in rows:
        if r["method"] == "random":
            twin = next(q for q in rows if q["method"] == "router" and all(
                q[k] == r[k] for k in ("n", "l", "signal", "temperature", "gamma")))
            assert r["kept_mean"] == twin["kept_mean"]
    for t in data["timing"]:
        for name in ("fast", "oracle", "released"):
            assert t[f"{name}_time"]["median_s"] > 0
            assert t[f"{name}_peak_bytes"] is None or t[f"{name}_peak_bytes"] >= 0
    assert "speed-up of CosineTokenRouter" in capsys.readouterr().out.strip().splitlines()[-1]


def test_cpu_peak_memory_counts_live_intermediates():
    import torch

    def work():
        a = torch.ones(1000, 1000)  # 4 MB
        b = a + 1  # 4 MB, both alive
        del a
        return b.sum()

    peak = peak_memory_bytes(work, torch.device("cpu"))
    if peak is None:
        pytest.skip("this torch build's profiler reports no allocation events")
    assert 8_000_000 <= peak < 8_100_000
    assert summarise([1.0, 3.0]) == {"median": 2.0, "mean": 2.0, "std": 1.0, "min": 1.0,
                                     "max": 3.0}
