"""The §2.3 bilinear toy benchmark: its pieces against the obvious math, and a smoke run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import bilinear


def _problem(c=0.4, d=5):
    return bilinear.make_problem(d, c, torch.Generator().manual_seed(0))


def test_problem_and_loss_match_the_definitions():
    prob = _problem()
    a, b = prob["a"], prob["b"]
    assert math.isclose(a.norm().item(), 1) and math.isclose(b.norm().item(), 1)
    assert math.isclose((a @ b).item(), 0.4, abs_tol=1e-12)
    gen = torch.Generator().manual_seed(1)
    u, v = torch.randn(3, 5, generator=gen, dtype=torch.float64), torch.randn(3, 5, generator=gen, dtype=torch.float64)
    want = torch.stack([0.5 * ((torch.outer(u[i], v[i]) - prob["x"]) ** 2).sum() for i in range(3)])
    torch.testing.assert_close(bilinear.loss(u, v, prob["x"]), want, rtol=1e-12, atol=1e-12)
    # The optimum's loss is ½(1 - |c|)² and it is reached by the top singular pair of X.
    evals, evecs = torch.linalg.eigh(prob["x"])
    top = evecs[:, evals.abs().argmax()]
    opt = bilinear.loss(top[None], (evals[evals.abs().argmax()] * top)[None], prob["x"])
    assert math.isclose(opt.item(), 0.5 * 0.6**2, rel_tol=1e-10)
    assert math.isclose(abs((top @ prob["best"]).item()), 1, rel_tol=1e-12)


def test_initialisations_have_the_stated_form():
    prob = _problem()
    basis = prob["basis"]
    gen = torch.Generator().manual_seed(2)
    for kind in ("stated", "near_saddle", "on_saddle"):
        u, v = bilinear.initial_points(kind, 4, prob, 0.5, gen)
        zu = torch.linalg.lstsq(basis, u.T).solution.T
        zv = torch.linalg.lstsq(basis, v.T).solution.T
        torch.testing.assert_close(zv, zu.flip(-1), rtol=0, atol=1e-12)  # v0 = β0 a + α0 b
        tv = bilinear.coords(u, basis)
        if kind == "on_saddle":
            assert tv[:, 0].abs().max() < 1e-12  # τ0 = 0 for c > 0
        if kind == "near_saddle":
            torch.testing.assert_close(tv[:, 0].abs(), 1e-8 * tv[:, 1].abs(), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="init='bad'"):
        bilinear.initial_points("bad", 1, prob, 0.5, gen)
    with pytest.raises(ValueError, match="overlap=0"):
        bilinear.make_problem(3, 0.0, gen)
    with pytest.raises(ValueError, match="method='sgd'"):
        bilinear.run("sgd", u, v, prob["x"], 1, 0.1)


def test_d_dimensional_runs_follow_the_theorems_recursions():
    assert bilinear.check_against_theorems(7, 0.3, 150, 0.05, seed=3) < 1e-12
    # ALS from Eq. (2) is the power method on M²: z_t ∝ M^{2t} z_0 (Theorem 5).
    z = bilinear.theorem_oracle("als", [0.3, 0.9], 0.3, 4, 0.0)
    m2t = torch.linalg.matrix_power(torch.tensor([[1, 0.3], [0.3, 1]], dtype=torch.float64), 8)
    want = m2t @ torch.tensor([0.3, 0.9], dtype=torch.float64)
    got = torch.tensor(z[-1], dtype=torch.float64)
    assert abs(abs(got @ want) / (got.norm() * want.norm()) - 1) < 1e-12


@pytest.mark.slow
def test_tiny_run_writes_table_json_and_png(tmp_path, capsys):
    record = bilinear.main(["--tiny", "--out", str(tmp_path)])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".png")
    assert files[0].startswith(f"bilinear_cpu_torch{torch.__version__.split('+')[0]}_")
    saved = json.loads((tmp_path / files[0]).read_text())
    assert saved["rows"] == record["rows"] and len(saved["rows"]) == 2 * 3 * 4
    assert saved["oracle_max_rel_error"] < 1e-12
    rows = {(r["overlap"], r["method"], r["init"]): r for r in saved["rows"]}
    for c in (0.5, -0.3):
        # Findings the report relies on: ALS always ends at the optimum; simultaneous GD from
        # exactly the saddle's direction stays on it; from random Eq. (2) draws every method wins.
        assert all(rows[(c, "als", k)]["success_rate"] == 1.0 for k in bilinear.INITS)
        assert rows[(c, "gd", "on_saddle")]["saddle_rate"] == 1.0
        assert all(rows[(c, m, "stated")]["success_rate"] == 1.0 for m in bilinear.METHODS)
    # In exact structure the theorems' own recursions stay on the saddle, ALS included.
    assert abs(saved["exact_on_saddle"]["0.5"]["als"][0]) < 1e-12
    out = capsys.readouterr().out
    assert "match the theorems" in out and "success" in out
