"""Smoke test of benchmarks/bench_tokens.py and checks of its token and FLOP formulas."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_tokens
from slime_adapters.slicing import plan_grid


def test_tiny_run_writes_results(tmp_path, capsys):
    result = bench_tokens.run(["--tiny", "--out", str(tmp_path)])
    files = {p.suffix for p in tmp_path.glob("bench_tokens_cpu_torch*")}
    assert files == {".json", ".png"}
    saved = json.loads(next(tmp_path.glob("bench_tokens_cpu_torch*.json")).read_text())
    assert saved == json.loads(json.dumps(result))
    assert [r["size"] for r in saved["rows"]] == [[336, 336], [1024, 768], [300, 3000]]
    for r in saved["rows"]:
        t = r["tokens"]
        assert t["llava-1.5"] == 576
        assert t["llava-next"] == bench_tokens.llava_next_tokens_oracle(*r["size"])
        tiles = plan_grid(*r["size"], policy="paper").num_tiles
        assert t["slime-paper@1"] == 576 + 1 + 144 * tiles  # γ = 1 keeps every local token
        counts = [t[f"slime-paper@{g:g}"] for g in (0.5, 0.75, 0.95, 1.0)]
        assert counts == sorted(counts)  # a larger γ never keeps fewer tokens
        for key, rate in r["keep_rates"].items():
            assert 0 < rate <= 1, key
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("ratio slime-paper@0.95")


@pytest.mark.parametrize("size", [(336, 336), (1024, 768), (300, 3000), (3000, 300),
                                  (1920, 1080), (500, 400), (799, 333), (1, 1000)])
def test_llava_next_count_matches_transformers_unpad(size):
    pytest.importorskip("transformers")
    assert bench_tokens.llava_next_tokens(*size) == bench_tokens.llava_next_tokens_oracle(*size)


def test_llava_next_count_by_hand():
    # 1024×768 → pinpoint 672×672 (2×2): 48×48 map unpadded to 48×36 rows, + 36 newlines
    assert bench_tokens.llava_next_tokens(1024, 768) == 576 + 36 * 49
    assert bench_tokens._unpad_image_port(  # the fallback port agrees with the formula
        __import__("torch").zeros(1, 48, 48), (768, 1024)).shape == (1, 36, 48)


def test_prefill_flops_formula():
    p = 32 * (2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert p == 6_979_321_856
    t = 1000
    expect = 2 * p * t + 2 * 32 * 4096 * t * t + 2 * 4096 * 128256
    assert bench_tokens.llama_prefill_flops(t) == pytest.approx(expect, rel=1e-12)


def test_bad_flags_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        bench_tokens.run(["--tiny", "--temperature", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        bench_tokens.run(["--tiny", "--gammas", "1.5", "--out", str(tmp_path)])
