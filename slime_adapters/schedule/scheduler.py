"""Staged, alternating training: which parameters train when, on which views, with which γ.

The paper (§2.2, SPEC §1) trains the global adapter first (stage I), then freezes it and trains the
local compressor on tiles (stage II), then trains everything together (stage III); the released
code splits stage I into an MLP-only and a query-expert-only step and trains the compressor with
the router switched off (γ = 1). A :class:`Stage` declares one such step; an
:class:`AlternatingScheduler` maps *role* names to parameters and, on entering a stage, sets
``requires_grad`` exactly as declared and returns optimizer parameter groups.

Roles. A role is a module (all its parameters) or a :class:`RoleSpec` ``(module, patterns)`` that
selects parameters of ``module`` by name: a pattern matches a parameter name (relative to the
module) when it is equal to it, is a dotted prefix of it (``"mlp"`` matches ``"mlp.0.weight"``) or
matches it as an ``fnmatch`` pattern (``"*lora_*"``). Roles may overlap: a parameter trains when
*any* trainable role of the stage holds it, and it goes into the parameter group of the first such
role in the stage's ``trainable`` order (so it gets that role's learning rate, once).

The universe. "Everything else frozen" means every parameter of every module a role refers to (the
whole module, not only the selected names) and of the optional ``model=`` root.

Parameter names. With ``model=`` given, a parameter reachable from it is named as in
``model.named_parameters()``; any other parameter is named ``"<role>.<name in its module>"`` after
the first role (in the ``roles`` order) whose module holds it.

Shapes: none; this module moves no tensors, it only flips ``requires_grad``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import nn

from slime_adapters.schedule.roles import RoleSpec
from slime_adapters.schedule.stages import ScheduleError, Stage

__all__ = ["AlternatingScheduler"]


def _as_spec(role: str, value: Any) -> RoleSpec:
    if isinstance(value, RoleSpec):
        return value
    if isinstance(value, nn.Module):
        return RoleSpec(value)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], nn.Module):
        return RoleSpec(value[0], value[1])
    raise ScheduleError(
        f"AlternatingScheduler: role {role!r} must be an nn.Module, a RoleSpec or a "
        f"(module, patterns) pair, got {type(value).__name__}"
    )


class AlternatingScheduler:
    """Runs a list of :class:`Stage` over named roles.

    Args:
        roles: role name → module, :class:`RoleSpec` or ``(module, patterns)``.
        stages: the stages, in order (names must be unique).
        model: optional root module; its parameters outside every trainable role are frozen too,
            and parameter names are taken from it.

    Raises:
        ScheduleError: no stages, duplicate stage names, a stage naming a role not in ``roles``,
            a role that selects no parameter, a malformed role.
    """

    def __init__(
        self,
        roles: Mapping[str, nn.Module | RoleSpec | tuple[nn.Module, Sequence[str]]],
        stages: Sequence[Stage],
        *,
        model: nn.Module | None = None,
    ) -> None:
        if not roles:
            raise ScheduleError("AlternatingScheduler: roles is empty")
        self._specs = {str(k): _as_spec(str(k), v) for k, v in roles.items()}
        stages = tuple(stages)
        if not stages:
            raise ScheduleError("AlternatingScheduler: stages is empty")
        for s in stages:
            if not isinstance(s, Stage):
                raise ScheduleError(
                    f"AlternatingScheduler: stages must be Stage objects, got {s!r}"
                )
        names = [s.name for s in stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ScheduleError(f"AlternatingScheduler: duplicate stage names {dupes}")
        for s in stages:
            unknown = [r for r in s.trainable if r not in self._specs]
            if unknown:
                raise ScheduleError(
                    f"AlternatingScheduler: stage {s.name!r} names unknown role(s) {unknown}; "
                    f"known roles: {sorted(self._specs)}"
                )
        self.stages = stages
        self.model = model
        self._names, self._universe = self._collect_universe()
        self._members = {r: self._select(r) for r in self._specs}
        self._index: int | None = None
        self._step_in_stage = 0
        self._total_steps = 0
        self._finished = False

    # -- roles and names ------------------------------------------------------------------------
    def _collect_universe(self) -> tuple[dict[int, str], list[nn.Parameter]]:
        names: dict[int, str] = {}
        universe: list[nn.Parameter] = []

        def add(name: str, p: nn.Parameter) -> None:
            if id(p) not in names:
                names[id(p)] = name
                universe.append(p)

        if self.model is not None:
            for n, p in self.model.named_parameters():
                add(n, p)
        for role, spec in self._specs.items():
            for n, p in spec.module.named_parameters():
                add(f"{role}.{n}", p)
        return names, universe

    def _select(self, role: str) -> list[nn.Parameter]:
        spec = self._specs[role]
        chosen = [p for n, p in spec.module.named_parameters() if spec.matches(n)]
        if not chosen:
            raise ScheduleError(
                f"AlternatingScheduler: role {role!r} selects no parameter of "
                f"{type(spec.module).__name__} (patterns={spec.patterns})"
            )
        return chosen

    @property
    def role_names(self) -> tuple[str, ...]:
        """The declared roles, in order."""
        return tuple(self._specs)

    def parameter_names(self, role: str) -> list[str]:
        """Sorted names of the parameters ``role`` selects. Raises ScheduleError if unknown."""
        if role not in self._members:
            raise ScheduleError(f"unknown role {role!r}; known roles: {sorted(self._specs)}")
        return sorted(self._names[id(p)] for p in self._members[role])

    def all_parameter_names(self) -> list[str]:
        """Sorted names of every parameter the scheduler controls (the universe)."""
        return sorted(self._names.values())

    # -- stages ---------------------------------------------------------------------------------
    def index_of(self, stage: int | str | Stage) -> int:
        """The index of ``stage`` (index, name or Stage). Raises ScheduleError if unknown."""
        if isinstance(stage, Stage):
            stage = stage.name
        if isinstance(stage, str):
            for i, s in enumerate(self.stages):
                if s.name == stage:
                    return i
            raise ScheduleError(
                f"unknown stage {stage!r}; stages: {[s.name for s in self.stages]}"
            )
        if isinstance(stage, bool) or not isinstance(stage, int):
            raise ScheduleError(f"stage must be an index, a name or a Stage, got {stage!r}")
        if not -len(self.stages) <= stage < len(self.stages):
            raise ScheduleError(f"stage index {stage} out of range for {len(self.stages)} stages")
        return stage % len(self.stages)

    def _apply(self, index: int) -> None:
        trainable = {id(p) for r in self.stages[index].trainable for p in self._members[r]}
        for p in self._universe:
            train = id(p) in trainable
            p.requires_grad_(train)
            if not train:
                # A stale gradient on a now-frozen parameter would be applied by any optimizer
                # that still holds it, and it costs memory.
                p.grad = None

    def enter(self, stage: int | str | Stage) -> list[dict[str, Any]]:
        """Make ``stage`` current: freeze everything, unfreeze its roles, reset its step count.

        Returns:
            The optimizer parameter groups (see :meth:`param_groups`).

        Raises:
            ScheduleError: unknown stage name or index out of range.
        """
        index = self.index_of(stage)
        self._index = index
        self._step_in_stage = 0
        self._finished = False
        self._apply(index)
        return self.param_groups()

    @property
    def current(self) -> Stage:
        """The current stage. Raises ScheduleError before the first :meth:`enter`."""
        if self._index is None:
            raise ScheduleError("no stage entered yet; call enter() first")
        return self.stages[self._index]

    @property
    def index(self) -> int | None:
        """Index of the current stage (``None`` before the first :meth:`enter`)."""
        return self._index

    @property
    def step_in_stage(self) -> int:
        return self._step_in_stage

    @property
    def finished(self) -> bool:
        """True once the last stage's ``steps`` have run out."""
        return self._finished

    @property
    def views(self) -> str:
        return self.current.views

    @property
    def router_gamma(self) -> float | None:
        return self.current.router_gamma

    @property
    def force_expert(self) -> int | None:
        return self.current.force_expert

    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups of the current stage, one per trainable role that owns a parameter.

        Each group is ``{"params", "lr", "weight_decay", "name"}``; a parameter held by several
        trainable roles goes to the first of them (in ``trainable`` order) only.
        """
        stage = self.current
        seen: set[int] = set()
        groups = []
        for role in stage.trainable:
            params = [p for p in self._members[role] if id(p) not in seen]
            seen.update(id(p) for p in params)
            if params:
                groups.append({
                    "params": params,
                    "lr": stage.lr_for(role),
                    "weight_decay": stage.weight_decay,
                    "name": role,
                })
        return groups

    def name_of(self, param: nn.Parameter) -> str:
        """The scheduler's name for ``param``. Raises ScheduleError if it controls no such one."""
        try:
            return self._names[id(param)]
        except KeyError:
            raise ScheduleError(f"parameter of shape {tuple(param.shape)} is not controlled by "
                                "this scheduler") from None

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` for the current stage's trainable parameters, in group order."""
        return [(self._names[id(p)], p) for g in self.param_groups() for p in g["params"]]

    def requires_grad_parameter_names(self) -> list[str]:
        """Sorted names of the controlled parameters whose ``requires_grad`` is set right now."""
        return sorted(self._names[id(p)] for p in self._universe if p.requires_grad)

    def trainable_parameter_names(self) -> list[str]:
        """Sorted names of the parameters that train in the current stage."""
        return sorted(self._names[id(p)] for g in self.param_groups() for p in g["params"])

    def step(self) -> bool:
        """Count one optimizer step; enter the next stage when the current one's ``steps`` run out.

        Returns:
            True when a new stage was entered (the caller must rebuild its optimizer from
            :meth:`param_groups`), else False. A stage without ``steps`` never ends by itself.

        Raises:
            ScheduleError: before the first :meth:`enter`, or after the schedule finished.
        """
        stage = self.current
        if self._finished:
            raise ScheduleError("the schedule has finished; step() called after its last stage")
        self._step_in_stage += 1
        self._total_steps += 1
        if stage.steps is None or self._step_in_stage < stage.steps:
            return False
        if self._index == len(self.stages) - 1:
            self._finished = True
            return False
        self.enter(self._index + 1)
        return True

    def __len__(self) -> int:
        return len(self.stages)

    def __iter__(self) -> Iterator[Stage]:
        """Yield the stages from the current one (entering the first if none is), entering each.

        The current stage is yielded as it is (its step count kept, so a resumed run continues
        it); each later stage is entered before it is yielded.
        """
        if self._index is None:
            self.enter(0)
        start = self._index
        yield self.current
        for i in range(start + 1, len(self.stages)):
            self.enter(i)
            yield self.current

    # -- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the schedule stands: stage index and name, steps in stage and in total."""
        return {
            "stage_names": [s.name for s in self.stages],
            "stage_index": self._index,
            "step_in_stage": self._step_in_stage,
            "total_steps": self._total_steps,
            "finished": self._finished,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output and re-apply the stage's ``requires_grad``.

        Raises:
            ScheduleError: missing keys, or a state written for different stage names.
        """
        missing = [k for k in ("stage_names", "stage_index", "step_in_stage") if k not in state]
        if missing:
            raise ScheduleError(f"load_state_dict: missing keys {missing}")
        names = [s.name for s in self.stages]
        if list(state["stage_names"]) != names:
            raise ScheduleError(
                f"load_state_dict: state was written for stages {list(state['stage_names'])}, "
                f"this scheduler has {names}"
            )
        index = state["stage_index"]
        self._index = None if index is None else self.index_of(int(index))
        self._step_in_stage = int(state["step_in_stage"])
        self._total_steps = int(state.get("total_steps", self._step_in_stage))
        self._finished = bool(state.get("finished", False))
        if self._index is not None:
            self._apply(self._index)
