"""recipes/train.py on the tiny configuration: stages chained through init_from, exactly the
stage's parameters trained, bit-exact resume, atomic checkpoints, DDP and DeepSpeed ZeRO-2/3 with
two processes on gloo, and the errors a user meets first."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("yaml")

import torch  # noqa: E402

from recipes.train import main  # noqa: E402
from recipes.train_config import TrainConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "configs" / "tiny"


def _sets(tmp_path: Path, stage_out: str, **extra: str) -> list[str]:
    data = tmp_path / "data" / "data.json"
    sets = {"data.train": str(data), "data.generate": "{num: 16, seed: 0, square: 56, clutter: 2}",
            "training.output_dir": str(tmp_path / stage_out), "training.global_batch_size": "4",
            "training.micro_batch_size": "2", "training.progress": "false",
            "training.save_every": "2", **extra}
    out = []
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out


def _model_state(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict of the model a saved folder loads as (file key names may differ: a ZeRO-3
    save writes the encoder in transformers' checkpoint naming)."""
    from recipes.model_folder import load_model_folder

    model, _ = load_model_folder(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _saved(folder: Path) -> tuple[dict, dict]:
    """``config.json`` and ``processor_config.json`` of a saved model folder."""
    return tuple(json.loads((folder / name).read_text())
                 for name in ("config.json", "processor_config.json"))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    report = main(["--config", str(TINY / "stage1.yaml"), *_sets(tmp, "s1")])
    return tmp, report


def test_stage1_trains_the_projector_on_global_views(stage1):
    tmp, report = stage1
    assert report["stage"] == "I" and report["views"] == "global" and report["steps"] == 4
    assert report["accumulation"] == 2 and report["engine"] == "torch"
    out = tmp / "s1"
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in lines)
    assert (out / "checkpoints" / "latest").read_text() == "step-0000004"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest", "step-0000002", "step-0000004"]
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*.tmp*"))
    config, processor = _saved(out / "final")
    assert processor["template"] == "qa" and config["training_stage"]["name"] == "I"
    assert config["training_stage"]["preset"] == "paper"


def test_stage2_starts_from_stage1_and_trains_only_the_local_path(stage1):
    tmp, _ = stage1
    report = main(["--config", str(TINY / "stage2.yaml"),
                   *_sets(tmp, "s2", **{"model.init_from": str(tmp / "s1" / "final")})])
    assert report["stage"] == "II" and report["views"] == "local"
    before, after = _weights(tmp / "s1" / "final"), _weights(tmp / "s2" / "final")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("adapter.") for k in changed)
    assert all("compressor" in k or "local_mlp" in k or "separator" in k for k in changed), changed
    projector = [k for k in before if "projector" in k]
    assert projector and not changed & set(projector)


def test_resume_after_a_crash_is_bit_exact(stage1, tmp_path):
    tmp, _ = stage1
    out = tmp_path / "run"
    shutil.copytree(tmp / "s1", out)
    reference = _weights(out / "final")
    # as if the process died after writing step 2: later state gone, a half-written save left
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-0000004")
    (out / "checkpoints" / "latest").write_text("step-0000002")
    (out / "checkpoints" / "step-0000004.partial").mkdir()
    args = ["--config", str(TINY / "stage1.yaml"), *_sets(tmp, "s1")]
    args += ["--set", f"training.output_dir={out}"]
    report = main(args)
    assert report["resumed_from"] == 2 and report["steps"] == 4
    resumed = _weights(out / "final")
    assert resumed.keys() == reference.keys()
    worst = max(float((resumed[k].double() - reference[k].double()).abs().max()) for k in resumed)
    assert worst == 0.0
    assert not (out / "checkpoints" / "step-0000004.partial").exists()
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    # a finished stage started again does nothing and keeps its report
    again = main(args)
    assert again == json.loads((out / "report.json").read_text()) and again["resumed_from"] == 2
    assert _weights(out / "final").keys() == reference.keys()


def test_resume_refuses_another_configuration(stage1, tmp_path):
    tmp, _ = stage1
    out = tmp_path / "run"
    shutil.copytree(tmp / "s1", out)
    args = ["--config", str(TINY / "stage1.yaml"), *_sets(tmp, "s1"),
            "--set", f"training.output_dir={out}", "--set", "training.lr=0.5"]
    with pytest.raises(TrainConfigError, match=r"different configuration \(training.lr\)"):
        main(args)


