"""Training stages and the paper's and the released code's stage presets.

A :class:`Stage` is a frozen, validated declaration of one training step of the SliME recipe (which
roles train, on which views, at which learning rate, with which router γ and forced expert, for how
many steps). :class:`slime_adapters.schedule.AlternatingScheduler` runs a list of them.
Public through :mod:`slime_adapters.schedule`.

Presets (SPEC §1; learning rates from the paper's Table 7: 1e-3 for the adapter stages, 2e-5 for
the full fine-tuning of Vicuna-7B; pass 1e-5 for Llama-3-8B):

======  =========================================  ======  =================================
paper   trains                                     views   notes
======  =========================================  ======  =================================
I       mlp_expert, query_expert, gate             global
II      compressor                                 local   projector frozen
III     every role but ``vision``; ``llm_lora``    both    lr 2e-5
        replaces ``llm`` when both are given
======  =========================================  ======  =================================

reference: ``1a`` mlp_expert (global, force_expert=0); ``1b`` query_expert (global,
force_expert=1; a shared MLP belongs to ``mlp_expert`` and stays frozen); ``1c`` compressor (local,
γ = 1.0: the router keeps every tile token); ``SFT`` every role but ``vision`` (both, γ = 0.95).

``alternating(rounds=k)``: ``I``, then ``II-1, I-1, …, II-k, I-k``, then ``III`` — the local stage
and the global stage alternate k times after the first global stage, the paper's alternating
optimisation of its bilinear problem (§2.3), before the joint stage.

Shapes: none.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

from slime_adapters.slicing.plan import VIEWS

__all__ = [
    "ADAPTER_LR",
    "FINETUNE_LR",
    "PAPER_ROLES",
    "ScheduleError",
    "Stage",
    "alternating",
    "paper_stages",
    "reference_stages",
]

ADAPTER_LR = 1e-3
FINETUNE_LR = 2e-5
PAPER_ROLES = ("mlp_expert", "query_expert", "gate", "compressor", "llm")
_PROJECTOR_ROLES = ("mlp_expert", "query_expert", "gate")


class ScheduleError(ValueError):
    """A stage, a role or a schedule state is invalid."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage.

    ``trainable`` names the roles that train (everything else is frozen); ``views`` says which image
    views the model should feed (``"global"``, ``"local"`` or ``"both"``); ``lr`` is the stage's
    learning rate and ``role_lr`` optional per-role overrides (a mapping, stored as sorted pairs so
    the stage stays hashable); ``router_gamma`` and ``force_expert`` are what the model should use
    during the stage (``None``: its own setting); ``steps`` (optional) is how many optimizer steps
    the stage lasts for :meth:`AlternatingScheduler.step`.

    Raises:
        ScheduleError: empty name or ``trainable``, an unknown view, a non-positive or non-finite
            ``lr``, a ``role_lr`` for a role the stage does not train, γ outside (0, 1],
            ``force_expert`` other than 0/1, ``steps`` < 1, a negative ``weight_decay``.
    """

    name: str
    trainable: tuple[str, ...]
    views: str = "both"
    lr: float = 1e-3
    role_lr: tuple[tuple[str, float], ...] | None = None
    router_gamma: float | None = None
    force_expert: int | None = None
    steps: int | None = None
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ScheduleError(f"Stage: name must be a non-empty string, got {self.name!r}")
        trainable = (self.trainable,) if isinstance(self.trainable, str) else tuple(self.trainable)
        if not trainable:
            raise ScheduleError(
                f"Stage {self.name!r}: trainable is empty; a stage must train a role"
            )
        if any(not isinstance(r, str) or not r for r in trainable):
            raise ScheduleError(
                f"Stage {self.name!r}: trainable must hold role names, got {trainable}"
            )
        if len(set(trainable)) != len(trainable):
            raise ScheduleError(f"Stage {self.name!r}: trainable names a role twice: {trainable}")
        object.__setattr__(self, "trainable", trainable)
        if self.views not in VIEWS:
            raise ScheduleError(
                f"Stage {self.name!r}: views={self.views!r}, expected one of {VIEWS}"
            )
        _check_lr(self.name, "lr", self.lr)
        if self.role_lr is not None:
            pairs = self.role_lr.items() if isinstance(self.role_lr, Mapping) else self.role_lr
            pairs = tuple(sorted((str(k), float(v)) for k, v in pairs))
            for role, lr in pairs:
                if role not in trainable:
                    raise ScheduleError(
                        f"Stage {self.name!r}: role_lr names {role!r}, which the stage does not "
                        f"train (trainable={list(trainable)})"
                    )
                _check_lr(self.name, f"role_lr[{role!r}]", lr)
            object.__setattr__(self, "role_lr", pairs or None)
        if self.router_gamma is not None and not 0.0 < float(self.router_gamma) <= 1.0:
            raise ScheduleError(
                f"Stage {self.name!r}: router_gamma={self.router_gamma!r} must lie in (0, 1]"
            )
        if self.force_expert not in (None, 0, 1) or isinstance(self.force_expert, bool):
            raise ScheduleError(
                f"Stage {self.name!r}: force_expert={self.force_expert!r}, expected None, 0 or 1"
            )
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        ):
            raise ScheduleError(f"Stage {self.name!r}: steps={self.steps!r} must be an int >= 1")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ScheduleError(
                f"Stage {self.name!r}: weight_decay={self.weight_decay!r} must be finite and >= 0"
            )

    def lr_for(self, role: str) -> float:
        """The learning rate of ``role`` in this stage (its ``role_lr`` entry, else ``lr``)."""
        return dict(self.role_lr or ()).get(role, self.lr)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``role_lr`` as a mapping)."""
        out = dataclasses.asdict(self)
        out["trainable"] = list(self.trainable)
        out["role_lr"] = dict(self.role_lr) if self.role_lr else None
        return out


