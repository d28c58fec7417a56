"""Save and load modules as ``model.safetensors`` + ``config.json``.

A saved module is a directory holding

* ``config.json``: the module's config (:class:`slime_adapters.config.ConfigBase.to_dict`: its
  ``kind``, the library version that wrote it, and the constructor keywords);
* ``model.safetensors``: the state dict, with the same config JSON in the file's metadata, so that a
  weights file and a config file from two different saves are detected instead of silently mixed.

The pair is written into a temporary sibling folder that is renamed into place once complete, so an
interrupted save leaves the previous pair (or none), never a half-written file or a mixed pair. Loading finds the class from the config's ``kind`` through
:func:`register_module` (or takes ``cls=``), builds the module from its config and loads the
weights with their saved dtype; unknown config keys (a newer version) warn, missing or unexpected
tensors and shape mismatches raise :class:`CheckpointError` naming every offending key.

The lower-level pieces (:func:`read_safetensors`, :func:`check_state_dict`) are public so that an
importer of other checkpoint layouts can map names and reuse the same checks.

Shapes: state dicts are ``name -> tensor`` of any shape; nothing is reshaped here.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from slime_adapters.config import (
    ConfigBase,
    ConfigError,
    ConfigurableMixin,
    UnknownConfigKeyWarning,
    atomic_write_bytes,
)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "CheckpointError",
    "check_state_dict",
    "load_module",
    "read_safetensors",
    "register_module",
    "registered_kinds",
    "save_module",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_META_KEY = "slime_adapters_config"

# kind -> class. Explicit and inspectable (registered_kinds()); modules register themselves.
_REGISTRY: dict[str, type[nn.Module]] = {}


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the module."""


def register_module(kind: str, cls: type[nn.Module] | None = None):
    """Let :func:`load_module` build ``cls`` for configs of ``kind``; usable as a decorator.

    Returns:
        ``cls`` (or, without ``cls``, a decorator that registers and returns its argument).

    Raises:
        CheckpointError: ``cls`` is not a ConfigurableMixin module whose ``config_class.kind`` is
            ``kind``, or ``kind`` is already registered to another class.
    """

    def register(klass: type[nn.Module]) -> type[nn.Module]:
        if not (isinstance(klass, type) and issubclass(klass, ConfigurableMixin)
                and issubclass(klass, nn.Module)):
            raise CheckpointError(
                f"register_module: {klass!r} must be an nn.Module subclass with ConfigurableMixin"
            )
        config_kind = getattr(getattr(klass, "config_class", None), "kind", None)
        if config_kind != kind:
            raise CheckpointError(
                f"register_module: {klass.__name__}.config_class.kind is {config_kind!r}, "
                f"not {kind!r}"
            )
        if _REGISTRY.get(kind, klass) is not klass:
            raise CheckpointError(
                f"register_module: kind {kind!r} is already registered to "
                f"{_REGISTRY[kind].__qualname__}"
            )
        _REGISTRY[kind] = klass
        return klass

    return register if cls is None else register(cls)


# The library's own modules, imported on first use so that this module imports none of them.
_BUILTIN = {
    "query_compressor": ("slime_adapters.compressor", "QueryCompressor"),
    "noisy_moe_projector": ("slime_adapters.projector", "NoisyMoEProjector"),
    "cosine_token_router": ("slime_adapters.router", "CosineTokenRouter"),
    "slime_visual_adapter": ("slime_adapters.adapter", "SliMEVisualAdapter"),
    "random_selector": ("slime_adapters.selectors", "RandomSelector"),
    "spatial_selector": ("slime_adapters.selectors", "SpatialSelector"),
    "norm_selector": ("slime_adapters.selectors", "NormSelector"),
    "diversity_selector": ("slime_adapters.selectors", "DiversitySelector"),
    "question_topk_selector": ("slime_adapters.selectors", "QuestionTopKSelector"),
    "saliency_selector": ("slime_adapters.selectors", "SaliencySelector"),
}


