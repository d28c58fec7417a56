"""The ``model:`` section of a recipe config: its schema, checked key by key, with its defaults.

:func:`parse_model_config` checks every key and type (naming the dotted key of a problem, e.g.
``model.vision.typo``) and fills in the defaults that need no model;
:func:`recipes.build.build_model` fills in the rest from the loaded encoder and LLM. The schema is
documented in :mod:`recipes.build`.

Shapes: none.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from slime_adapters.adapter import SliMEVisualAdapterConfig
from slime_adapters.config import ConfigBase

__all__ = ["DTYPES", "LLM_TYPES", "LORA_DEFAULTS", "VISION_MODEL_TYPES", "VISION_TYPES",
           "existing_folder", "matches_types", "parse_model_config", "type_names"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# type word -> (HF config class, HF model class, has a CLS token)
VISION_TYPES = {"clip": ("CLIPVisionConfig", "CLIPVisionModel", True),
                "siglip": ("SiglipVisionConfig", "SiglipVisionModel", False)}
# model_type in a saved config.json -> vision type word (full CLIP/SigLIP folders included)
VISION_MODEL_TYPES = {"clip_vision_model": "clip", "clip": "clip",
                      "siglip_vision_model": "siglip", "siglip": "siglip"}
LLM_TYPES = {"llama": ("LlamaConfig", "LlamaForCausalLM")}
LORA_DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
TOP = "model"


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(value).__name__}")
    return dict(value)


def _keys(d: Mapping[str, Any], allowed: typing.Iterable[str], where: str) -> None:
    allowed = tuple(allowed)
    for key in d:
        if key not in allowed:
            raise ValueError(f"{where}.{key}: unknown key (expected one of {sorted(allowed)})")


def matches_types(value: Any, types: tuple[type, ...]) -> bool:
    """``isinstance(value, types)``, except that a bool is no int unless ``bool`` is named."""
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def type_names(types: tuple[type, ...]) -> str:
    """``"int or null"`` for ``(int, NoneType)``: the types as an error message says them."""
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _typed(value: Any, types: tuple[type, ...], where: str) -> Any:
    if not matches_types(value, types):
        raise ValueError(f"{where} must be {type_names(types)}, got {value!r}")
    return value


def _one_of(d: Mapping[str, Any], where: str) -> str:
    given = [k for k in ("path", "type") if d.get(k) is not None]
    if len(given) != 1:
        raise ValueError(f"{where}: give exactly one of 'path' and 'type', got {given or 'neither'}")
    return given[0]


def _hint_ok(hint: Any, value: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        return any(_hint_ok(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple or hint is tuple:
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(value, list | tuple) and all(
            any(_hint_ok(a, v) for a in args) if args else True for v in value)
    return True  # a field type this checker does not model: the constructor checks it


def _check_config_dict(data: Any, cls: type[ConfigBase], where: str) -> dict[str, Any]:
    """Check the keys and value types of a (nested) config dict against ``cls``'s fields."""
    data = _mapping(data, where)
    if data.get("kind", cls.kind) != cls.kind:
        raise ValueError(f"{where}.kind must be {cls.kind!r}, got {data['kind']!r}")
    data.pop("kind", None)
    data.pop("slime_adapters_version", None)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    _keys(data, names, where)
    for key, value in data.items():
        hint = hints[key]
        options = {a.kind: a for a in typing.get_args(hint)
                   if isinstance(a, type) and issubclass(a, ConfigBase)}
        if options and isinstance(value, Mapping):  # one of several configs, named by its kind
            kind = value.get("kind", next(iter(options)))
            if kind not in options:
                raise ValueError(f"{where}.{key}.kind must be one of {sorted(options)}, got "
                                 f"{kind!r}")
            hint = options[kind]
        if isinstance(hint, type) and issubclass(hint, ConfigBase):
            data[key] = _check_config_dict(value, hint, f"{where}.{key}")
        elif not _hint_ok(hint, value):
            raise ValueError(f"{where}.{key} must be {hint}, got {value!r}")
    return data


def _hf_fields(config_class: type, data: Any, where: str) -> dict[str, Any]:
    data = _mapping(data, where)
    default = config_class()
    for key in data:
        if not hasattr(default, key):
            raise ValueError(f"{where}.{key}: not a field of {config_class.__name__}")
    return data


def existing_folder(path: Any, where: str) -> str:
    """``path`` (a string naming a folder). Raises ValueError (not a string) or
    FileNotFoundError (no such folder), naming ``where``."""
    _typed(path, (str,), where)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{where}: folder {path!r} does not exist")
    return path


def _random_init(section: Mapping[str, Any], types: Mapping[str, tuple], w: str) -> dict[str, Any]:
    """``{type, config}`` of a model built at random: a known type and its HF config's fields."""
    kind = _typed(section["type"], (str,), f"{w}.type")
    if kind not in types:
        raise ValueError(f"{w}.type must be one of {sorted(types)}, got {kind!r}")
    import transformers

    conf = _hf_fields(getattr(transformers, types[kind][0]), section.get("config", {}),
                      f"{w}.config")
    return {"type": kind, "config": conf}