def test_errors_name_the_problem(stage1, tmp_path, capsys):
    tmp, _ = stage1
    base = ["--config", str(TINY / "stage1.yaml"), *_sets(tmp, "e")]
    with pytest.raises(TrainConfigError, match=r"stage.name='IV' is not a stage of preset 'paper'"):
        main([*base, "--set", "stage.name=IV"])
    with pytest.raises(TrainConfigError, match="16 records, fewer than one global batch"):
        main([*base, "--set", "training.global_batch_size=32"])
    with pytest.raises(TrainConfigError, match="fp16 needs training.deepspeed"):
        main([*base, "--set", "training.precision=fp16"])
    with pytest.raises(TrainConfigError, match=r"stage.trainable names unknown role\(s\) \['x'\]"):
        main([*base, "--set", "stage.trainable=[x]"])
    with pytest.raises(FileNotFoundError, match="nope.json' does not exist"):
        main([*base, "--set", f"data.train={tmp_path / 'nope.json'}", "--set", "data.generate="])
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--set", "training.bogus=1"])
    assert exit_info.value.code == 2
    assert "unknown key(s) ['training.bogus']" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, args: list[str]) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(ROOT / "tests" / "_train_worker.py"), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3"])
def test_two_processes_on_gloo(engine, stage1, tmp_path):
    """Two CPU processes with gradient accumulation: the stage trains its parameters only and
    updates them at every optimizer step; ZeRO-3 gathers the partitioned weights for the final
    save; a run resumed from the first checkpoint ends bit-identical."""
    pytest.importorskip("deepspeed")
    tmp, _ = stage1
    extra = {"model.init_from": str(tmp / "s1" / "final"), "training.max_steps": "2",
             "training.global_batch_size": "4", "training.micro_batch_size": "1",
             "training.save_every": "1"}
    if engine != "ddp":
        # every parameter partitioned under ZeRO-3 (the tiny model's would all stay whole under
        # the shipped persistence threshold)
        ds = json.loads((ROOT / "recipes" / "configs" / "deepspeed" / f"{engine}.json").read_text())
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (tmp_path / "ds.json").write_text(json.dumps(ds))
        extra["training.deepspeed"] = str(tmp_path / "ds.json")
    args = ["--config", str(TINY / "stage2.yaml"), *_sets(tmp, "unused", **extra),
            "--set", f"training.output_dir={tmp_path / 'out'}"]
    _launch(tmp_path, args)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["world_size"] == 2 and report["accumulation"] == 2
    assert report["engine"] == ("torch" if engine == "ddp" else "deepspeed")
    before, after = _model_state(tmp / "s1" / "final"), _model_state(tmp_path / "out" / "final")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("compressor" in k or "local_mlp" in k or "separator" in k
                           for k in changed), changed
    ck = tmp_path / "out" / "checkpoints"
    assert (ck / "latest").read_text() == "step-0000002"
    # step 1 already moved the weights (an engine that missed its boundary would not have)
    step1 = _checkpoint_weights(ck / "step-0000001", engine)
    assert any(not torch.equal(step1[k], before[f"adapter.{k}"]) for k in step1)
    # the process group dies after step 1's checkpoint: resume from it
    shutil.rmtree(tmp_path / "out" / "final")
    shutil.rmtree(ck / "step-0000002")
    (ck / "latest").write_text("step-0000001")
    _launch(tmp_path, args)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["resumed_from"] == 1
    resumed = _model_state(tmp_path / "out" / "final")
    assert all(torch.equal(resumed[k], after[k]) for k in after), sorted(
        k for k in after if not torch.equal(resumed[k], after[k]))


def _checkpoint_weights(folder: Path, engine: str) -> dict[str, torch.Tensor]:
    """The compressor's weights in a resumable checkpoint, named as in the adapter folder."""
    if engine == "ddp":
        state = torch.load(folder / "state.pt", weights_only=True)["trainable"]
    else:  # ZeRO-3 keeps partitions in the optimizer files: rebuild them with DeepSpeed's tool
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    return {k.removeprefix("adapter."): v for k, v in state.items()
            if k.startswith("adapter.compressor.")}


def test_runs_as_a_file_from_anywhere(tmp_path):
    """The deepspeed launcher runs ``python recipes/train.py``: the repository must import."""
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "train.py"), "--config",
                           str(tmp_path / "missing.yaml")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "missing.yaml' does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_stage3_with_lora_trains_the_adapters_and_lora_not_the_base_llm(stage1, tmp_path):
    """Paper preset, stage III with ``model.lora``: ``llm_lora`` replaces ``llm``."""
    tmp, _ = stage1
    out = tmp_path / "s3"
    report = main(["--config", str(TINY / "stage3.yaml"), *_sets(
        tmp, "unused", **{"model.init_from": str(tmp / "s1" / "final"),
                          "model.lora": "{r: 4, alpha: 8, dropout: 0.0}",
                          "training.max_steps": "2"}),
        "--set", f"training.output_dir={out}"])
    assert "llm_lora" in report["trainable"] and "llm" not in report["trainable"]
    before, after = _weights(tmp / "s1" / "final"), _weights(out / "final")
    # the folder holds the LLM with the trained LoRA merged in: only LoRA's targets moved
    assert before.keys() == after.keys() and not any("lora" in k for k in after)
    llm = [k for k in before if k.startswith("llm.")]
    moved = {k for k in llm if not torch.equal(before[k], after[k])}
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved), moved
    assert any(not torch.equal(before[k], after[k]) for k in before if "compressor" in k)


