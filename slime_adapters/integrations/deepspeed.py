"""Staged training under DeepSpeed: one engine per stage.

ZeRO partitions (and its optimizer holds states for) only the parameters it was given at
``deepspeed.initialize``, and an engine's optimizer cannot take new parameters later, so a change
of trainable set needs a new engine. The pattern::

    sched = AlternatingScheduler(roles, paper_stages(...), model=model)
    engine = None
    for stage in sched.stages:
        engine = engine_for_stage(model, sched, stage, ds_config, previous=engine)
        for batch in loader(views=sched.views):
            loss = engine(batch)
            engine.backward(loss)
            engine.step()
        save(gathered_state_dict(model))      # full weights, whatever the ZeRO stage

Weights carry over because every engine wraps the same ``model`` object: under ZeRO-1/2 the
parameters are updated in place; under ZeRO-3 they stay partitioned between engines and the next
engine adopts the partitions (checked in ``tests/test_schedule_deepspeed.py`` by gathering with
``deepspeed.zero.GatheredParameters`` before and after a switch). ``previous.destroy()`` removes the
old engine's hooks first.

On a CPU machine DeepSpeed JIT-compiles a shared-memory collective op when it first initialises
communication (about 85 s once, cached in ``TORCH_EXTENSIONS_DIR``); no configuration key skips it.

deepspeed is imported inside the functions; importing this module does not need it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from slime_adapters.schedule import AlternatingScheduler, Stage

__all__ = ["engine_for_stage", "gathered_state_dict"]


def engine_for_stage(
    model: nn.Module,
    scheduler: AlternatingScheduler,
    stage: int | str | Stage,
    ds_config: Mapping[str, Any],
    *,
    previous: Any = None,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
):
    """Enter ``stage`` and build a fresh DeepSpeed engine that trains only its parameters.

    The scheduler's parameter groups (per-role learning rates) go to the optimizer: to the one
    named in ``ds_config["optimizer"]`` if there is one (its ``lr`` is the default a group's own
    ``lr`` overrides), else to ``optimizer_cls`` (a plain torch optimizer: no fused-op compile).

    Returns:
        The new ``DeepSpeedEngine``; ``previous`` (if given) is destroyed first.

    Raises:
        ScheduleError: an unknown stage (nothing is destroyed then).
    """
    import deepspeed

    scheduler.index_of(stage)  # raise before tearing anything down
    if previous is not None:
        previous.destroy()
    groups = scheduler.enter(stage)
    config = dict(ds_config)
    if "optimizer" in config:
        optimizer = None
        model_parameters = groups
    else:
        optimizer = optimizer_cls(groups)
        model_parameters = None
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=model_parameters, config=config
    )
    return engine


def gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (un-partitioned) CPU copies of ``model``'s parameters and buffers, on every rank.

    Under ZeRO-3 the parameters are gathered for the copy and released again; under ZeRO-0/1/2 or
    without DeepSpeed this is a plain ``state_dict`` copy.
    """
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
