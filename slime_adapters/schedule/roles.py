"""Roles: named groups of parameters that a training stage trains or freezes.

A role is a :class:`RoleSpec` ``(module, patterns)`` that selects parameters of ``module`` by
name: a pattern matches a parameter name (relative to the module) when it is equal to it, is a
dotted prefix of it (``"mlp"`` matches ``"mlp.0.weight"``) or matches it as an ``fnmatch``
pattern (``"*lora_*"``). The library's modules name their own roles:
:meth:`SliMEVisualAdapter.roles() <slime_adapters.adapter.SliMEVisualAdapter.roles>` and
:meth:`NoisyMoEProjector.roles() <slime_adapters.projector.NoisyMoEProjector.roles>` return roles
that cover every parameter exactly once (:func:`role_overlaps` checks any set of roles).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping

from torch import nn

from slime_adapters.schedule.stages import ScheduleError

__all__ = ["RoleSpec", "projector_roles", "role_coverage"]


@dataclasses.dataclass(frozen=True)
class RoleSpec:
    """The parameters of ``module`` whose names match any of ``patterns`` (``None``: all of them).

    Matching: equal, dotted prefix (``"mlp"`` → ``"mlp.0.weight"``) or ``fnmatch`` (``"*lora_*"``).
    """

    module: nn.Module
    patterns: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.module, nn.Module):
            raise ScheduleError(
                f"RoleSpec: module must be an nn.Module, got {type(self.module).__name__}"
            )
        if self.patterns is not None:
            pats = (self.patterns,) if isinstance(self.patterns, str) else tuple(self.patterns)
            if not pats or any(not isinstance(p, str) or not p for p in pats):
                raise ScheduleError(
                    f"RoleSpec: patterns must be non-empty strings, got {self.patterns!r}"
                )
            object.__setattr__(self, "patterns", pats)

    def matches(self, name: str) -> bool:
        """Whether the parameter called ``name`` (relative to ``module``) belongs to this role."""
        if self.patterns is None:
            return True
        return any(
            name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p)
            for p in self.patterns
        )


def projector_roles(projector: nn.Module) -> dict[str, RoleSpec]:
    """``projector.roles()``: the three roles inside a NoisyMoEProjector (``mlp_expert``,
    ``query_expert``, ``gate``).

    Raises:
        ScheduleError: ``projector`` has no ``roles()`` method.
    """
    roles = getattr(projector, "roles", None)
    if not callable(roles):
        raise ScheduleError(
            f"projector_roles: {type(projector).__name__} has no roles() method; "
            "expected a NoisyMoEProjector"
        )
    return roles()


def role_coverage(module: nn.Module, roles: Mapping[str, RoleSpec]) -> dict[str, list[str]]:
    """For every parameter of ``module`` (by its name there), the roles that hold it.

    Roles over sub-modules of ``module`` are resolved through object identity, so a role may
    name any sub-module. A parameter mapped to ``[]`` belongs to no role; to two names, to two.
    """
    owners: dict[int, list[str]] = {id(p): [] for p in module.parameters()}
    for role, spec in roles.items():
        for name, p in spec.module.named_parameters():
            if spec.matches(name) and id(p) in owners and role not in owners[id(p)]:
                owners[id(p)].append(role)
    return {name: owners[id(p)] for name, p in module.named_parameters()}
