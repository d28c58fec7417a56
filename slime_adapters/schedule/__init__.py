"""Staged training (SliME §2.3): stages, their presets, roles and the scheduler, in one place.

=======================  ===========================================================================
submodule                public names
=======================  ===========================================================================
``schedule.stages``      :class:`Stage`, :class:`ScheduleError`, the presets :func:`paper_stages`,
                         :func:`reference_stages`, :func:`alternating`, ``ADAPTER_LR``,
                         ``FINETUNE_LR``, ``PAPER_ROLES``
``schedule.roles``       :class:`RoleSpec`, :func:`projector_roles`, :func:`role_coverage`
``schedule.scheduler``   :class:`AlternatingScheduler`
=======================  ===========================================================================

The view names a stage may feed (``"global"``, ``"local"``, ``"both"``) are
:data:`slime_adapters.slicing.VIEWS`, re-exported here as ``VIEWS``.
"""

from slime_adapters.schedule.roles import RoleSpec, projector_roles, role_coverage
from slime_adapters.schedule.scheduler import AlternatingScheduler
from slime_adapters.schedule.stages import (
    ADAPTER_LR,
    FINETUNE_LR,
    PAPER_ROLES,
    ScheduleError,
    Stage,
    alternating,
    paper_stages,
    reference_stages,
)
from slime_adapters.slicing.plan import VIEWS

__all__ = [
    "ADAPTER_LR",
    "FINETUNE_LR",
    "PAPER_ROLES",
    "VIEWS",
    "AlternatingScheduler",
    "RoleSpec",
    "ScheduleError",
    "Stage",
    "alternating",
    "paper_stages",
    "projector_roles",
    "reference_stages",
    "role_coverage",
]
