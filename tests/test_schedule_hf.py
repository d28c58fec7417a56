"""The Hugging Face Trainer callback: a real tiny Trainer run per stage on CPU."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from slime_adapters.schedule import AlternatingScheduler, ScheduleError, Stage, projector_roles
from tests.test_schedule import TinyModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from slime_adapters.integrations.hf import (  # noqa: E402
    SCHEDULE_STATE_NAME,
    check_stage_matches,
    load_schedule_state,
    schedule_callback,
)


class LossModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = TinyModel()

    def forward(self, x, labels):
        return {"loss": ((self.inner(x) - labels) ** 2).mean()}


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(8, 3, 3, generator=g)
        self.y = torch.randn(8, generator=g)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _setup():
    torch.manual_seed(0)
    model = LossModel()
    inner = model.inner
    roles = dict(projector_roles(inner.projector), compressor=inner.compressor, llm=inner.llm)
    stages = [Stage("I", ("mlp_expert", "query_expert", "gate"), views="global", lr=1e-2, steps=3),
              Stage("II", ("compressor",), views="local", lr=1e-2, steps=2)]
    return model, AlternatingScheduler(roles, stages, model=model)


def _args(tmp_path, steps):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        logging_strategy="no", dataloader_num_workers=0,
    )


@pytest.mark.slow
def test_trainer_runs_one_stage_per_train_call(tmp_path):
    model, sched = _setup()
    callback = schedule_callback(sched)
    seen = []
    for stage in sched:
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        declared = set(sched.trainable_parameter_names())
        opt = torch.optim.AdamW(sched.param_groups())
        # max_steps larger than the stage: the callback must stop training at the stage's end.
        trainer = transformers.Trainer(model=model, args=_args(tmp_path, 50), train_dataset=Data(),
                                       optimizers=(opt, None), callbacks=[callback])
        trainer.train()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == declared, stage.name
        seen.append((stage.name, trainer.state.global_step))
    assert seen == [("I", 3), ("II", 2)]
    assert sched.finished
    # The state is written beside the checkpoint the callback asks for at the stage end.
    state = load_schedule_state(tmp_path / "checkpoint-2")
    assert state["finished"] and state["total_steps"] == 5


def test_mismatched_optimizer_or_flags_raise(tmp_path):
    model, sched = _setup()
    sched.enter("I")
    check_stage_matches(sched, torch.optim.SGD(sched.param_groups()))
    wrong = torch.optim.SGD(model.inner.compressor.parameters(), lr=1)
    with pytest.raises(ScheduleError, match="in the optimizer but not trainable: \\['inner.compressor.0.bias'"):
        check_stage_matches(sched, wrong)
    stray = torch.optim.SGD([nn.Parameter(torch.zeros(2, 2))] + [p for g in sched.param_groups() for p in g["params"]][1:], lr=1)
    with pytest.raises(ScheduleError, match="uncontrolled parameter \\(2, 2\\).*trainable but missing: \\['inner.projector.mlp.0.weight'\\]"):
        check_stage_matches(sched, stray)
    model.inner.vision.weight.requires_grad_(True)
    with pytest.raises(ScheduleError, match="extra \\['inner.vision.weight'\\], missing \\[\\]"):
        check_stage_matches(sched)
    callback = schedule_callback(sched)
    with pytest.raises(ScheduleError, match="requiring grad differ"):
        callback.on_train_begin(_args(tmp_path, 1), None, None, optimizer=None)
    with pytest.raises(ScheduleError, match="no schedule state at"):
        load_schedule_state(tmp_path)
    (tmp_path / SCHEDULE_STATE_NAME).write_text("{oops")
    with pytest.raises(ScheduleError, match="is not valid JSON"):
        load_schedule_state(tmp_path)
