"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU (one process): one engine per stage, switched by the helper.

Each run happens in its own subprocess (DeepSpeed keeps process-group state in module globals).
The worker is this file run as a script; it prints one JSON line that the test checks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_worker(zero_stage: int, tmp_path: Path) -> dict:
    pytest.importorskip("deepspeed")
    env = dict(os.environ)
    env.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()), DS_ACCELERATOR="cpu",
        TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"),
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [sys.executable, __file__, str(zero_stage)], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_stage_switch_under_zero(zero_stage, tmp_path):
    out = _run_worker(zero_stage, tmp_path)
    assert out["zero_stage"] == zero_stage
    assert [s["name"] for s in out["stages"]] == ["I", "II"]
    for s in out["stages"]:
        losses = s["losses"]
        assert all(b < a for a, b in zip(losses, losses[1:])), (s["name"], losses)
        assert losses[-1] < 0.95 * losses[0], (s["name"], losses)
        # Exactly the declared parameters moved in this stage, the frozen ones are bit-identical.
        assert s["changed"] == s["declared"], s["name"]
        assert s["carried_in"], s["name"]
    assert out["stages"][0]["declared"] == [
        "projector.mlp.0.bias", "projector.mlp.0.weight", "projector.mlp.2.bias",
        "projector.mlp.2.weight", "projector.query_expert.proj.bias",
        "projector.query_expert.proj.weight", "projector.query_expert.query",
        "projector.w_gate", "projector.w_noise"]
    assert out["stages"][1]["declared"] == ["compressor.0.bias", "compressor.0.weight"]
    assert out["partitioned"] == (zero_stage == 3)
    assert out["group_lrs"] == [[0.02, 0.01, 0.01], [0.01]]


def _worker(zero_stage: int) -> None:
    import deepspeed
    import deepspeed.ops
    import torch

    from slime_adapters.integrations.deepspeed import engine_for_stage, gathered_state_dict
    from slime_adapters.schedule import AlternatingScheduler, Stage, projector_roles
    from tests.test_schedule import TinyModel

    # Test set-up in this throwaway worker process only: mark DeepSpeed's CPU shared-memory comm
    # op unavailable so that it is not JIT-compiled (~85 s on a fresh machine); gloo does the
    # collectives of this single process.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    torch.manual_seed(0)
    model = TinyModel()
    roles = dict(projector_roles(model.projector), compressor=model.compressor, llm=model.llm,
                 vision=model.vision)
    stages = [
        Stage("I", ("mlp_expert", "query_expert", "gate"), views="global", lr=1e-2,
              role_lr={"mlp_expert": 2e-2}, steps=8),
        Stage("II", ("compressor",), views="local", lr=1e-2, steps=8),
    ]
    sched = AlternatingScheduler(roles, stages, model=model)
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
    }
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 3, generator=g)
    y = torch.randn(8, generator=g)
    engine, report, last = None, [], None
    for stage in stages:
        engine = engine_for_stage(model, sched, stage, config, previous=engine)
        start = gathered_state_dict(model)
        carried = last is None or all(torch.equal(start[k], last[k]) for k in start)
        declared = sorted(sched.trainable_parameter_names())
        losses = []
        for _ in range(stage.steps):
            loss = ((engine(x) - y) ** 2).mean()
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            changed_stage = sched.step()
        assert changed_stage or sched.finished
        last = gathered_state_dict(model)
        params = {n for n, _ in model.named_parameters()}
        changed = sorted(k for k in params if not torch.equal(start[k], last[k]))
        report.append({
            "name": stage.name, "losses": losses, "changed": changed, "carried_in": carried,
            "declared": declared,
            "lrs": [grp["lr"] for grp in engine.optimizer.param_groups],
        })
    partitioned = any(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())
    lrs = [[grp["lr"] for grp in sched.enter(s)] for s in ("I", "II")]
    result = {"zero_stage": zero_stage, "stages": report, "partitioned": partitioned,
              "group_lrs": lrs, "deepspeed": deepspeed.__version__}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    _worker(int(sys.argv[1]))
