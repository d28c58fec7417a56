"""The engines of ``recipes/train.py``: :class:`TorchEngine` (plain PyTorch, DDP with several
processes, bf16 autocast) and :class:`DeepSpeedEngine` (ZeRO through
:func:`slime_adapters.integrations.deepspeed.engine_for_stage`) share the step / save / load
protocol of :class:`_Engine`; :func:`deepspeed_config` turns a preset or JSON file into the
configuration DeepSpeed gets.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from recipes.train_config import TrainConfigError
from recipes.train_runtime import Distributed, config_differences
from slime_adapters.config import atomic_write_text

CONFIGS = Path(__file__).resolve().parent / "configs"
DEEPSPEED_PRESETS = {name: CONFIGS / "deepspeed" / f"{name}.json"
                     for name in ("zero2", "zero3", "zero3-offload")}

_MODEL_KEYS = ("images", "input_ids", "attention_mask", "labels", "question_ids", "question_mask")


def _half_dtypes(params) -> str:
    """The non-float32 dtypes among ``params`` ("bfloat16/float16"), empty when all are float32."""
    return "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in params
                            if p.dtype != torch.float32}))


def zero_stage(config: dict[str, Any] | None) -> int:
    """The ZeRO stage of a DeepSpeed configuration (0 without one)."""
    return int((config or {}).get("zero_optimization", {}).get("stage", 0))


def _step_of(path: Path) -> int | None:
    """The step of a complete checkpoint folder ``step-N`` (``None`` for anything else)."""
    head, _, number = path.name.partition("-")
    if head != "step" or not number.isdigit() or not path.is_dir():
        return None
    return int(number)


def prune_checkpoints(ckdir: Path, step: int, keep_last: int) -> None:
    """Delete the checkpoints older than the ``keep_last`` newest up to ``step`` (the one
    ``latest`` names). Checkpoints of later steps (an older trajectory a run resumed before) are
    left alone, and ``step-N`` itself is never deleted."""
    older = sorted(s for s in map(_step_of, ckdir.iterdir()) if s is not None and s < step)
    for old in older[:max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(ckdir / f"step-{old:07d}", ignore_errors=True)


# What DeepSpeed's own checkpoint files name beside tensors (its loader unpickles them with
# weights_only=False, so every file is inspected first, without running it)
_DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


def refuse_unsafe_pickles(folder: Path, allowed: frozenset[str] = _DEEPSPEED_GLOBALS) -> None:
    """Inspect every ``*.pt`` in ``folder`` (nothing is unpickled) and refuse a file that names a
    Python object outside torch's safe set and ``allowed``.

    Raises:
        TrainConfigError: naming the file and the objects it would build.
    """
    from torch.serialization import get_unsafe_globals_in_checkpoint

    for path in sorted(folder.glob("*.pt")):
        try:
            names = get_unsafe_globals_in_checkpoint(str(path))
        except Exception as exc:  # noqa: BLE001 - not a torch zip file at all
            raise TrainConfigError(f"checkpoint file {str(path)!r} is not a readable torch file "
                                   f"(truncated or corrupt?): {exc}") from exc
        unsafe = sorted(set(names) - allowed)
        if unsafe:
            raise TrainConfigError(
                f"checkpoint file {str(path)!r} would run code while loading (it names {unsafe}); "
                f"refused: resume only from checkpoints this trainer wrote")


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` with torch's restricted unpickler (tensors, numbers, strings, tuples, lists,
    dicts): never code from the checkpoint folder.

    Raises:
        TrainConfigError: the file is missing, damaged or asks for anything else (named).
    """
    if not path.is_file():
        raise TrainConfigError(f"checkpoint file {str(path)!r} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
        raise TrainConfigError(f"checkpoint file {str(path)!r} was refused by "
                               f"torch.load(weights_only=True) (damaged, or it would run code): "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                               ) from exc


class _Engine:
    """Shared by both engines: learning rate, forward arguments, the checkpoint protocol."""

    name = "base"

    def __init__(self, model, scheduler, stage, dist: Distributed, accum: int,
                 t: dict[str, Any]) -> None:
        self.model, self.scheduler, self.stage = model, scheduler, stage
        self.dist, self.accum, self.t = dist, accum, t

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        # looked up every time: loading an optimizer state replaces the list
        return self.optimizer.param_groups

    def _capture_base_lrs(self) -> None:
        self._base = [g["lr"] for g in self.param_groups]

    @property
    def lr(self) -> float:
        return float(self.param_groups[0]["lr"])

    def set_lr(self, factor: float) -> None:
        for group, base in zip(self.param_groups, self._base):
            group["lr"] = base * factor

    @staticmethod
    def _inputs(batch: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return {**{k: batch[k] for k in _MODEL_KEYS}, **kw}

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self, ckdir: Path, step: int, fingerprint: dict[str, Any], *, keep_last: int) -> Path:
        """Write a resumable checkpoint (see recipes/train.py for the protocol); returns it."""
        d = self.dist
        tag = f"step-{step:07d}"
        partial = ckdir / f"{tag}.partial"
        if d.rank == 0:
            ckdir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted save
        d.barrier()
        self._save_state(ckdir, partial.name)
        partial.mkdir(parents=True, exist_ok=True)
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   partial / f"rng-rank{d.rank}.pt")
        d.barrier()
        final = ckdir / tag
        if d.rank == 0:
            atomic_write_text(partial / "trainer_state.json", json.dumps(
                {"step": step, "stage": self.stage.name, "world_size": d.world,
                 "engine": self.name, "fingerprint": fingerprint}, indent=1))
            replaced = ckdir / f"{tag}.replaced"  # moved back by the next start if killed
            if final.exists():
                shutil.rmtree(replaced, ignore_errors=True)
                os.replace(final, replaced)
            os.replace(partial, final)
            shutil.rmtree(replaced, ignore_errors=True)
            atomic_write_text(ckdir / "latest", tag)
            prune_checkpoints(ckdir, step, keep_last)
        d.barrier()
        return final

    def load(self, path: Path, fingerprint: dict[str, Any]) -> int:
        """Restore a checkpoint written by :meth:`save`; returns its optimizer step.

        Raises:
            FileNotFoundError: ``path`` is not a complete checkpoint.
            TrainConfigError: it was written under another configuration, process count or engine.
        """
        state_file = path / "trainer_state.json"
        if not state_file.is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a complete checkpoint (no "
                                    f"trainer_state.json)")
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
            missing = {"step", "fingerprint", "world_size", "engine"} - set(state)
        except (ValueError, TypeError) as exc:  # JSON, UTF-8, not a mapping
            raise TrainConfigError(f"{str(state_file)!r} is damaged: {exc}") from exc
        if missing:
            raise TrainConfigError(f"{str(state_file)!r} is damaged: no {sorted(missing)}")
        diff = config_differences(state["fingerprint"], fingerprint)
        if diff:
            raise TrainConfigError(
                f"checkpoint {str(path)!r} was written under a different configuration "
                f"({', '.join(diff[:8])}); pass --resume never or another training.output_dir")
        for key, mine in (("world_size", self.dist.world), ("engine", self.name)):
            if state[key] != mine:
                raise TrainConfigError(f"checkpoint {str(path)!r} was written with {key}="
                                       f"{state[key]!r}, this run has {mine!r}")
        self._load_state(path)
        rng = safe_torch_load(path / f"rng-rank{self.dist.rank}.pt")
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return int(state["step"])

    def save_final(self, directory: Path, tokenizer, *, extra: dict[str, Any]) -> None:
        state = self._full_state_dict()  # a collective under ZeRO-3: every rank calls it
        if self.dist.rank == 0:
            from recipes.model_folder import save_model_folder

            save_model_folder(self.model, directory, tokenizer=tokenizer, extra=extra,
                              state_dict=state)
        self.dist.barrier()

    def _full_state_dict(self):
        """``None``: the module's own tensors are whole."""
        return None


