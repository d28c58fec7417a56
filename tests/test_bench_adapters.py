"""Smoke test of benchmarks/bench_adapters.py: runs in seconds, writes its JSON, fast == oracle."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_adapters


def test_tiny_run_writes_results_and_checks(tmp_path, capsys):
    result = bench_adapters.run(["--tiny", "--device", "cpu", "--rounds", "2", "--min-run-time",
                                 "0.01", "--out", str(tmp_path)])
    files = list(tmp_path.glob("bench_adapters-*.json"))
    assert len(files) == 1 and files[0].name.startswith(f"bench_adapters-{result['device']}-torch")
    saved = json.loads(files[0].read_text())
    assert saved["scenario"]["tiles"] == 3 and saved["dtype"] == "float32"
    for key, err in saved["checks_relative_error"].items():  # fast == oracle before timing
        assert err <= (1e-9 if key.endswith("float64") else 1e-4), key
    works = {(r["work"], r["impl"]) for r in saved["results"]}
    assert works == {(w, i) for w in ("moe_projector", "compress_mlp") for i in ("fast", "oracle")}
    for r in saved["results"]:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["saved_bytes"] > 0
    assert set(saved["ratios_oracle_over_fast"]) == {
        "moe_projector_fwd", "moe_projector_fwd_bwd", "compress_mlp_fwd", "compress_mlp_fwd_bwd"}
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("ratio oracle/fast:")


def test_mismatch_is_refused(tmp_path, monkeypatch):
    """The run stops before timing when the fast module and the oracle disagree."""
    real = bench_adapters.noisy_moe_reference

    def wrong(*a, **kw):
        tokens, gates, aux = real(*a, **kw)
        return tokens + 1.0, gates, aux

    monkeypatch.setattr(bench_adapters, "noisy_moe_reference", wrong)
    with pytest.raises(SystemExit, match="disagrees with the oracle"):
        bench_adapters.run(["--tiny", "--device", "cpu", "--out", str(tmp_path)])
    assert not list(tmp_path.glob("*.json"))
