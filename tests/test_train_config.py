"""The training YAML: includes, overrides, defaults, the shipped configs, and every bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("yaml")

from recipes.train_config import DEFAULTS, TrainConfigError, apply_overrides, load_config  # noqa: E402
from recipes.train_engines import deepspeed_config  # noqa: E402
from recipes.train_runtime import config_fingerprint, lr_factor  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
STAGE_FILES = sorted(p for p in CONFIGS.glob("*/stage*.yaml"))


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


MINIMAL = """
model: {llm: {type: llama}}
stage: {name: I}
data: {train: d.json}
training: {output_dir: out}
"""


def test_minimal_file_gets_every_default(tmp_path):
    cfg = load_config(_write(tmp_path, "s.yaml", MINIMAL))
    assert cfg["training"]["global_batch_size"] == DEFAULTS["training"]["global_batch_size"]
    assert set(cfg["training"]) == set(DEFAULTS["training"])
    assert cfg["stage"]["preset"] == "paper" and cfg["data"]["template"] == "qa"


def test_base_files_merge_underneath_and_overrides_apply_last(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(tmp_path, "common.yaml", "model: {llm: {type: llama, config: {hidden_size: 8}}}\n"
                                    "training: {lr: 1.0e-3, epochs: 2}\n")
    _write(tmp_path, "sub/mid.yaml", "base: ../common.yaml\ntraining: {epochs: 3}\n")
    top = _write(tmp_path, "top.yaml", "base: sub/mid.yaml\nmodel: {llm: {config: {layers: 1}}}\n"
                                       "stage: {name: II}\ndata: {train: d.json}\n"
                                       "training: {output_dir: o}\n")
    cfg = load_config(top, ["training.lr=2e-5", "stage.name=III", "data.slicer={max_tiles: 4}"])
    assert cfg["model"]["llm"] == {"type": "llama", "config": {"hidden_size": 8, "layers": 1}}
    assert cfg["training"]["epochs"] == 3 and cfg["training"]["lr"] == 2e-5
    assert cfg["stage"]["name"] == "III" and cfg["data"]["slicer"] == {"max_tiles": 4}


@pytest.mark.parametrize("path", STAGE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_stage_configs_load(path):
    pytest.importorskip("transformers")
    from recipes.train import check_before_start

    cfg = load_config(path)
    check_before_start(cfg)  # model schema, slicer keywords, template, generator keys
    t = cfg["training"]
    assert t["global_batch_size"] % t["micro_batch_size"] == 0
    if path.parent.name != "tiny":  # the paper's Table 7
        stage3 = path.name == "stage3.yaml"
        assert t["global_batch_size"] == (128 if stage3 else 256)
        assert t["precision"] == "bf16" and t["warmup_ratio"] == 0.03 and t["epochs"] == 1
        assert t["lr_schedule"] == "cosine" and t["weight_decay"] == 0.0
        lr = {"slime-llama3-8b": 1e-5, "slime-vicuna-7b": 2e-5, "slime-llama3-70b-lora": 1e-4}
        assert t["lr"] == (lr[path.parent.name] if stage3 else 1e-3)
        assert t["deepspeed"] is not None
        deepspeed_config(t, accum=2)  # the named DeepSpeed preset exists and parses


@pytest.mark.parametrize("text, overrides, match", [
    ("- a list", [], "must hold a mapping at the top level"),
    ("a: [", [], "is not valid YAML"),
    (MINIMAL + "extra: 1\n", [], r"unknown section\(s\) \['extra'\]"),
    (MINIMAL, ["training.lrr=1"], r"unknown key\(s\) \['training.lrr'\]"),
    (MINIMAL, ["training.epochs=two"], "training.epochs must be int, got str 'two'"),
    (MINIMAL, ["training.progress=1"], "training.progress must be bool, got int"),
    (MINIMAL, ["training.epochs=true"], "training.epochs must be int, got a bool"),
    (MINIMAL, ["training.precision=fp8"], r"training.precision='fp8', expected one of"),
    (MINIMAL, ["stage.preset=mine"], r"stage.preset='mine', expected one of"),
    (MINIMAL, ["training.lr=-1"], "training.lr must be finite and > 0"),
    (MINIMAL, ["training.micro_batch_size=3"], "not a multiple of training.micro_batch_size=3"),
    (MINIMAL, ["training.warmup_ratio=1"], r"warmup_ratio must lie in \[0, 1\)"),
    (MINIMAL, ["training.adam_betas=[0.9]"], "adam_betas must be two numbers"),
    (MINIMAL, ["stage.router_gamma=0"], r"router_gamma must lie in \(0, 1\]"),
    (MINIMAL, ["training.output_dir="], r"required key\(s\) \['training.output_dir'\] not set"),
    (MINIMAL, ["model=3"], "'model' section missing or not a mapping"),
    (MINIMAL, ["stage=3"], "'stage' must be a mapping, got int"),
    (MINIMAL, ["nokey"], "must look like section.key=value"),
])
def test_bad_configs(tmp_path, text, overrides, match):
    with pytest.raises(TrainConfigError, match=match):
        load_config(_write(tmp_path, "s.yaml", text), overrides)


def test_missing_files_and_include_cycles(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file .*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    _write(tmp_path, "a.yaml", "base: b.yaml\n")
    _write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(TrainConfigError, match="include each other in a cycle"):
        load_config(tmp_path / "a.yaml")
    _write(tmp_path, "c.yaml", "base: 3\n")
    with pytest.raises(TrainConfigError, match="'base' must be a path or a list of paths"):
        load_config(tmp_path / "c.yaml")


def test_override_creates_nested_keys():
    assert apply_overrides({}, ["a.b.c=[1, 2]", "a.d="]) == {"a": {"b": {"c": [1, 2]}, "d": None}}


def test_lr_curve_warms_up_then_follows_the_cosine():
    t = {"warmup_ratio": 0.1, "lr_schedule": "cosine", "min_lr_ratio": 0.0}
    f = [lr_factor(s, 100, t) for s in range(100)]
    assert f[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.5, abs=1e-12)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] < 0.001
    assert lr_factor(50, 100, {**t, "lr_schedule": "constant"}) == 1.0
    assert lr_factor(99, 100, {**t, "min_lr_ratio": 0.2}) > 0.2


def test_fingerprint_ignores_run_only_keys(tmp_path):
    path = _write(tmp_path, "s.yaml", MINIMAL)
    a = config_fingerprint(load_config(path))
    assert a == config_fingerprint(load_config(path, ["training.output_dir=x",
                                                      "training.save_every=3"]))
    assert a != config_fingerprint(load_config(path, ["training.lr=0.5"]))


def test_deepspeed_config_owns_batch_and_precision(tmp_path):
    t = {**DEFAULTS["training"], "deepspeed": "zero3", "micro_batch_size": 4,
         "precision": "bf16", "max_grad_norm": 0.5}
    ds = deepspeed_config(t, accum=8)
    assert ds["zero_optimization"]["stage"] == 3
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (4, 8)
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["gradient_clipping"] == 0.5 and "train_batch_size" not in ds
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        deepspeed_config({**t, "deepspeed": str(tmp_path / "x.json")}, 1)
    owned = _write(tmp_path, "owned.json", '{"optimizer": {"type": "Adam"}}')
    with pytest.raises(TrainConfigError, match=r"sets \['optimizer'\]; the training section owns"):
        deepspeed_config({**t, "deepspeed": str(owned)}, 1)
    bad = _write(tmp_path, "bad.json", "{")
    with pytest.raises(TrainConfigError, match="is not valid JSON"):
        deepspeed_config({**t, "deepspeed": str(bad)}, 1)