def _check_lr(stage: str, what: str, lr: float) -> None:
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        raise ScheduleError(f"Stage {stage!r}: {what}={lr!r} must be a finite number > 0")


def _steps(steps: int | Mapping[str, int] | None, name: str) -> int | None:
    """``steps`` for stage ``name``: one int for all, or a mapping by name (``"II-2"`` falls back
    to ``"II"``)."""
    if steps is None or isinstance(steps, int):
        return steps
    if isinstance(steps, Mapping):
        return steps.get(name, steps.get(name.split("-")[0]))
    raise ScheduleError(f"steps must be None, an int or a mapping by stage name, got {steps!r}")


def _roles(roles: Iterable[str], preset: str) -> tuple[str, ...]:
    roles = (roles,) if isinstance(roles, str) else tuple(roles)
    if not roles:
        raise ScheduleError(f"{preset}: roles is empty")
    return roles


def _need(roles: tuple[str, ...], wanted: tuple[str, ...], preset: str, stage: str) -> list[str]:
    have = [r for r in wanted if r in roles]
    if not have:
        raise ScheduleError(
            f"{preset}: stage {stage} trains {list(wanted)} but none of them is among the roles "
            f"{list(roles)}"
        )
    return have


def _finetune(roles: tuple[str, ...]) -> list[str]:
    # LoRA fine-tuning keeps the base LLM frozen: with both roles given, only the adapters train.
    drop = {"vision"} | ({"llm"} if "llm_lora" in roles else set())
    return [r for r in roles if r not in drop]


def paper_stages(
    *,
    roles: Iterable[str] = PAPER_ROLES,
    adapter_lr: float = ADAPTER_LR,
    finetune_lr: float = FINETUNE_LR,
    steps: int | Mapping[str, int] | None = None,
) -> list[Stage]:
    """The paper's three stages I, II, III over the roles that exist (see the module docstring).

    Raises:
        ScheduleError: no projector role (mlp_expert/query_expert/gate) or no ``compressor``.
    """
    return alternating(
        rounds=0, roles=roles, adapter_lr=adapter_lr, finetune_lr=finetune_lr, steps=steps
    )


def alternating(
    rounds: int = 1,
    *,
    roles: Iterable[str] = PAPER_ROLES,
    adapter_lr: float = ADAPTER_LR,
    finetune_lr: float = FINETUNE_LR,
    steps: int | Mapping[str, int] | None = None,
) -> list[Stage]:
    """``I, (II-i, I-i) for i in 1..rounds, III``; ``rounds=0`` gives the paper's I, II, III.

    Raises:
        ScheduleError: ``rounds`` < 0, no projector role, or no ``compressor`` role.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ScheduleError(f"alternating: rounds={rounds!r} must be an int >= 0")
    preset = "paper_stages" if rounds == 0 else "alternating"
    roles = _roles(roles, preset)
    projector = _need(roles, _PROJECTOR_ROLES, preset, "I")
    compressor = _need(roles, ("compressor",), preset, "II")

    def one(name: str, trainable: list[str], views: str, lr: float) -> Stage:
        return Stage(name, tuple(trainable), views=views, lr=lr, steps=_steps(steps, name))

    if rounds == 0:
        out = [one("I", projector, "global", adapter_lr),
               one("II", compressor, "local", adapter_lr)]
    else:
        out = [one("I", projector, "global", adapter_lr)]
        for i in range(1, rounds + 1):
            out.append(one(f"II-{i}", compressor, "local", adapter_lr))
            out.append(one(f"I-{i}", projector, "global", adapter_lr))
    out.append(one("III", _finetune(roles), "both", finetune_lr))
    return out


def reference_stages(
    *,
    roles: Iterable[str] = PAPER_ROLES,
    adapter_lr: float = ADAPTER_LR,
    finetune_lr: float = FINETUNE_LR,
    steps: int | Mapping[str, int] | None = None,
    sft_gamma: float = 0.95,
) -> list[Stage]:
    """The released code's stages 1a, 1b, 1c and SFT (see the module docstring).

    Raises:
        ScheduleError: a role one of the stages needs (mlp_expert, query_expert, compressor) is
            missing.
    """
    roles = _roles(roles, "reference_stages")
    for stage, role in (("1a", "mlp_expert"), ("1b", "query_expert"), ("1c", "compressor")):
        _need(roles, (role,), "reference_stages", stage)
    return [
        Stage("1a", ("mlp_expert",), views="global", lr=adapter_lr, force_expert=0,
              steps=_steps(steps, "1a")),
        Stage("1b", ("query_expert",), views="global", lr=adapter_lr, force_expert=1,
              steps=_steps(steps, "1b")),
        Stage("1c", ("compressor",), views="local", lr=adapter_lr, router_gamma=1.0,
              steps=_steps(steps, "1c")),
        Stage("SFT", tuple(_finetune(roles)), views="both", lr=finetune_lr,
              router_gamma=sft_gamma, steps=_steps(steps, "SFT")),
    ]
