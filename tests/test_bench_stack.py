"""Smoke test of benchmarks/bench_stack.py: a tiny run writes its JSON and checks fast == oracle."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_stack


def test_tiny_run_writes_results_and_fast_equals_oracle(tmp_path, capsys):
    result = bench_stack.run(["--tiny", "--device", "cpu", "--threads", "1", "--min-run-time",
                              "0.01", "--no-memory", "--out", str(tmp_path)])
    files = list(tmp_path.glob("bench_stack_cpu_torch*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["scenario"]["tiles_by_policy"] == {"reference": 19, "paper": 26}
    assert saved["scenario"]["tiles"] == sum(c * r for c, r in saved["scenario"]["grids"])
    assert saved["checks"]["float64"]["relative_error"] <= 1e-9
    assert saved["checks"]["float32"]["relative_error"] <= 1e-3
    assert {r["impl"] for r in saved["results"]} == {"fast", "oracle"}
    for r in saved["results"]:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
    assert set(saved["ratios_oracle_over_fast"]) == {"fwd", "fwd_bwd"}
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("ratio oracle/fast:")


def test_oracle_matches_adapter_in_float64_at_full_scenario_grids():
    """The released port and the fast adapter agree on the SPEC's 19-tile layout (small widths)."""
    grids = [(3, 2), (1, 7), (2, 2), (2, 1)]
    adapter = bench_stack.build_adapter(16, 24, 16, 4, 0.9, torch.device("cpu"), torch.float64)
    inputs = bench_stack.make_inputs(grids, 16, 16, 24, 5, torch.device("cpu"), torch.float64, 3)
    cmp = bench_stack.compare(adapter, inputs, 0.9)
    assert cmp["lengths"][0] < 16 + 1 + 6 * 4 + 1  # the router dropped something
    assert cmp["relative_error"] <= 1e-12, cmp


def test_mismatch_is_refused(tmp_path, monkeypatch):
    real = bench_stack.stack_oracle

    def wrong(*a, **kw):
        return [o + 1.0 for o in real(*a, **kw)]

    monkeypatch.setattr(bench_stack, "stack_oracle", wrong)
    with pytest.raises(SystemExit, match="disagrees with the oracle"):
        bench_stack.run(["--tiny", "--device", "cpu", "--no-memory", "--out", str(tmp_path)])
    assert not list(tmp_path.glob("*.json"))


def test_bad_flags_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        bench_stack.run(["--queries", "5", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        bench_stack.run(["--threads", "0", "--out", str(tmp_path)])


@pytest.mark.slow
def test_run_all_runs_the_chosen_benchmarks(tmp_path, capsys):
    from benchmarks import run_all

    assert run_all.main(["--tiny", "--only", "bench_tokens", "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("bench_tokens_*.json"))) == 1
    assert "bench_tokens: ok" in capsys.readouterr().out
    assert run_all.command("bench_stack", tiny=False, out=None, extra=[])[-1] == "benchmarks.bench_stack"
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nope"])


def test_low_precision_run_checks_values_at_gamma_one(tmp_path):
    result = bench_stack.run(["--tiny", "--device", "cpu", "--dtype", "bfloat16", "--threads", "1",
                              "--min-run-time", "0.01", "--no-memory", "--out", str(tmp_path)])
    assert result["dtype"] == "bfloat16"
    assert set(result["checks"]) == {"float64", "float32", "bfloat16_gamma1"}
    tiles = result["scenario"]["tiles"]  # γ = 1 keeps every local token: 16 + 1 + 4 per tile
    assert sum(result["checks"]["bfloat16_gamma1"]["lengths"]) == 4 * (16 + 1) + 4 * tiles
    assert result["checks"]["bfloat16_gamma1"]["relative_error"] <= 5e-2


def test_compare_pair_reports_the_worst_element():
    """The check used for --compile (compiled vs eager copy), here on two eager adapters."""
    import copy

    adapter = bench_stack.build_adapter(16, 24, 16, 4, 1.0, torch.device("cpu"), torch.float64)
    inputs = bench_stack.make_inputs([(2, 1), (1, 1)], 16, 16, 24, 5, torch.device("cpu"),
                                     torch.float64, 1)
    same = bench_stack.compare_pair(copy.deepcopy(adapter), adapter, inputs, 1.0)
    assert same["relative_error"] == 0.0 and same["lengths"] == [2 * 17 + 3 * 4]
    other = copy.deepcopy(adapter)
    with torch.no_grad():
        other.projector.mlp[2].bias[5] += 1.0
    cmp = bench_stack.compare_pair(other, adapter, inputs, 1.0)
    assert cmp["relative_error"] > 0.01 and cmp["worst_index"][1] == 5
