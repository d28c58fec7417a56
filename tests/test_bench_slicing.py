"""Smoke test: ``benchmarks/bench_slicing.py --tiny`` runs, checks itself and writes its JSON."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")


def test_bench_slicing_tiny(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from benchmarks import bench_slicing

    record = bench_slicing.main(["--tiny", "--out", str(tmp_path)])
    files = list(tmp_path.glob("bench_slicing_*_torch*_*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert saved["ratio_slicer_llava_over_llava_next"] == pytest.approx(
        record["ratio_slicer_llava_over_llava_next"]
    )
    # fast == oracle, and the LLaVA-NeXT-configured slicer reproduces the processor's pixels
    assert saved["checks"]["oracle"]["equal"] and saved["checks"]["oracle"]["images"] >= 1
    assert saved["checks"]["llava_next"]["equal"] and saved["checks"]["llava_next"]["images"] >= 1
    assert set(saved["results"]) == {"llava_next", "slicer_llava", "slicer_llava_serial", "slicer_paper"}
    assert saved["results"]["slicer_llava"]["tiles"] == saved["results"]["llava_next"]["tiles"]
    assert all(r["images_per_s"] > 0 for r in saved["results"].values())
    assert len(saved["token_table"]) == 7 * 3
    row = next(r for r in saved["token_table"] if r["size"] == [1000, 1000] and r["policy"] == "paper")
    assert row["grid"] == [3, 3] and row["visual_tokens"] == 576 + 1 + 9 * 144
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("ratio (images/s, slicer_llava / llava_next")