def _lookup(kind: str) -> type[nn.Module] | None:
    if kind not in _REGISTRY and kind in _BUILTIN:
        module, name = _BUILTIN[kind]
        register_module(kind, getattr(importlib.import_module(module), name))
    return _REGISTRY.get(kind)


def registered_kinds() -> dict[str, type[nn.Module]]:
    """A copy of the ``kind -> class`` registry, the library's own modules included."""
    for kind in _BUILTIN:
        _lookup(kind)
    return dict(_REGISTRY)


def save_module(module: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write ``module``'s weights and config into ``directory`` (created if needed).

    Returns:
        The directory as a :class:`~pathlib.Path`.

    Raises:
        CheckpointError: the module has no ``config`` (a :class:`ConfigBase`), or holds tensors on
            the meta device (nothing to save).
    """
    config = getattr(module, "config", None)
    if not isinstance(config, ConfigBase):
        raise CheckpointError(
            f"save_module: {type(module).__name__} has no .config (a ConfigBase); only "
            "ConfigurableMixin modules can be saved with their config"
        )
    state = module.state_dict()
    meta = sorted(k for k, v in state.items() if v.is_meta)
    if meta:
        raise CheckpointError(f"save_module: tensors on the meta device have no values: {meta}")
    # Cloning drops shared storage (tied weights), which safetensors refuses to write.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    config_json = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    directory = Path(directory)
    weights = st_save(tensors, metadata={"format": "pt", _META_KEY: config_json})
    _write_pair(directory, {WEIGHTS_NAME: weights, CONFIG_NAME: config_json.encode("utf-8")})
    return directory


def _write_pair(directory: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into a fresh sibling ``.NAME.saving-*`` folder and rename it to
    ``directory`` (an existing one is moved aside first, restored if the rename fails). Stale
    siblings of an interrupted save are removed first, a moved-aside one restored when
    ``directory`` itself is gone."""
    parent, name = directory.parent, directory.name
    parent.mkdir(parents=True, exist_ok=True)
    for stale in sorted(parent.glob(f".{name}.saving-*")):
        if stale.name.endswith("-old") and not directory.exists():
            os.replace(stale, directory)  # killed between the two renames below
        else:
            shutil.rmtree(stale, ignore_errors=True)
    if directory.exists():
        if not directory.is_dir():
            raise CheckpointError(f"save_module: {str(directory)!r} exists and is not a folder")
        other = sorted(p.name for p in directory.iterdir() if p.name not in files
                       and not (p.name.startswith(".") and p.name.endswith(".tmp")))
        if other:
            raise CheckpointError(
                f"save_module: {str(directory)!r} holds other entries {other[:5]}; the saved "
                f"pair replaces the folder as a whole: save into a new or empty folder")
    tag = secrets.token_hex(4)
    tmp = parent / f".{name}.saving-{tag}"
    tmp.mkdir()  # mkdir, not mkdtemp: the umask applies
    try:
        for fname, data in files.items():
            atomic_write_bytes(tmp / fname, data)
        if not directory.exists():
            os.replace(tmp, directory)
            return
        old = parent / f".{name}.saving-{tag}-old"
        os.replace(directory, old)
        try:
            os.replace(tmp, directory)
        except BaseException:
            os.replace(old, directory)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_safetensors(
    path: str | os.PathLike[str], *, device: torch.device | str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file.

    Returns:
        ``(tensors, metadata)``, tensors on ``device`` (default CPU).

    Raises:
        CheckpointError: the file does not exist or is not a valid safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from exc
    if device is not None:
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, dict(header.get("__metadata__") or {})


def check_state_dict(
    module: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True, source: str = ""
) -> None:
    """Check that ``state`` fits ``module``: same keys (if ``strict``) and the same shapes.

    Raises:
        CheckpointError: listing the missing keys, the unexpected keys (both only if ``strict``),
            every shape mismatch as ``name: checkpoint (..) vs module (..)`` and every tensor
            whose dtype is integer where the module's is floating point (or the reverse).
    """
    expected = module.state_dict()
    problems = []
    if strict:
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs module {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if shapes:
        problems.append("shape mismatches [" + "; ".join(shapes) + "]")
    kinds = [
        f"{k}: checkpoint {str(state[k].dtype).removeprefix('torch.')} vs module "
        f"{str(expected[k].dtype).removeprefix('torch.')}"
        for k in sorted(set(expected) & set(state))
        if state[k].is_floating_point() != expected[k].is_floating_point()
        or state[k].is_complex() != expected[k].is_complex()
    ]
    if kinds:
        problems.append("dtype mismatches (floating point vs integer) [" + "; ".join(kinds) + "]")
    if problems:
        where = f"{source}: " if source else ""
        raise CheckpointError(
            f"{where}checkpoint does not fit {type(module).__name__}: " + ", ".join(problems)
        )


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"config file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON (UTF-8): {exc}") from exc
    if not isinstance(data, dict) or "kind" not in data:
        raise CheckpointError(f"{str(path)!r} has no 'kind'; not a slime-adapters config")
    return data


def load_module(
    directory: str | os.PathLike[str],
    cls: type[nn.Module] | None = None,
    *,
    strict: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build a module from ``directory``'s config and load its weights (in their saved dtype,
    or cast to ``dtype``), on ``device``.

    With ``strict=False`` missing tensors keep their initial values and unexpected ones are
    ignored; shape mismatches raise either way.

    Returns:
        The module, in training mode as any freshly built module.

    Raises:
        CheckpointError: missing directory or files, invalid JSON, an unknown ``kind`` with no
            ``cls``, a ``cls`` of another kind, a corrupt weights file, weights and config from
            different saves, or weights that do not fit (see :func:`check_state_dict`).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    data = _read_config(directory)
    kind = data["kind"]
    if cls is None:
        if _lookup(kind) is None:
            raise CheckpointError(
                f"{str(directory)!r}: no module registered for kind {kind!r} (registered: "
                f"{sorted(_REGISTRY)}); pass cls= or call register_module"
            )
        cls = _REGISTRY[kind]
    config_class = getattr(cls, "config_class", None)
    if getattr(config_class, "kind", None) != kind:
        raise CheckpointError(
            f"{str(directory)!r}: config is of kind {kind!r} but {getattr(cls, '__name__', cls)} "
            f"expects {getattr(config_class, 'kind', None)!r}"
        )
    try:
        config = config_class.from_dict(data)
    except ConfigError as exc:
        raise CheckpointError(f"{str(directory / CONFIG_NAME)!r}: {exc}") from exc
    weights_path = directory / WEIGHTS_NAME
    state, metadata = read_safetensors(weights_path, device=device)
    saved = metadata.get(_META_KEY)
    if saved is not None:
        # Compare parsed configs, so a key added by hand (or by a newer version) to config.json
        # warns once instead of reading as a mismatch.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnknownConfigKeyWarning)
            try:
                saved_config = config_class.from_dict(json.loads(saved))
            except (ConfigError, json.JSONDecodeError) as exc:
                raise CheckpointError(
                    f"{str(weights_path)!r}: unreadable config metadata: {exc}"
                ) from exc
        if saved_config != config:
            raise CheckpointError(
                f"{str(directory)!r}: {CONFIG_NAME} and {WEIGHTS_NAME} come from different saves "
                f"({CONFIG_NAME}: {config}; {WEIGHTS_NAME}: {saved_config})"
            )
    module = cls.from_config(config, device=device)
    check_state_dict(module, state, strict=strict, source=str(weights_path))
    # assign=True keeps the saved dtype (a float64 save stays float64, bit for bit).
    module.load_state_dict(state, strict=strict, assign=True)
    if dtype is not None:
        module.to(dtype=dtype)
    return module
