"""Roles come from the modules and cover every parameter exactly once; the README's staged
training trains the separator in the stages that train the projector's MLP."""

from __future__ import annotations

import itertools
import re
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from slime_adapters import (
    AlternatingScheduler,
    CosineTokenRouterConfig,
    NoisyMoEProjector,
    NoisyMoEProjectorConfig,
    QueryCompressorConfig,
    RoleSpec,
    SliMEVisualAdapter,
    paper_stages,
    reference_stages,
    role_coverage,
)


def _adapter(separator="learned", local_mlp="shared", shared_mlp=True, mode="paper"):
    return SliMEVisualAdapter(
        projector=NoisyMoEProjectorConfig(in_dim=16, out_dim=24, num_tokens=4, num_heads=2,
                                          shared_mlp=shared_mlp, mode=mode),
        compressor=QueryCompressorConfig(dim=16, num_queries=4, num_heads=2, mode=mode),
        router=CosineTokenRouterConfig(gamma=1.0), separator=separator, local_mlp=local_mlp)


VARIANTS = list(itertools.product(("learned", "embedding", "none"), ("shared", "own"),
                                  (True, False), ("paper", "reference")))


@pytest.mark.parametrize("separator, local_mlp, shared_mlp, mode", VARIANTS)
def test_adapter_roles_cover_every_parameter_exactly_once(separator, local_mlp, shared_mlp, mode):
    adapter = _adapter(separator, local_mlp, shared_mlp, mode)
    owners = role_coverage(adapter, adapter.roles())
    assert len(owners) == len(list(adapter.parameters())) > 0
    bad = {name: roles for name, roles in owners.items() if len(roles) != 1}
    assert bad == {}
    if separator == "learned":
        assert owners["separator"] == ["mlp_expert"]
    if local_mlp == "own":
        assert owners["local_mlp.0.weight"] == ["compressor"]
    if not shared_mlp:
        assert owners["projector.query_mlp.2.bias"] == ["query_expert"]
    assert owners["projector.w_noise"] == ["gate"]
    assert set(adapter.roles()) == {"mlp_expert", "query_expert", "gate", "compressor"}


@pytest.mark.parametrize("shared_mlp", [True, False])
def test_projector_roles_cover_every_parameter_exactly_once(shared_mlp):
    projector = NoisyMoEProjector(in_dim=16, out_dim=8, num_tokens=4, num_heads=2,
                                  shared_mlp=shared_mlp)
    owners = role_coverage(projector, projector.roles())
    assert all(len(r) == 1 for r in owners.values()), owners
    assert owners["mlp.0.weight"] == ["mlp_expert"]
    assert owners["query_expert.query"] == ["query_expert"]
    assert owners["w_gate"] == ["gate"]


def test_role_coverage_reports_orphans_and_doubles():
    adapter = _adapter()
    roles = dict(adapter.roles())
    del roles["gate"]
    roles["both"] = RoleSpec(adapter, ("separator",))
    owners = role_coverage(adapter, roles)
    assert owners["projector.w_gate"] == [] and owners["projector.w_noise"] == []
    assert owners["separator"] == ["mlp_expert", "both"]


def test_the_stages_train_the_separator_with_the_projectors_mlp():
    adapter = _adapter()
    scheduler = AlternatingScheduler(adapter.roles(), paper_stages(roles=adapter.roles()),
                                     model=adapter)
    trains = {}
    for stage in scheduler.stages:
        scheduler.enter(stage.name)
        trains[stage.name] = "separator" in scheduler.trainable_parameter_names()
    assert trains == {"I": True, "II": False, "III": True}
    scheduler = AlternatingScheduler(adapter.roles(), reference_stages(roles=adapter.roles()),
                                     model=adapter)
    seen = {}
    for stage in scheduler:
        seen[stage.name] = "separator" in scheduler.trainable_parameter_names()
    assert seen == {"1a": True, "1b": False, "1c": False, "SFT": True}


def test_readme_staged_training_example_trains_the_separator_in_the_right_stages():
    """The README's staged-training block, run as written, with an AdamW stand-in that records
    which parameters each stage hands to the optimizer."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    readme = readme.split("## Staged training", 1)[1].split("\n## ", 1)[0]
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
              if "AlternatingScheduler(" in b]
    assert len(blocks) == 1
    adapter = _adapter()
    llm = nn.Linear(24, 24)
    model = nn.ModuleDict({"adapter": adapter, "llm": llm})
    handed: list[set[str]] = []
    names = {id(p): n for n, p in model.named_parameters()}

    def adamw(groups):
        handed.append({names[id(p)] for g in groups for p in g["params"]})
        assert all(p.requires_grad for g in groups for p in g["params"])
        return object()

    fake_torch = types.SimpleNamespace(optim=types.SimpleNamespace(AdamW=adamw))
    exec(compile(blocks[0], "README.md", "exec"),
         {"torch": fake_torch, "adapter": adapter, "llm": llm, "model": model})
    assert len(handed) == 3  # stages I, II, III
    stage_i, stage_ii, stage_iii = handed
    assert "adapter.separator" in stage_i and "adapter.separator" in stage_iii
    assert "adapter.separator" not in stage_ii
    assert stage_iii == set(names.values())  # the joint stage trains every parameter
    assert stage_i | stage_ii <= stage_iii
    assert not stage_i & stage_ii
    # every adapter parameter trains in stage I or II
    assert {n for n in names.values() if n.startswith("adapter.")} == stage_i | stage_ii