def test_checked_before_any_data_or_weights(tmp_path, capsys):
    """Typos in the model, slicer, template or generator keys fail at once with exit code 2,
    before the dataset is generated."""
    data = tmp_path / "data" / "data.json"
    base = ["--config", str(TINY / "stage1.yaml"), "--set", f"data.train={data}",
            "--set", f"training.output_dir={tmp_path / 'o'}"]
    for override, message in (
            ("model.adapter.projector.typo=1", "model.adapter.projector.typo"),
            ("data.slicer={typo: 1}", "data.slicer: "),
            ("data.template=chatml", "data.template: unknown chat template 'chatml'"),
            ("data.generate={num: 4, typo: 3}", "unknown key(s) ['data.generate.typo']")):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, "--set", override])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not data.exists()


def test_half_precision_weights_are_refused_without_deepspeed(stage1):
    tmp, _ = stage1
    with pytest.raises(TrainConfigError, match="bfloat16 weights, which plain PyTorch would"):
        main(["--config", str(TINY / "stage1.yaml"), *_sets(tmp, "bf"),
              "--set", "model.dtype=bfloat16", "--set", "training.precision=bf16"])


def test_tiles_follow_the_encoder_image_size(stage1, tmp_path):
    """A 224-px encoder gets 224-px tiles without naming the tile size in data.slicer."""
    tmp, _ = stage1
    report = main(["--config", str(TINY / "stage1.yaml"), *_sets(
        tmp, "unused", **{"model.vision.config.image_size": "224",
                          "model.vision.config.patch_size": "28", "training.max_steps": "1"}),
        "--set", f"training.output_dir={tmp_path / 'o'}"])
    assert report["steps"] == 1
    slicer = _saved(tmp_path / "o" / "final")[0]["slicer_config"]
    assert slicer["max_tiles"] == 6 and slicer["tile_size"] == 224


def test_a_configured_image_token_reaches_the_prompts(stage1, tmp_path):
    """``model.image_token`` replaces LLaVA's ``<image>`` in the training ids."""
    tmp, _ = stage1
    report = main(["--config", str(TINY / "stage1.yaml"), *_sets(
        tmp, "unused", **{"model.image_token": "<img>", "training.max_steps": "1"}),
        "--set", f"training.output_dir={tmp_path / 'o'}"])
    assert report["steps"] == 1
    from recipes.model_folder import load_model_folder

    model, processor = load_model_folder(tmp_path / "o" / "final")
    assert processor.tokenizer.convert_ids_to_tokens(model.config.image_token_id) == "<img>"
    assert processor.image_token == "<img>"


def test_a_torn_log_row_does_not_stop_a_resume(tmp_path):
    from recipes.train_runtime import keep_log_until

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    keep_log_until(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_deepspeed_file_and_batch_split_checked_before_data(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data" / "data.json"
    base = ["--config", str(TINY / "stage1.yaml"), "--set", f"data.train={data}",
            "--set", f"training.output_dir={tmp_path / 'o'}"]
    with pytest.raises(SystemExit):
        main([*base, "--set", f"training.deepspeed={tmp_path / 'none.json'}"])
    assert "neither a preset" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")  # 8 is not a multiple of 4 × 3
    with pytest.raises(SystemExit):
        main(base)
    assert "multiple of micro_batch_size × processes = 4 × 3" in capsys.readouterr().err
    assert not data.exists()


@pytest.mark.parametrize("preset, name, trains, views", [
    ("reference", "1a", ["mlp_expert"], "global"),
    ("reference", "1c", ["compressor"], "local"),
    ("alternating", "II-1", ["compressor"], "local"),
])
def test_other_presets_run_their_stages(stage1, tmp_path, preset, name, trains, views):
    tmp, _ = stage1
    report = main(["--config", str(TINY / "stage1.yaml"), *_sets(
        tmp, "unused", **{"stage.preset": preset, "stage.name": name, "training.max_steps": "1"}),
        "--set", f"training.output_dir={tmp_path / 'o'}"])
    assert (report["stage"], report["trainable"], report["views"]) == (name, trains, views)
    saved = _saved(tmp_path / "o" / "final")[0]["training_stage"]
    assert saved["force_expert"] == (0 if name == "1a" else None)
    assert saved["router_gamma"] == (1.0 if name == "1c" else None)
