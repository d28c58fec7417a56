"""transformers.Trainer trains the tiny SliME model (the loss falls, only the stage's parameters
change, LoRA included), the README's "Use with transformers" snippet runs, and ZeRO-3 loads a
saved folder partitioned."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import Trainer, TrainingArguments  # noqa: E402

from recipes.build import build_model, roles_of  # noqa: E402
from recipes.data import make_color_dataset  # noqa: E402
from recipes.model_folder import load_model_folder, save_model_folder  # noqa: E402
from slime_adapters import AlternatingScheduler, paper_stages  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
from tests.test_chat import TINY  # noqa: E402  # the tiny model every recipe test builds


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    torch.manual_seed(0)
    built = build_model(TINY)
    save_model_folder(built.model, root / "model", tokenizer=built.tokenizer,
                      extra={"template": "qa", "slicer": {"max_tiles": 2}})
    index = make_color_dataset(root / "data", 4, seed=1)
    records = json.loads(index.read_text())
    data = [[{"role": "user", "content": [{"type": "image", "image": str(root / "data" / r["image"])},
                                         {"type": "text", "text": "what color is the square ?"}]},
             {"role": "assistant", "content": r["conversations"][1]["value"]}] for r in records]
    return root, data


def _train(model, processor, data, stage_index, tmp_path, steps=6, lr=5e-3):
    roles = roles_of(model)
    scheduler = AlternatingScheduler(roles, paper_stages(roles=[r for r in roles if r != "vision"]),
                                     model=model)
    scheduler.enter(stage_index)

    def collate(conversations):
        return {**processor.apply_chat_template(conversations), "views": scheduler.views}

    batch = collate(data)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss():
        model.eval()
        torch.manual_seed(3)
        with torch.no_grad():
            return float(model(**batch).loss)

    first = loss()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=steps,
                             per_device_train_batch_size=4, learning_rate=lr, weight_decay=0.0,
                             remove_unused_columns=False, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0)
    Trainer(model=model, args=args, train_dataset=data, data_collator=collate).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    return first, loss(), changed, set(scheduler.trainable_parameter_names())


def test_trainer_trains_the_stage_parameters_only(saved, tmp_path):
    root, data = saved
    model, processor = load_model_folder(root / "model")
    first, last, changed, trainable = _train(model, processor, data, 0, tmp_path)
    assert last < first
    assert changed and changed <= trainable
    assert all(n.startswith("adapter.projector.") for n in changed), sorted(changed)[:5]


def test_trainer_with_lora_trains_lora_and_the_adapter_not_the_base_llm(saved, tmp_path):
    from peft import LoraConfig, get_peft_model

    root, data = saved
    model, processor = load_model_folder(root / "model")
    model.llm = get_peft_model(model.llm, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                     target_modules=["q_proj", "v_proj"]))
    first, last, changed, trainable = _train(model, processor, data, 2, tmp_path, steps=4,
                                             lr=1e-3)
    assert last < first and changed <= trainable
    llm = {n for n in changed if n.startswith("llm.")}
    assert llm and all("lora_" in n for n in llm)
    assert any(n.startswith("adapter.compressor.") for n in changed)
    assert not any(n.startswith("vision.") for n in changed)
    save_model_folder(model, tmp_path / "merged", tokenizer=processor.tokenizer)
    merged, _ = load_model_folder(tmp_path / "merged")
    batch = processor.apply_chat_template(data[:2])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, model(**batch).logits, rtol=1e-4,
                                   atol=1e-5)


def _readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Use with transformers", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_snippet_runs(saved, tmp_path, monkeypatch, capsys):
    root, data = saved
    blocks = _readme_blocks()
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    image = data[0][0]["content"][0]["image"]
    scope = {"folder": str(root / "model"), "image": image}
    exec(compile(blocks[0], "README.md (generate)", "exec"), scope)
    assert isinstance(scope["answer"], str)
    assert scope["out"].shape[1] >= scope["inputs"]["input_ids"].shape[1] + 1
    assert " ".join(scope["answer"].split()) in " ".join(capsys.readouterr().out.split())
    before = {n: p.detach().clone() for n, p in scope["model"].named_parameters()}
    exec(compile(blocks[1], "README.md (Trainer)", "exec"), scope)
    changed = {n for n, p in scope["model"].named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(n.startswith("adapter.projector.") for n in changed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_ZERO3 = """
import json, sys, torch, deepspeed
from transformers.integrations import HfDeepSpeedConfig
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
deepspeed.init_distributed(dist_backend="gloo")
ds = {"train_batch_size": 1, "zero_optimization": {"stage": 3,
      "stage3_param_persistence_threshold": 0}}
keep = HfDeepSpeedConfig(ds)
from recipes.model_folder import load_model_folder
model, _ = load_model_folder(sys.argv[1])
parts = {name: [hasattr(p, "ds_id") and p.numel() == 0 for p in getattr(model, name).parameters()]
         for name in ("vision", "llm", "adapter")}
print(json.dumps({k: [all(v), any(v)] for k, v in parts.items()}))
"""


@pytest.mark.slow
def test_zero3_loads_the_encoder_and_the_llm_partitioned(saved, tmp_path):
    pytest.importorskip("deepspeed")
    root, _ = saved
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _ZERO3, str(root / "model")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # every encoder and LLM weight is a partition; the adapter is built whole (DeepSpeed's
    # initialize partitions it with the rest)
    assert result == {"vision": [True, True], "llm": [True, True], "adapter": [False, False]}