class TorchEngine(_Engine):
    """Plain PyTorch: AdamW over the stage's parameter groups, DDP across processes, bf16
    autocast."""

    name = "torch"

    def __init__(self, model, scheduler, stage, dist, accum, t) -> None:
        super().__init__(model, scheduler, stage, dist, accum, t)
        if t["precision"] == "fp16":
            raise TrainConfigError("training.precision=fp16 needs training.deepspeed (loss "
                                   "scaling); use bf16 or fp32 without DeepSpeed")
        groups = scheduler.enter(stage)
        self.params = [p for g in groups for p in g["params"]]
        low = _half_dtypes(self.params)
        if low:
            # AdamW on half-precision weights rounds most small updates away (no fp32 master copy)
            raise TrainConfigError(
                f"the stage trains {low} weights, which plain PyTorch would update "
                f"without an fp32 master copy; set model.dtype=float32 with "
                f"training.precision=bf16 (autocast), or use training.deepspeed")
        self.optimizer = torch.optim.AdamW(groups, betas=tuple(t["adam_betas"]))
        self.wrapped = model
        if dist.world > 1:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=ids, find_unused_parameters=True)
        self._capture_base_lrs()

    def forward(self, batch: dict[str, Any], **kw: Any):
        autocast = (torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
                    if self.t["precision"] == "bf16" else contextlib.nullcontext())
        with autocast:
            return self.wrapped(**self._inputs(batch, **kw))

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        sync = contextlib.nullcontext()
        if not boundary and isinstance(self.wrapped, torch.nn.parallel.DistributedDataParallel):
            sync = self.wrapped.no_sync()
        with sync:
            (loss / self.accum).backward()

    def step(self) -> None:
        if self.t["max_grad_norm"]:
            torch.nn.utils.clip_grad_norm_(self.params, self.t["max_grad_norm"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        """The stage's parameters by their names in the model."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {names[id(p)]: p for p in self.params}

    def _save_state(self, ckdir: Path, tag: str) -> None:
        folder = ckdir / tag
        folder.mkdir(parents=True, exist_ok=True)
        if self.dist.rank == 0:
            torch.save({"trainable": {n: p.detach().cpu() for n, p in self._trainable().items()},
                        "optimizer": self.optimizer.state_dict()}, folder / "state.pt")

    def _load_state(self, path: Path) -> None:
        state = safe_torch_load(path / "state.pt")
        mine = self._trainable()
        if set(state["trainable"]) != set(mine):
            raise TrainConfigError(f"checkpoint {str(path)!r} holds other trainable parameters "
                                   f"than this stage trains")
        with torch.no_grad():
            for name, value in state["trainable"].items():
                mine[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])


class DeepSpeedEngine(_Engine):
    """DeepSpeed ZeRO: one engine for the stage (only its parameters are partitioned/trained)."""

    name = "deepspeed"

    def __init__(self, model, scheduler, stage, dist, accum, t, config) -> None:
        super().__init__(model, scheduler, stage, dist, accum, t)
        from slime_adapters.integrations.deepspeed import engine_for_stage

        low = _half_dtypes(model.parameters())
        if low and t["precision"] == "fp32":
            raise TrainConfigError(
                f"the model holds {low} weights but training.precision=fp32: DeepSpeed "
                f"would update them without an fp32 master copy; set training.precision to "
                f"bf16 / fp16, or model.dtype=float32")
        self.zero_stage = zero_stage(config)
        optimizer = functools.partial(torch.optim.AdamW, betas=tuple(t["adam_betas"]))
        self.engine = engine_for_stage(model, scheduler, stage, config, optimizer_cls=optimizer)
        self._capture_base_lrs()

    @property
    def optimizer(self):
        return self.engine.optimizer

    def forward(self, batch: dict[str, Any], **kw: Any):
        return self.engine(**self._inputs(batch, **kw))

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        if self.engine.is_gradient_accumulation_boundary() != boundary:
            raise RuntimeError("DeepSpeed's gradient-accumulation boundary disagrees with the "
                               "training loop's")
        self.engine.backward(loss)
        if not boundary:
            self.engine.step()  # DeepSpeed counts micro-batches in step(); no update here

    def step(self) -> None:
        self.engine.step()

    def _save_state(self, ckdir: Path, tag: str) -> None:
        self.engine.save_checkpoint(str(ckdir), tag=tag, save_latest=False,
                                    exclude_frozen_parameters=True)

    def _load_state(self, path: Path) -> None:
        refuse_unsafe_pickles(path)
        self.engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False)

    def _full_state_dict(self):
        if self.zero_stage < 3:
            return None
        # gathered layer by layer onto rank 0's CPU (None elsewhere): no rank holds the whole
        # model on its accelerator
        return self.engine._zero3_consolidated_16bit_state_dict()


def deepspeed_config(t: dict[str, Any], accum: int) -> dict[str, Any]:
    """The DeepSpeed JSON (a preset name or a path) with the batch, clipping and precision of
    ``t`` written in (those keys are owned by the training section)."""
    source = t["deepspeed"]
    path = DEEPSPEED_PRESETS.get(source, Path(source))
    if not path.is_file():
        raise FileNotFoundError(f"training.deepspeed: {source!r} is neither a preset "
                                f"{sorted(DEEPSPEED_PRESETS)} nor an existing JSON file")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TrainConfigError(f"training.deepspeed: {str(path)!r} is not valid JSON: {exc}") \
            from exc
    owned = sorted({"optimizer", "scheduler"} & set(config))
    if owned:
        raise TrainConfigError(
            f"training.deepspeed: {str(path)!r} sets {owned}; the training section owns the "
            f"optimizer (AdamW, adam_betas, weight_decay) and the learning-rate schedule")
    config.pop("train_batch_size", None)
    config["train_micro_batch_size_per_gpu"] = t["micro_batch_size"]
    config["gradient_accumulation_steps"] = accum
    config["gradient_clipping"] = float(t["max_grad_norm"])
    config["bf16"] = {"enabled": t["precision"] == "bf16"}
    config["fp16"] = {"enabled": t["precision"] == "fp16"}
    config.setdefault("steps_per_print", 1 << 30)
    return config


def zero3_loading(config: dict[str, Any] | None, global_batch: int):
    """Under a ZeRO-3 configuration (:func:`deepspeed_config`'s), transformers'
    ``HfDeepSpeedConfig`` for it (keep it alive while models load: ``from_pretrained`` then builds
    them partitioned); ``None`` otherwise."""
    if zero_stage(config) < 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig({**config, "train_batch_size": global_batch})


def build_engine(cfg: dict[str, Any], model, scheduler, stage, dist: Distributed, accum: int,
                 ds_config: dict[str, Any] | None = None):
    """The engine the configuration asks for: DeepSpeed with ``ds_config`` (the
    :func:`deepspeed_config` of ``training.deepspeed``), plain PyTorch without."""
    t = cfg["training"]
    if ds_config is not None:
        return DeepSpeedEngine(model, scheduler, stage, dist, accum, t, ds_config)
    return TorchEngine(model, scheduler, stage, dist, accum, t)
