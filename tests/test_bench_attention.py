"""Smoke test of benchmarks/bench_attention.py: a tiny CPU run writes its JSON and every backend
that runs equals the float64 oracle; a wrong backend is refused."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_attention, run_all

TINY = ["--tiny", "--device", "cpu", "--threads", "1", "--min-run-time", "0.01", "--no-memory"]


def test_tiny_run_writes_results_and_backends_equal_the_oracle(tmp_path, capsys):
    result = bench_attention.run(TINY + ["--out", str(tmp_path)])
    files = list(tmp_path.glob("bench_attention_cpu_torch*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["dtype"] == "float32" and saved["failures"] == []
    assert [c["name"] for c in saved["cases"]] == ["dense_144x576", "dense_576x576", "packed"]
    assert saved["cases"][2]["seqlens"] == [5, 17, 9] and saved["cases"][2]["batch"] == 1
    for case in saved["cases"]:
        assert case["auto"] == "sdpa"  # the CPU's first choice, probed in this run
        assert "CUDA only" in case["skipped"]["xformers"][0]
        assert set(case["checks"]) == {"sdpa", "math"}
        for check in case["checks"].values():
            assert check["ok"]
            assert check["forward_rel_error"] <= 1e-5
            assert max(check[f"grad_{n}_rel_error"] for n in "qkv") <= 1e-5
        assert {r["impl"] for r in case["results"]} == {"sdpa", "math", "oracle"}
        assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in case["results"])
        assert set(case["ratios_math_over"]) == {"sdpa", "oracle"}
    lines = capsys.readouterr().out.strip().splitlines()
    assert all(line.startswith("ratio math/") for line in lines[-6:])
    assert "auto picks: dense_144x576 -> sdpa" in "\n".join(lines)


def test_memory_and_float64_checks(tmp_path):
    result = bench_attention.run(["--tiny", "--device", "cpu", "--dtype", "float64",
                                  "--backends", "math", "--min-run-time", "0.01",
                                  "--out", str(tmp_path)])
    case = result["cases"][0]
    assert case["checks"]["math"]["forward_rel_error"] <= 1e-12
    assert set(case["checks"]) == {"math"} and "sdpa" not in case["skipped"]
    row = next(r for r in case["results"] if r["impl"] == "math")
    assert row["fwd_peak_bytes"] is None or row["fwd_peak_bytes"] > 0


def test_a_backend_that_disagrees_is_not_timed_and_fails_the_run(tmp_path, monkeypatch):
    real = bench_attention.attention

    def wrong(q, k, v, *, backend="auto", **kw):
        out = real(q, k, v, backend=backend, **kw)
        return out * 1.01 if backend == "math" else out

    monkeypatch.setattr(bench_attention, "attention", wrong)
    with pytest.raises(SystemExit, match=r"disagree with the float64 oracle: dense_144x576/math"):
        bench_attention.run(TINY + ["--out", str(tmp_path)])
    saved = json.loads(next(tmp_path.glob("bench_attention_*.json")).read_text())
    assert len(saved["failures"]) == 3
    for case in saved["cases"]:
        assert not case["checks"]["math"]["ok"] and case["checks"]["sdpa"]["ok"]
        assert {r["impl"] for r in case["results"]} == {"sdpa", "oracle"}


def test_inputs_are_the_same_numbers_on_every_device_and_dtype():
    case = bench_attention.cases(True, False)[2]
    a = bench_attention.make_inputs(case, 2, 8, torch.device("cpu"), torch.float64, 4)
    b = bench_attention.make_inputs(case, 2, 8, torch.device("cpu"), torch.bfloat16, 4)
    assert [t.shape for t in a] == [(1, 31, 2, 8)] * 4
    for x, y in zip(a, b):
        torch.testing.assert_close(y.double(), x.to(torch.bfloat16).double(), rtol=0, atol=0)
    full = bench_attention.cases(False, True)
    assert [(c["b"], c["m"], c["n"]) for c in full[:2]] == [(36, 144, 576), (16, 576, 576)]
    assert full[2]["seqlens"] == list(bench_attention.PACKED_LENGTHS)
    assert full[2]["m"] == sum(bench_attention.PACKED_LENGTHS)


def test_bad_flags_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        bench_attention.run(["--heads", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        bench_attention.run(["--backends", "flash", "--out", str(tmp_path)])
    assert not list(tmp_path.glob("*.json"))


def test_run_all_knows_the_benchmark():
    assert "bench_attention" in run_all.BENCHMARKS
    assert run_all.command("bench_attention", tiny=True, out=None, extra=[])[-2:] == [
        "benchmarks.bench_attention", "--tiny"]
