"""Config dataclasses: JSON round trips, version recording, unknown keys, errors."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

import slime_adapters
from slime_adapters.config import (
    ConfigBase,
    ConfigError,
    ConfigurableMixin,
    UnknownConfigKeyWarning,
    atomic_write_text,
)


@dataclasses.dataclass(frozen=True)
class ToyConfig(ConfigBase):
    kind = "toy"
    dim: int = 8
    grid: tuple[int, int] = (2, 3)
    name: str | None = None
    mean: tuple[float, ...] = (0.5, 0.25, 0.125)


@dataclasses.dataclass(frozen=True)
class OuterConfig(ConfigBase):
    kind = "outer"
    inner: ToyConfig = ToyConfig()
    scale: float = 1.0


class Toy(ConfigurableMixin, torch.nn.Module):
    config_class = ToyConfig

    def __init__(self, *, dim=8, grid=(2, 3), name=None, mean=(0.5, 0.25, 0.125), device=None,
                 dtype=None):
        super().__init__()
        self.config = ToyConfig(dim=dim, grid=grid, name=name, mean=mean)
        self.lin = torch.nn.Linear(dim, dim, device=device, dtype=dtype)


def test_round_trip_restores_tuples_and_records_version(tmp_path):
    cfg = ToyConfig(dim=4, grid=(5, 1), name="x")
    path = tmp_path / "c.json"
    cfg.to_json(path)
    raw = json.loads(path.read_text())
    assert raw["slime_adapters_version"] == slime_adapters.__version__
    assert raw["kind"] == "toy"
    back = ToyConfig.from_json(path)
    assert back == cfg and isinstance(back.grid, tuple) and isinstance(back.mean, tuple)
    assert ToyConfig.from_json(cfg.to_json()) == cfg


def test_unknown_keys_warn_not_fail():
    data = ToyConfig().to_dict() | {"future_knob": 3}
    with pytest.warns(UnknownConfigKeyWarning, match="future_knob"):
        cfg = ToyConfig.from_dict(data)
    assert cfg == ToyConfig()


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ToyConfig.from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ToyConfig.from_json(bad)
    with pytest.raises(ConfigError, match="kind 'other'"):
        ToyConfig.from_dict({"kind": "other"})
    with pytest.raises(ConfigError, match="expected a dict"):
        ToyConfig.from_dict([1, 2])


def test_from_config_builds_module_on_meta_device():
    cfg = ToyConfig(dim=16)
    m = Toy.from_config(cfg, device="meta")
    assert m.config == cfg and m.lin.weight.is_meta and m.lin.weight.shape == (16, 16)
    with pytest.raises(ConfigError, match="expects a ToyConfig"):
        Toy.from_config(object())


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    atomic_write_text(target, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_nested_configs_round_trip():
    cfg = OuterConfig(inner=ToyConfig(dim=3, grid=(1, 7)), scale=0.5)
    back = OuterConfig.from_json(cfg.to_json())
    assert back == cfg and isinstance(back.inner, ToyConfig) and back.inner.grid == (1, 7)
    with pytest.warns(UnknownConfigKeyWarning, match="later"):
        OuterConfig.from_dict(cfg.to_dict() | {"inner": cfg.inner.to_dict() | {"later": 1}})
