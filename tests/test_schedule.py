"""Stages, presets and the AlternatingScheduler: requires_grad, optimizer steps, resume, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slime_adapters.projector import NoisyMoEProjector
from slime_adapters.schedule import (
    AlternatingScheduler,
    RoleSpec,
    ScheduleError,
    Stage,
    alternating,
    paper_stages,
    projector_roles,
    reference_stages,
)

ALL_ROLES = ("mlp_expert", "query_expert", "gate", "compressor", "llm", "llm_lora", "vision")


class QueryExpert(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.query = nn.Parameter(torch.randn(3, d) * 0.1)
        self.proj = nn.Linear(d, d)

    def forward(self, x):  # (b, s, d) -> (b, s, d)
        attn = torch.softmax(x @ self.query.T, dim=-1) @ self.query
        return self.proj(attn + x)


class StandInProjector(nn.Module):
    """Same attribute names as the NoisyMoEProjector: mlp, query_expert, [query_mlp], w_gate, w_noise."""

    def __init__(self, d=4, out=5, shared=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, 6), nn.GELU(), nn.Linear(6, out))
        self.query_expert = QueryExpert(d)
        self.query_mlp = None if shared else nn.Sequential(nn.Linear(d, 6), nn.GELU(), nn.Linear(6, out))
        self.w_gate = nn.Parameter(torch.randn(d, 2) * 0.1)
        self.w_noise = nn.Parameter(torch.randn(d, 2) * 0.1)

    # the projector's own roles(): it names its parameters the same way
    roles = NoisyMoEProjector.roles

    def forward(self, x):
        gates = torch.softmax(x @ self.w_gate + nn.functional.softplus(x @ self.w_noise), dim=-1)
        q = self.query_expert(x)
        fq = self.mlp(q) if self.query_mlp is None else self.query_mlp(q)
        return gates[..., :1] * self.mlp(x) + gates[..., 1:] * fq


class LoraLinear(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.base = nn.Linear(d, d)
        self.lora_A = nn.Linear(d, 2, bias=False)
        self.lora_B = nn.Linear(2, d, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.1)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x))


class TinyModel(nn.Module):
    def __init__(self, shared=True):
        super().__init__()
        self.vision = nn.Linear(3, 4)
        self.projector = StandInProjector(shared=shared)
        self.compressor = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
        self.llm = nn.Sequential(LoraLinear(5), nn.Tanh(), nn.Linear(5, 1))

    def forward(self, x):  # x (b, s, 3): every parameter takes part
        f = self.vision(x)
        tokens = torch.cat([self.projector(f), self.compressor(f)], dim=1)
        return self.llm(tokens).mean(dim=(1, 2))


def make_roles(model, roles=ALL_ROLES):
    out = dict(projector_roles(model.projector))
    out["compressor"] = model.compressor
    out["llm"] = model.llm
    out["llm_lora"] = (model.llm, "*lora_*")
    out["vision"] = model.vision
    return {k: v for k, v in out.items() if k in roles}


def expected_names(model, roles):
    """The oracle: parameter names each role should hold, written out by hand."""
    names = [n for n, _ in model.named_parameters()]
    rule = {
        "mlp_expert": lambda n: n.startswith("projector.mlp."),
        "query_expert": lambda n: n.startswith(("projector.query_expert.", "projector.query_mlp.")),
        "gate": lambda n: n in ("projector.w_gate", "projector.w_noise"),
        "compressor": lambda n: n.startswith("compressor."),
        "llm": lambda n: n.startswith("llm."),
        "llm_lora": lambda n: n.startswith("llm.") and ".lora_" in n,
        "vision": lambda n: n.startswith("vision."),
    }
    return {n for n in names if any(rule[r](n) for r in roles)}


def grad_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def loss_of(model, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    y = torch.randn(2, generator=g, dtype=torch.float64)
    return ((model(x) - y) ** 2).mean()


PRESETS = {
    "paper": lambda roles: paper_stages(roles=roles),
    "reference": lambda roles: reference_stages(roles=roles),
    "alternating2": lambda roles: alternating(2, roles=roles),
}
ROLE_SETS = {
    "full_llm": ("mlp_expert", "query_expert", "gate", "compressor", "llm", "vision"),
    "lora": ALL_ROLES,
    "library_only": ("mlp_expert", "query_expert", "gate", "compressor"),
}


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("role_set", sorted(ROLE_SETS))
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_stage_trains_exactly_its_roles(preset, role_set, shared):
    torch.manual_seed(0)
    model = TinyModel(shared=shared).double()
    roles = ROLE_SETS[role_set]
    stages = PRESETS[preset](roles)
    sched = AlternatingScheduler(make_roles(model, roles), stages, model=model)
    for stage in stages:
        groups = sched.enter(stage.name)
        want = expected_names(model, stage.trainable)
        assert want, stage
        assert grad_names(model) == want, stage.name
        assert set(sched.trainable_parameter_names()) == want
        assert "vision.weight" not in want
        # One optimizer step changes exactly the declared parameters.
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.AdamW(groups)
        loss_of(model, 0).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == want, (stage.name, sorted(changed ^ want))


def test_preset_contents():
    paper = paper_stages()
    assert [(s.name, s.views, s.lr) for s in paper] == [
        ("I", "global", 1e-3), ("II", "local", 1e-3), ("III", "both", 2e-5)]
    assert paper[0].trainable == ("mlp_expert", "query_expert", "gate")
    assert paper[1].trainable == ("compressor",)
    assert paper[2].trainable == ("mlp_expert", "query_expert", "gate", "compressor", "llm")
    ref = reference_stages(roles=ALL_ROLES, sft_gamma=0.9)
    assert [(s.name, s.trainable, s.views, s.force_expert, s.router_gamma) for s in ref] == [
        ("1a", ("mlp_expert",), "global", 0, None),
        ("1b", ("query_expert",), "global", 1, None),
        ("1c", ("compressor",), "local", None, 1.0),
        ("SFT", ("mlp_expert", "query_expert", "gate", "compressor", "llm_lora"), "both", None, 0.9),
    ]
    alt = alternating(2, steps={"I": 3, "II": 4, "I-2": 9, "III": 1})
    assert [(s.name, s.views, s.steps) for s in alt] == [
        ("I", "global", 3), ("II-1", "local", 4), ("I-1", "global", 3), ("II-2", "local", 4),
        ("I-2", "global", 9), ("III", "both", 1)]
    assert [s.steps for s in paper_stages(steps=7, finetune_lr=1e-5)] == [7, 7, 7]
    assert paper_stages(finetune_lr=1e-5)[2].lr == 1e-5


def test_preset_errors():
    with pytest.raises(ScheduleError, match="stage I trains .* none of them"):
        paper_stages(roles=["compressor", "llm"])
    with pytest.raises(ScheduleError, match="stage II trains \\['compressor'\\]"):
        alternating(1, roles=["mlp_expert"])
    with pytest.raises(ScheduleError, match="rounds=-1"):
        alternating(-1)
    with pytest.raises(ScheduleError, match="stage 1b trains \\['query_expert'\\]"):
        reference_stages(roles=["mlp_expert", "compressor"])
    with pytest.raises(ScheduleError, match="roles is empty"):
        paper_stages(roles=[])
    with pytest.raises(ScheduleError, match="steps must be"):
        paper_stages(steps=[1, 2])


def test_stage_validation_messages():
    with pytest.raises(ScheduleError, match="trainable is empty"):
        Stage("a", ())
    with pytest.raises(ScheduleError, match="views='tiles'"):
        Stage("a", ("x",), views="tiles")
    with pytest.raises(ScheduleError, match="name must be a non-empty string"):
        Stage("", ("x",))
    with pytest.raises(ScheduleError, match="names a role twice"):
        Stage("a", ("x", "x"))
    with pytest.raises(ScheduleError, match="must hold role names"):
        Stage("a", ("x", 3))
    with pytest.raises(ScheduleError, match="lr=0"):
        Stage("a", ("x",), lr=0)
    with pytest.raises(ScheduleError, match="lr=nan"):
        Stage("a", ("x",), lr=float("nan"))
    with pytest.raises(ScheduleError, match="role_lr names 'y'"):
        Stage("a", ("x",), role_lr={"y": 1e-3})
    with pytest.raises(ScheduleError, match="role_lr\\['x'\\]=-1.0"):
        Stage("a", ("x",), role_lr={"x": -1})
    with pytest.raises(ScheduleError, match="router_gamma=1.5"):
        Stage("a", ("x",), router_gamma=1.5)
    with pytest.raises(ScheduleError, match="force_expert=2"):
        Stage("a", ("x",), force_expert=2)
    with pytest.raises(ScheduleError, match="steps=0"):
        Stage("a", ("x",), steps=0)
    with pytest.raises(ScheduleError, match="weight_decay=-0.1"):
        Stage("a", ("x",), weight_decay=-0.1)
    s = Stage("a", "x", role_lr={"x": 2e-3})
    assert s.trainable == ("x",) and s.lr_for("x") == 2e-3 and hash(s) == hash(Stage("a", "x", role_lr={"x": 2e-3}))
    assert s.to_dict()["role_lr"] == {"x": 2e-3}


def test_scheduler_construction_errors():
    model = TinyModel()
    roles = make_roles(model)
    with pytest.raises(ScheduleError, match="unknown role\\(s\\) \\['decoder'\\]"):
        AlternatingScheduler(roles, [Stage("a", ("decoder",))])
    with pytest.raises(ScheduleError, match="duplicate stage names \\['a'\\]"):
        AlternatingScheduler(roles, [Stage("a", ("llm",)), Stage("a", ("vision",))])
    with pytest.raises(ScheduleError, match="stages is empty"):
        AlternatingScheduler(roles, [])
    with pytest.raises(ScheduleError, match="roles is empty"):
        AlternatingScheduler({}, [Stage("a", ("llm",))])
    with pytest.raises(ScheduleError, match="role 'r' selects no parameter"):
        AlternatingScheduler({"r": (model.llm, "nothing*")}, [Stage("a", ("r",))])
    with pytest.raises(ScheduleError, match="role 'r' must be an nn.Module"):
        AlternatingScheduler({"r": 3}, [Stage("a", ("r",))])
    with pytest.raises(ScheduleError, match="patterns must be non-empty strings"):
        RoleSpec(model.llm, ("",))
    with pytest.raises(ScheduleError, match=r"Module has no roles\(\) method; expected a "
                                            "NoisyMoEProjector"):
        projector_roles(nn.Module())
    sched = AlternatingScheduler(roles, paper_stages(roles=ALL_ROLES))
    with pytest.raises(ScheduleError, match="no stage entered yet"):
        sched.current
    with pytest.raises(ScheduleError, match="unknown stage 'IV'"):
        sched.enter("IV")
    with pytest.raises(ScheduleError, match="stage index 3 out of range"):
        sched.enter(3)
    with pytest.raises(ScheduleError, match="unknown role 'x'"):
        sched.parameter_names("x")


def test_names_without_model_root_and_overlapping_roles():
    model = TinyModel()
    roles = {"proj": model.projector, "gate": RoleSpec(model.projector, ("w_gate", "w_noise"))}
    stages = [Stage("s", ("gate", "proj"), role_lr={"gate": 5e-3}, lr=1e-3)]
    sched = AlternatingScheduler(roles, stages)
    groups = sched.enter(0)
    # Overlap: w_gate/w_noise go to the first trainable role that holds them, and only there.
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [
        ("gate", 5e-3, 2), ("proj", 1e-3, len(list(model.projector.parameters())) - 2)]
    assert sched.parameter_names("gate") == ["proj.w_gate", "proj.w_noise"]
    assert sched.all_parameter_names() == sorted(f"proj.{n}" for n, _ in model.projector.named_parameters())
    # Parameters outside every role's module are not touched without a model root.
    assert all(p.requires_grad for p in model.llm.parameters())


def test_stage_settings_step_advance_and_iteration():
    model = TinyModel()
    stages = reference_stages(roles=ALL_ROLES, steps={"1a": 2, "1b": 1, "1c": 1, "SFT": 2})
    sched = AlternatingScheduler(make_roles(model), stages, model=model)
    seen = []
    for stage in sched:
        seen.append((stage.name, sched.views, sched.force_expert, sched.router_gamma))
    assert seen == [("1a", "global", 0, None), ("1b", "global", 1, None),
                    ("1c", "local", None, 1.0), ("SFT", "both", None, 0.95)]
    sched.enter(0)
    changes = [sched.step() for _ in range(5)]
    assert changes == [False, True, True, True, False]
    assert sched.current.name == "SFT" and not sched.finished
    assert sched.step() is False and sched.finished
    with pytest.raises(ScheduleError, match="schedule has finished"):
        sched.step()
    assert sched.state_dict()["total_steps"] == 6


def _run(model, sched, start_stage, opt_state=None, stop_at=None):
    """Train from the scheduler's position to the end (or until `stop_at` = (stage, step))."""
    first = True
    for stage in sched:
        opt = torch.optim.AdamW(sched.param_groups())
        if first and opt_state is not None:
            opt.load_state_dict(opt_state)
        first = False
        while sched.step_in_stage < stage.steps:
            if stop_at == (stage.name, sched.step_in_stage):
                return opt.state_dict()
            seed = 1000 * sched.index + sched.step_in_stage
            loss_of(model, seed).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sched.step() or sched.finished:
                break
    return None