def parse_model_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Check a ``model:`` dict (the schema of :mod:`recipes.build`) and fill in the defaults that
    need no model.

    Returns:
        A JSON-ready copy: every key present, ``vision``/``llm``/``tokenizer`` reduced to their
        path or type form, ``lora`` with its defaults; the adapter dict as given (checked).

    Raises:
        ValueError: an unknown key, a wrong type or value, or a missing or contradictory choice
            (path and type together), naming the dotted key (``model.vision.typo``).
    """
    cfg = copy.deepcopy(_mapping(cfg, TOP))
    _keys(cfg, ("vision", "feature_layer", "drop_cls", "llm", "tokenizer", "adapter", "image_token",
                "separator_token", "lora", "gradient_checkpointing", "init_from", "dtype"), TOP)
    out: dict[str, Any] = {}

    w = f"{TOP}.vision"
    vision = _mapping(cfg.get("vision"), w) if "vision" in cfg else {}
    _keys(vision, ("path", "type", "config"), w)
    if _one_of(vision, w) == "path":
        if "config" in vision:
            raise ValueError(f"{w}.config: only with {w}.type (a path brings its own config)")
        out["vision"] = {"path": _typed(vision["path"], (str,), f"{w}.path")}
    else:
        out["vision"] = _random_init(vision, VISION_TYPES, w)
    out["feature_layer"] = _typed(cfg.get("feature_layer", -2), (int,), f"{TOP}.feature_layer")
    out["drop_cls"] = _typed(cfg.get("drop_cls"), (bool, type(None)), f"{TOP}.drop_cls")

    w = f"{TOP}.llm"
    llm = _mapping(cfg.get("llm"), w) if "llm" in cfg else {}
    _keys(llm, ("path", "gguf_file", "type", "config"), w)
    if _one_of(llm, w) == "path":
        if "config" in llm:
            raise ValueError(f"{w}.config: only with {w}.type (a path brings its own config)")
        out["llm"] = {"path": _typed(llm["path"], (str,), f"{w}.path"),
                      "gguf_file": _typed(llm.get("gguf_file"), (str, type(None)), f"{w}.gguf_file")}
    else:
        if llm.get("gguf_file") is not None:
            raise ValueError(f"{w}.gguf_file: only with {w}.path")
        out["llm"] = _random_init(llm, LLM_TYPES, w)

    w = f"{TOP}.tokenizer"
    if cfg.get("tokenizer") is None:
        if "path" not in out["llm"]:
            raise ValueError(f"{w} is required when {TOP}.llm has no path (e.g. {{type: word}})")
        tok = {"path": out["llm"]["path"], "gguf_file": out["llm"]["gguf_file"]}
    else:
        tok = _mapping(cfg["tokenizer"], w)
        _keys(tok, ("path", "gguf_file", "type"), w)
        if _one_of(tok, w) == "type":
            if _typed(tok["type"], (str,), f"{w}.type") != "word":
                raise ValueError(f"{w}.type must be 'word', got {tok['type']!r}")
            if tok.get("gguf_file") is not None:
                raise ValueError(f"{w}.gguf_file: only with {w}.path")
            tok = {"type": "word"}
        else:
            tok = {"path": _typed(tok["path"], (str,), f"{w}.path"),
                   "gguf_file": _typed(tok.get("gguf_file"), (str, type(None)), f"{w}.gguf_file")}
    out["tokenizer"] = tok

    out["adapter"] = _check_config_dict(cfg.get("adapter", {}), SliMEVisualAdapterConfig,
                                        f"{TOP}.adapter")
    for key, default in (("image_token", "<image>"), ("separator_token", ",")):
        value = _typed(cfg.get(key, default), (str,), f"{TOP}.{key}")
        if not value.strip():
            raise ValueError(f"{TOP}.{key} must be a non-empty token, got {value!r}")
        out[key] = value
    if out["image_token"] == out["separator_token"]:
        raise ValueError(f"{TOP}.separator_token must differ from {TOP}.image_token")

    w = f"{TOP}.lora"
    lora = cfg.get("lora")
    if lora is not None:
        lora = {**LORA_DEFAULTS, **_mapping(lora, w)}
        _keys(lora, LORA_DEFAULTS, w)
        if _typed(lora["r"], (int,), f"{w}.r") < 1:
            raise ValueError(f"{w}.r must be >= 1, got {lora['r']}")
        lora["alpha"] = _typed(lora["alpha"], (int, float), f"{w}.alpha")
        dropout = _typed(lora["dropout"], (int, float), f"{w}.dropout")
        if not 0 <= dropout < 1:
            raise ValueError(f"{w}.dropout must be in [0, 1), got {dropout}")
        targets = lora["target_modules"]
        if isinstance(targets, str):
            targets = [targets]
        if not (isinstance(targets, list | tuple) and targets
                and all(isinstance(t, str) and t for t in targets)):
            raise ValueError(f"{w}.target_modules must be a non-empty list of module names, "
                             f"got {lora['target_modules']!r}")
        lora["target_modules"] = list(targets)
    out["lora"] = lora
    out["gradient_checkpointing"] = _typed(cfg.get("gradient_checkpointing", False), (bool,),
                                           f"{TOP}.gradient_checkpointing")
    out["init_from"] = _typed(cfg.get("init_from"), (str, type(None)), f"{TOP}.init_from")
    dtype = _typed(cfg.get("dtype", "float32"), (str,), f"{TOP}.dtype")
    if dtype not in DTYPES:
        raise ValueError(f"{TOP}.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out["dtype"] = dtype
    return out
