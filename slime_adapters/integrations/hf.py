"""Hugging Face ``Trainer`` glue for :class:`~slime_adapters.schedule.AlternatingScheduler`.

A ``Trainer`` builds its optimizer once, from the parameters that require gradients when training
starts, so a stage change needs a new optimizer; the pattern is one ``trainer.train()`` per stage::

    sched = AlternatingScheduler(roles, paper_stages(steps=...), model=model)
    callback = schedule_callback(sched)
    for stage in sched:                       # enters each stage (requires_grad set)
        opt = torch.optim.AdamW(sched.param_groups())   # per-role learning rates
        args = TrainingArguments(output_dir=f"out/{stage.name}", max_steps=stage.steps, ...)
        Trainer(model=model, args=args, train_dataset=data_for(sched.views),
                optimizers=(opt, None), callbacks=[callback]).train()

The callback checks at ``on_train_begin`` that the optimizer (when one was passed) and the model's
``requires_grad`` flags match the current stage, counts steps with :meth:`step` and stops training
when the stage's ``steps`` run out, and writes the schedule state beside every Trainer checkpoint
(``<checkpoint>/slime_schedule.json``; read it back with :func:`load_schedule_state`). Give each
stage its own ``output_dir``: every ``Trainer`` counts ``global_step`` from 0, so checkpoint names
would collide.

transformers is imported inside :func:`schedule_callback` only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from slime_adapters.config import atomic_write_text
from slime_adapters.schedule import AlternatingScheduler, ScheduleError

__all__ = [
    "SCHEDULE_STATE_NAME",
    "check_stage_matches",
    "load_schedule_state",
    "schedule_callback",
]

SCHEDULE_STATE_NAME = "slime_schedule.json"


def check_stage_matches(scheduler: AlternatingScheduler, optimizer: Any = None) -> None:
    """Raise unless the parameters that require grad (and those in ``optimizer``, if given) are
    exactly the current stage's.

    Raises:
        ScheduleError: no stage entered, or a mismatch, naming the parameters that differ.
    """
    want = set(scheduler.trainable_parameter_names())
    have = set(scheduler.requires_grad_parameter_names())
    if have != want:
        raise ScheduleError(
            f"stage {scheduler.current.name!r}: parameters requiring grad differ from the stage: "
            f"extra {sorted(have - want)}, missing {sorted(want - have)}"
        )
    if optimizer is not None:
        in_opt = [p for g in optimizer.param_groups for p in g["params"]]
        trainable = dict((id(p), n) for n, p in scheduler.named_trainable_parameters())
        extra = sorted(_describe(scheduler, p) for p in in_opt if id(p) not in trainable)
        missing = sorted(set(trainable.values()) - {trainable.get(id(p)) for p in in_opt})
        if extra or missing:
            raise ScheduleError(
                f"stage {scheduler.current.name!r}: the optimizer does not hold the stage's "
                f"parameters (in the optimizer but not trainable: {extra}; trainable but missing: "
                f"{missing}); build it from scheduler.param_groups() after entering the stage"
            )


def _describe(scheduler: AlternatingScheduler, param: Any) -> str:
    try:
        return scheduler.name_of(param)
    except ScheduleError:
        return f"<uncontrolled parameter {tuple(param.shape)}>"


def load_schedule_state(checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The scheduler state saved beside a Trainer checkpoint.

    Raises:
        ScheduleError: the file is missing or not valid JSON.
    """
    path = Path(checkpoint_dir) / SCHEDULE_STATE_NAME
    if not path.is_file():
        raise ScheduleError(f"no schedule state at {str(path)!r}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ScheduleError(f"{str(path)!r} is not valid JSON: {exc}") from exc


def schedule_callback(scheduler: AlternatingScheduler):
    """A ``transformers.TrainerCallback`` driving ``scheduler`` (see the module docstring).

    Returns:
        The callback instance.
    """
    from transformers import TrainerCallback

    class AlternatingScheduleCallback(TrainerCallback):
        """Checks the stage at train begin, counts steps, stops at the stage's end, saves state."""

        def __init__(self) -> None:
            self.scheduler = scheduler

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            check_stage_matches(self.scheduler, optimizer)

        def on_step_end(self, args, state, control, **kwargs):
            if self.scheduler.step() or self.scheduler.finished:
                control.should_training_stop = True
                control.should_save = True
            return control

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            atomic_write_text(folder / SCHEDULE_STATE_NAME,
                              json.dumps(self.scheduler.state_dict(), indent=2) + "\n")

    return AlternatingScheduleCallback()
