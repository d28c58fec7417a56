"""The YAML configuration of ``recipes/train.py``: one file per stage, with shared parts included.

A stage file has four sections (every key is checked: an unknown one, or a value of the wrong
type, raises :class:`TrainConfigError` naming the dotted key)::

    base: model.yaml          # optional: file(s) merged underneath this one, relative to it
    model: {...}              # recipes.build.build_model's schema (vision, llm, adapter, lora, ...)
    stage: {...}              # which stage of which preset, with optional overrides
    data: {...}               # LLaVA-format JSON, image folder, chat template, slicer
    training: {...}           # batch, learning rate, schedule, precision, DeepSpeed, checkpoints

Paths in ``model``, ``data`` and ``training`` are taken as written (relative to the working
directory, where the launcher starts); only ``base`` is relative to the file naming it.
``--set training.lr=2e-5`` style overrides (values parsed as YAML) apply after the merge.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from recipes.model_config import matches_types, type_names

__all__ = ["DEFAULTS", "PRESETS", "TrainConfigError", "apply_overrides", "load_config"]

PRESETS = ("paper", "reference", "alternating")

_NUM = (int, float)
# Every key a stage file may hold below stage / data / training: (default, accepted types)
# (``model`` is validated by recipes.build). A ``None`` default means "not set".
_KEYS: dict[str, dict[str, tuple[Any, tuple[type, ...]]]] = {
    "stage": {
        "preset": ("paper", (str,)),        # paper | reference | alternating
        "rounds": (1, (int,)),              # alternating(rounds)
        "name": (None, (str,)),             # the stage to run: I, II, III, 1a, 1b, 1c, SFT, ...
        "trainable": (None, (list,)),       # override the preset's roles
        "views": (None, (str,)),            # override: global | local | both
        "router_gamma": (None, _NUM),       # override
        "force_expert": (None, (int,)),     # override: 0 | 1
    },
    "data": {
        "train": (None, (str,)),            # LLaVA-format JSON
        "image_root": (None, (str,)),       # default: the JSON's folder
        "template": ("qa", (str,)),         # recipes.templates name
        "slicer": ({}, (dict,)),            # AdaptiveSlicer keyword arguments
        "generate": (None, (dict,)),        # {num, seed, square, clutter}: write the colour task
                                            # into `train`'s folder when `train` does not exist
        "num_workers": (0, (int,)),
        "check_images": (False, (bool,)),   # slice every image at open; one error lists the bad
        "skip_bad_images": (False, (bool,)),  # drop records with a bad image (counted) instead
        "max_length": (None, (int,)),       # text + visual tokens per sample (default: the
                                            # LLM's max_position_embeddings); longer text is cut
    },
    "training": {
        "output_dir": (None, (str,)),
        "global_batch_size": (256, (int,)),
        "micro_batch_size": (16, (int,)),
        "lr": (None, _NUM),                 # default: the preset stage's learning rate
        "lr_schedule": ("cosine", (str,)),  # cosine | constant
        "warmup_ratio": (0.03, _NUM),
        "min_lr_ratio": (0.0, _NUM),
        "epochs": (1, (int,)),
        "max_steps": (None, (int,)),        # stop after this many optimizer steps
        "weight_decay": (0.0, _NUM),
        "adam_betas": ([0.9, 0.999], (list,)),
        "max_grad_norm": (1.0, _NUM),
        "precision": ("fp32", (str,)),      # fp32 | bf16 | fp16
        "deepspeed": (None, (str,)),        # null (plain PyTorch / DDP), zero2, zero3,
                                            # zero3-offload, or a JSON path
        "save_every": (0, (int,)),          # steps between resumable checkpoints (0: at the end)
        "keep_last": (2, (int,)),
        "log_every": (1, (int,)),
        "seed": (0, (int,)),
        "progress": (True, (bool,)),
        "device": (None, (str,)),           # default: cuda:LOCAL_RANK with CUDA, else cpu
    },
}
DEFAULTS: dict[str, dict[str, Any]] = {
    section: {key: default for key, (default, _) in keys.items()}
    for section, keys in _KEYS.items()
}
_TYPES: dict[str, tuple[type, ...]] = {
    f"{section}.{key}": types for section, keys in _KEYS.items()
    for key, (_, types) in keys.items()
}
_CHOICES = {
    "stage.preset": PRESETS, "stage.views": ("global", "local", "both"),
    "stage.force_expert": (0, 1), "training.lr_schedule": ("cosine", "constant"),
    "training.precision": ("fp32", "bf16", "fp16"),
}
_REQUIRED = ("stage.name", "data.train", "training.output_dir")


class TrainConfigError(ValueError):
    """A training configuration file, key or value is invalid."""


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise TrainConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TrainConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_tree(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise TrainConfigError(f"config files include each other in a cycle: {chain}")
    data = _read_yaml(path)
    bases = data.pop("base", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise TrainConfigError(f"{str(path)!r}: 'base' must be a path or a list of paths")
    merged: dict[str, Any] = {}
    for b in bases:
        merged = _merge(merged, _load_tree(path.parent / b, (*seen, path)))
    return _merge(merged, data)


def apply_overrides(config: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``["training.lr=2e-5", "stage.name=II"]`` applied to a copy of ``config``.

    Raises:
        TrainConfigError: an override without ``=`` or with an empty key.
    """
    import yaml

    out = copy.deepcopy(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise TrainConfigError(f"override {item!r} must look like section.key=value")
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return out


def _check_section(name: str, given: Any) -> dict[str, Any]:
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise TrainConfigError(f"'{name}' must be a mapping, got {type(given).__name__}")
    defaults = DEFAULTS[name]
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise TrainConfigError(f"unknown key(s) {[f'{name}.{k}' for k in unknown]}; known: "
                               f"{sorted(defaults)}")
    out = {**copy.deepcopy(defaults), **given}
    for key, value in out.items():
        dotted = f"{name}.{key}"
        if value is None:
            continue
        types = _TYPES[dotted]
        if float in types and isinstance(value, str):
            # PyYAML reads 2e-5 (no dot) as a string; take it as the number it means
            try:
                value = out[key] = float(value)
            except ValueError:
                pass
        if not matches_types(value, types):
            got = "a bool" if isinstance(value, bool) else f"{type(value).__name__} {value!r}"
            raise TrainConfigError(f"{dotted} must be {type_names(types)}, got {got}")
        if dotted in _CHOICES and value not in _CHOICES[dotted]:
            raise TrainConfigError(f"{dotted}={value!r}, expected one of {list(_CHOICES[dotted])}")
    return out


def _check_values(cfg: dict[str, Any]) -> None:
    t = cfg["training"]
    for key in ("global_batch_size", "micro_batch_size", "epochs", "keep_last", "log_every"):
        if t[key] < 1:
            raise TrainConfigError(f"training.{key} must be >= 1, got {t[key]}")
    for key in ("save_every",):
        if t[key] < 0:
            raise TrainConfigError(f"training.{key} must be >= 0, got {t[key]}")
    if t["max_steps"] is not None and t["max_steps"] < 1:
        raise TrainConfigError(f"training.max_steps must be >= 1, got {t['max_steps']}")
    if t["lr"] is not None and not (math.isfinite(t["lr"]) and t["lr"] > 0):
        raise TrainConfigError(f"training.lr must be finite and > 0, got {t['lr']}")
    if not 0 <= t["warmup_ratio"] < 1:
        raise TrainConfigError(f"training.warmup_ratio must lie in [0, 1), got {t['warmup_ratio']}")
    if not 0 <= t["min_lr_ratio"] <= 1:
        raise TrainConfigError(f"training.min_lr_ratio must lie in [0, 1], got {t['min_lr_ratio']}")
    if t["weight_decay"] < 0 or t["max_grad_norm"] < 0:
        raise TrainConfigError("training.weight_decay and training.max_grad_norm must be >= 0")
    betas = t["adam_betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise TrainConfigError(f"training.adam_betas must be two numbers in [0, 1), got {betas}")
    if t["global_batch_size"] % t["micro_batch_size"]:
        raise TrainConfigError(
            f"training.global_batch_size={t['global_batch_size']} is not a multiple of "
            f"training.micro_batch_size={t['micro_batch_size']}")
    g = cfg["stage"]["router_gamma"]
    if g is not None and not 0 < g <= 1:
        raise TrainConfigError(f"stage.router_gamma must lie in (0, 1], got {g}")
    if cfg["stage"]["trainable"] is not None and not all(
            isinstance(r, str) for r in cfg["stage"]["trainable"]):
        raise TrainConfigError("stage.trainable must be a list of role names")
    if cfg["data"]["num_workers"] < 0:
        raise TrainConfigError("data.num_workers must be >= 0")
    if cfg["data"]["max_length"] is not None and cfg["data"]["max_length"] < 1:
        raise TrainConfigError(f"data.max_length must be >= 1, got {cfg['data']['max_length']}")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read ``path`` (with its ``base`` files), apply ``overrides``, fill defaults and check.

    Returns:
        ``{"model": dict, "stage": dict, "data": dict, "training": dict, "source": str}`` with
        every stage / data / training key present.

    Raises:
        FileNotFoundError: the file or a base file is missing.
        TrainConfigError: invalid YAML, an unknown section or key, a wrong type or value, a
            required key (``stage.name``, ``data.train``, ``training.output_dir``) missing.
    """
    raw = apply_overrides(_load_tree(Path(path), ()), overrides)
    unknown = sorted(set(raw) - {"model", "stage", "data", "training"})
    if unknown:
        raise TrainConfigError(f"unknown section(s) {unknown}; known: data, model, stage, "
                               f"training (and base)")
    if not isinstance(raw.get("model"), dict):
        raise TrainConfigError("'model' section missing or not a mapping")
    cfg = {"model": raw["model"]}
    for name in ("stage", "data", "training"):
        cfg[name] = _check_section(name, raw.get(name))
    missing = [k for k in _REQUIRED if cfg[k.split(".")[0]][k.split(".")[1]] is None]
    if missing:
        raise TrainConfigError(f"required key(s) {missing} not set")
    _check_values(cfg)
    cfg["source"] = str(Path(path))
    return cfg
