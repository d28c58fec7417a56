"""Checkpoints: bit-exact round trips, registry, version tolerance, and every error path."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import slime_adapters
from slime_adapters.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    check_state_dict,
    load_module,
    read_safetensors,
    register_module,
    registered_kinds,
    save_module,
)
from slime_adapters.config import ConfigBase, ConfigurableMixin, UnknownConfigKeyWarning


@dataclasses.dataclass(frozen=True)
class BlockConfig(ConfigBase):
    kind = "test_ckpt_block"
    dim: int = 4
    hidden: int = 6
    tied: bool = False

    def __post_init__(self):
        if self.dim < 1:
            raise ValueError(f"dim={self.dim} must be >= 1")


@register_module("test_ckpt_block")
class Block(ConfigurableMixin, nn.Module):
    config_class = BlockConfig

    def __init__(self, *, dim=4, hidden=6, tied=False, device=None, dtype=None):
        super().__init__()
        self.config = BlockConfig(dim=dim, hidden=hidden, tied=tied)
        self.up = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.down = nn.Linear(hidden, dim, device=device, dtype=dtype)
        self.query = nn.Parameter(torch.randn(3, dim, device=device, dtype=dtype))
        self.register_buffer("mean", torch.randn(dim, device=device, dtype=dtype))
        if tied:
            self.down.weight = nn.Parameter(self.up.weight.T.contiguous())


@dataclasses.dataclass(frozen=True)
class OtherConfig(ConfigBase):
    kind = "test_ckpt_other"
    dim: int = 4


class Other(ConfigurableMixin, nn.Module):
    config_class = OtherConfig

    def __init__(self, *, dim=4, device=None, dtype=None):
        super().__init__()
        self.config = OtherConfig(dim=dim)
        self.w = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    torch.manual_seed(0)
    m = Block(dim=5, hidden=7).to(dtype)
    out = save_module(m, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    raw = json.loads((out / CONFIG_NAME).read_text())
    assert raw["kind"] == "test_ckpt_block" and raw["slime_adapters_version"] == slime_adapters.__version__
    back = load_module(out)  # class found through the registry
    assert isinstance(back, Block) and back.config == m.config
    assert_same_state(m, back)
    assert all(p.requires_grad for p in back.parameters())
    assert load_module(out, Block, dtype=torch.float64).query.dtype == torch.float64


def test_tied_weights_and_explicit_class(tmp_path):
    m = Block(tied=True)
    save_module(m, tmp_path)
    assert_same_state(m, load_module(tmp_path, Block))
    assert "test_ckpt_block" in registered_kinds()


def test_saving_over_an_old_checkpoint_leaves_no_temp_files(tmp_path):
    save_module(Block(dim=3), tmp_path)
    m = Block(dim=3)
    save_module(m, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert_same_state(m, load_module(tmp_path))


def test_unknown_config_keys_warn_not_fail(tmp_path):
    m = Block()
    save_module(m, tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    data["future_knob"] = 1
    data["slime_adapters_version"] = "9.0.0"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.warns(UnknownConfigKeyWarning, match="future_knob"):
        back = load_module(tmp_path)
    assert_same_state(m, back)


def test_missing_files_and_directories(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory .* does not exist"):
        load_module(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json' does not exist"):
        load_module(tmp_path)
    save_module(Block(), tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match="model.safetensors' does not exist"):
        load_module(tmp_path)


def test_corrupt_files(tmp_path):
    save_module(Block(), tmp_path)
    good = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(good[: len(good) - 10])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_module(tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_module(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{broken")
    with pytest.raises(CheckpointError, match="config.json' is not valid JSON"):
        load_module(tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"dim": 3}')
    with pytest.raises(CheckpointError, match="has no 'kind'"):
        load_module(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"kind": "test_ckpt_block", "dim": 0}))
    with pytest.raises(CheckpointError, match="config.json': BlockConfig: invalid config: dim=0"):
        load_module(tmp_path)


def test_config_and_weights_from_different_saves(tmp_path):
    save_module(Block(dim=4), tmp_path / "a")
    save_module(Block(dim=8), tmp_path / "b")
    (tmp_path / "a" / WEIGHTS_NAME).write_bytes((tmp_path / "b" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(CheckpointError, match="come from different saves"):
        load_module(tmp_path / "a")


def _write_plain(tmp_path, tensors, config):
    config.to_json(tmp_path / CONFIG_NAME)
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))  # no config metadata: another writer


def test_missing_unexpected_and_shape_mismatches_are_listed(tmp_path):
    state = {k: v.clone() for k, v in Block().state_dict().items()}
    state.pop("mean")
    state.pop("up.bias")
    state["extra.weight"] = torch.zeros(2)
    state["query"] = torch.zeros(2, 4)
    _write_plain(tmp_path, state, BlockConfig())
    with pytest.raises(CheckpointError) as info:
        load_module(tmp_path)
    msg = str(info.value)
    assert "missing keys ['mean', 'up.bias']" in msg
    assert "unexpected keys ['extra.weight']" in msg
    assert "query: checkpoint (2, 4) vs module (3, 4)" in msg
    assert WEIGHTS_NAME in msg
    # Non-strict: missing/unexpected tolerated, a shape mismatch still is not.
    with pytest.raises(CheckpointError, match="shape mismatches") as info:
        load_module(tmp_path, strict=False)
    assert "missing keys" not in str(info.value)
    state["query"] = torch.ones(3, 4)
    _write_plain(tmp_path, state, BlockConfig())
    m = load_module(tmp_path, strict=False)
    assert torch.equal(m.query, torch.ones(3, 4))


def test_kind_errors(tmp_path):
    save_module(Other(), tmp_path)
    with pytest.raises(CheckpointError, match="no module registered for kind 'test_ckpt_other'"):
        load_module(tmp_path)
    assert isinstance(load_module(tmp_path, Other), Other)
    with pytest.raises(CheckpointError, match="kind 'test_ckpt_other' but Block expects 'test_ckpt_block'"):
        load_module(tmp_path, Block)


def test_save_and_register_errors(tmp_path):
    with pytest.raises(CheckpointError, match="Linear has no .config"):
        save_module(nn.Linear(2, 2), tmp_path)
    with pytest.raises(CheckpointError, match="meta device"):
        save_module(Block(device="meta"), tmp_path)
    with pytest.raises(CheckpointError, match="config_class.kind is 'test_ckpt_other'"):
        register_module("wrong", Other)
    with pytest.raises(CheckpointError, match="already registered to Block"):
        register_module("test_ckpt_block", type("Block2", (Block,), {}))
    with pytest.raises(CheckpointError, match="must be an nn.Module subclass"):
        register_module("x", int)
    with pytest.raises(CheckpointError, match="weights file .* does not exist"):
        read_safetensors(tmp_path / "x.safetensors")


def test_check_state_dict_accepts_a_fitting_state():
    m = Block()
    check_state_dict(m, m.state_dict())
    with pytest.raises(CheckpointError, match="src: checkpoint does not fit Block: missing keys \\['mean'\\]"):
        check_state_dict(m, {k: v for k, v in m.state_dict().items() if k != "mean"}, source="src")


def test_unreadable_config_metadata_in_weights(tmp_path):
    m = Block()
    save_module(m, tmp_path)
    tensors = {k: v.contiguous() for k, v in m.state_dict().items()}
    save_file(tensors, str(tmp_path / WEIGHTS_NAME), metadata={"slime_adapters_config": "{bad"})
    with pytest.raises(CheckpointError, match="unreadable config metadata"):
        load_module(tmp_path)
    _, meta = read_safetensors(tmp_path / WEIGHTS_NAME)
    assert meta["slime_adapters_config"] == "{bad"


def test_library_modules_load_without_cls(tmp_path):
    from slime_adapters.adapter import SliMEVisualAdapter, SliMEVisualAdapterConfig
    from slime_adapters.compressor import QueryCompressorConfig
    from slime_adapters.projector import NoisyMoEProjectorConfig

    torch.manual_seed(0)
    adapter = SliMEVisualAdapter.from_config(SliMEVisualAdapterConfig(
        projector=NoisyMoEProjectorConfig(in_dim=16, out_dim=24, num_tokens=4, num_heads=2),
        compressor=QueryCompressorConfig(dim=16, num_queries=4, num_heads=2)))
    save_module(adapter, tmp_path / "adapter")
    back = load_module(tmp_path / "adapter")
    assert type(back) is SliMEVisualAdapter and back.config == adapter.config
    for (name, a), (_, b) in zip(adapter.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    assert {"query_compressor", "noisy_moe_projector", "cosine_token_router",
            "slime_visual_adapter"} <= set(registered_kinds())