def test_resume_mid_stage_matches_uninterrupted_run_bit_exactly():
    stages = alternating(1, roles=ALL_ROLES, steps=3)
    torch.manual_seed(0)
    ref = TinyModel().double()
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    sched = AlternatingScheduler(make_roles(ref), stages, model=ref)
    _run(ref, sched, 0)
    assert sched.finished

    run = TinyModel().double()
    run.load_state_dict(init)
    sched = AlternatingScheduler(make_roles(run), stages, model=run)
    opt_state = _run(run, sched, 0, stop_at=("II-1", 2))
    saved = ({k: v.clone() for k, v in run.state_dict().items()}, sched.state_dict(), opt_state)
    assert saved[1]["stage_index"] == 1 and saved[1]["step_in_stage"] == 2

    resumed = TinyModel().double()  # fresh process: new objects, all requires_grad=True
    resumed.load_state_dict(saved[0])
    sched2 = AlternatingScheduler(make_roles(resumed), stages, model=resumed)
    sched2.load_state_dict(saved[1])
    assert grad_names(resumed) == expected_names(resumed, ("compressor",))
    _run(resumed, sched2, 1, opt_state=saved[2])
    for name, p in resumed.state_dict().items():
        assert torch.equal(p, ref.state_dict()[name]), name


def test_load_state_dict_errors():
    model = TinyModel()
    sched = AlternatingScheduler(make_roles(model), paper_stages(roles=ALL_ROLES), model=model)
    with pytest.raises(ScheduleError, match="missing keys \\['step_in_stage'\\]"):
        sched.load_state_dict({"stage_names": ["I", "II", "III"], "stage_index": 0})
    other = AlternatingScheduler(make_roles(model), reference_stages(roles=ALL_ROLES), model=model)
    with pytest.raises(ScheduleError, match="written for stages \\['1a', '1b', '1c', 'SFT'\\]"):
        sched.load_state_dict(other.state_dict())
