"""A saved SliME model folder (a standard Hugging Face ``save_pretrained`` folder): written
atomically, checked file by file before anything is built, loaded quietly.

A folder holds ``config.json`` (:class:`slime_adapters.hf.SliMEConfig`: the encoder's and the
LLM's configs, the adapter's, the slicer, the training stage), ``generation_config.json``, the
weights (``model.safetensors`` or shards with ``model.safetensors.index.json``; LoRA weights are
merged into the LLM's), and the processor (``processor_config.json``: chat format and slicer;
``tokenizer.json`` and ``tokenizer_config.json``). Any transformers user loads it with
``AutoModelForImageTextToText.from_pretrained(folder)`` after ``import slime_adapters.hf``.

:func:`check_model_folder` reads every file the folder must hold (JSON decodes as UTF-8, the
config is a valid SliME config with both sub-configs, every weight file is complete and holds every
weight the model has, the tokenizer's files are there) so that a damaged folder fails with one
message naming the file, before a model is built.

Shapes: none.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import struct
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["check_model_folder", "fresh_sibling", "load_complete", "load_model_folder",
           "quiet_transformers", "replace_folder", "save_model_folder"]

CONFIG = "config.json"
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
JSON_FILES = (CONFIG, "generation_config.json", "processor_config.json", "tokenizer_config.json",
              "tokenizer.json", "special_tokens_map.json", "preprocessor_config.json", INDEX)
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@contextmanager
def quiet_transformers():
    """Silence transformers' load reports and progress bars inside the block (restored after):
    the loaders below check completeness themselves."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_complete(klass, path: str | os.PathLike[str], *, where: str | None = None, **kwargs):
    """``klass.from_pretrained(path, **kwargs)`` with transformers' load report silenced and
    missing weights an error instead of a warning (``where`` prefixes the message).

    Raises:
        ValueError: the folder lacks weights the model has.
    """
    with quiet_transformers():
        model, info = klass.from_pretrained(path, output_loading_info=True, **kwargs)
    if info.get("missing_keys"):
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{str(path)!r} lacks weights for "
                         f"{sorted(info['missing_keys'])}")
    return model


def fresh_sibling(target: Path, tag: str) -> Path:
    """A new empty hidden folder beside ``target`` (made with ``mkdir``, so the umask applies:
    ``tempfile.mkdtemp`` would leave the saved model readable by its owner only)."""
    while True:
        path = target.parent / f".{target.name}.{tag}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def replace_folder(new: Path, target: Path) -> None:
    """Rename the complete folder ``new`` to ``target``; an existing ``target`` is moved aside
    first (a directory cannot be renamed over a non-empty one) and restored if that fails."""
    if not target.exists():
        os.replace(new, target)
        return
    old = fresh_sibling(target, "old")
    os.replace(target, old / "previous")
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / "previous", target)
        raise
    finally:
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------- checks

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not UTF-8 text: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON (truncated?): {exc}") from exc


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file, checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{str(path)!r} is truncated ({size} bytes): not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{str(path)!r} is truncated: its header needs {n} bytes, the file "
                             f"has {size - 8} after the length")
        try:
            table = json.loads(fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{str(path)!r} has a damaged header: {exc}") from exc
    if not isinstance(table, dict):
        raise ValueError(f"{str(path)!r} has a damaged header (not a JSON object)")
    table.pop("__metadata__", None)
    end = max((int(t["data_offsets"][1]) for t in table.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{str(path)!r} is truncated: its tensors need {8 + n + end} bytes, the "
                         f"file has {size}")
    return table


def _weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX
    if index.is_file():
        data = _read_json(index)
        if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
            raise ValueError(f"{str(index)!r} has no weight_map")
        names = sorted(set(data["weight_map"].values()))
    elif (directory / WEIGHTS).is_file():
        names = [WEIGHTS]
    else:
        raise FileNotFoundError(f"{str(directory)!r} holds no weights ({WEIGHTS} or {INDEX})")
    files = [directory / n for n in names]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{str(f)!r} is missing (named by {INDEX})")
    return files


def check_model_folder(directory: str | os.PathLike[str]):
    """Check every file a saved SliME folder must hold, building nothing (the model's weight
    names come from a model made on the meta device).

    Returns:
        The folder's :class:`slime_adapters.hf.SliMEConfig`.

    Raises:
        FileNotFoundError: the folder, its ``config.json``, its weights or a tokenizer file is
            missing (named).
        ValueError: a file that is not UTF-8 JSON, a config that is not a SliME config or holds
            a bad value (named), a truncated weight file, weights of an integer dtype, or
            weights the model has that the files lack (listed).
    """
    import torch

    from slime_adapters.hf import SliMEConfig, SliMEForConditionalGeneration

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model folder {str(directory)!r} does not exist")
    conf_path = directory / CONFIG
    if not conf_path.is_file():
        raise FileNotFoundError(f"{str(conf_path)!r} does not exist: {str(directory)!r} is not "
                                "a saved model folder")
    for name in JSON_FILES:
        if (directory / name).is_file():
            _read_json(directory / name)
    data = _read_json(conf_path)
    if not isinstance(data, dict) or data.get("model_type") != SliMEConfig.model_type:
        got = data.get("model_type") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{str(conf_path)!r}: model_type is {got!r}, not a SliME model "
                         f"({SliMEConfig.model_type!r})")
    for key in ("vision_config", "text_config"):
        sub = data.get(key)
        if not isinstance(sub, dict) or not isinstance(sub.get("model_type"), str):
            raise ValueError(f"{str(conf_path)!r}: {key} is missing or has no model_type (a "
                             "complete folder describes both the encoder and the LLM)")
    try:
        with quiet_transformers():
            config = SliMEConfig.from_dict(data)
            with torch.device("meta"):
                meta = SliMEForConditionalGeneration(config)
            expected = meta.state_dict()
            tied = set(getattr(meta, "all_tied_weights_keys", None) or ())
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{str(conf_path)!r}: {exc}") from exc
    found: dict[str, Any] = {}
    for f in _weight_files(directory):
        for key, info in _safetensors_header(f).items():
            if info.get("dtype") not in _FLOAT_DTYPES:
                raise ValueError(f"{str(f)!r}: weight {key!r} is {info.get('dtype')}, not a "
                                 "floating-point dtype")
            found[key] = info
    names = _model_names(meta, found, expected)
    missing = sorted(k for k in expected if k not in names and k not in tied)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8
                                           else "")
        raise ValueError(f"{str(directory)!r}: the weight files lack {len(missing)} of the "
                         f"model's weights: {shown}")
    if (directory / "tokenizer_config.json").is_file() and not any(
            (directory / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise FileNotFoundError(f"{str(directory / 'tokenizer.json')!r} is missing (the folder "
                                "has tokenizer_config.json but no tokenizer file)")
    return config


def _model_names(meta, found, expected) -> set[str]:
    """The files' keys in the model's naming: transformers renames legacy checkpoint keys while
    it loads (a CLIP encoder's ``vision_model.`` prefix, which a save from a given state dict
    writes back), and the check must see what loading will see."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:  # another transformers: the keys as they are
        return set(found)
    transforms = get_model_conversion_mapping(meta)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return {rename_source_key(k, renamings, converters, meta.base_model_prefix, expected)[0]
            for k in found}


# --------------------------------------------------------------------------------- save / load

def _merged_lora_state(model, state: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict of the model with its peft LoRA layers merged into the LLM's weights
    (``W + scale · B A``) and peft's names turned back into the plain LLM's."""
    from peft.tuners.lora import LoraLayer

    prefix = "llm.base_model.model."
    merged: dict[str, Any] = {}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    for name, layer in layers.items():
        for adapter_name in layer.active_adapters:
            a, b = f"{name}.lora_A.{adapter_name}.weight", f"{name}.lora_B.{adapter_name}.weight"
            base = f"{name}.base_layer.weight"
            if base in state and a in state and b in state:
                w = state[base]
                delta = (state[b].float() @ state[a].float()) * layer.scaling[adapter_name]
                merged[base] = (merged.get(base, w).float() + delta).to(w.dtype)
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        value = merged.get(key, value)
        if key.startswith(prefix):
            key = "llm." + key[len(prefix):]
        out[".".join(p for p in key.split(".") if p != "base_layer")] = value
    return out


def _is_peft(module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # without peft installed no model can be a peft model
        return False
    return isinstance(module, PeftModel)


def save_model_folder(model, directory: str | os.PathLike[str], *, tokenizer=None,
                      extra: Mapping[str, Any] | None = None,
                      state_dict: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (and its processor, made from ``tokenizer``) as a standard folder.

    ``extra`` (what ``recipes/train.py`` knows): ``template`` (the chat format), ``slicer``
    (:class:`slime_adapters.SlicerConfig` keywords), ``stage`` (``Stage.to_dict()``) and
    ``preset``; they go into the config and the processor. ``state_dict``: the whole model's
    tensors to write instead of the module's own (DeepSpeed ZeRO-3 gathers them on rank 0). A
    peft LoRA LLM is saved with its LoRA weights merged in.

    Atomic: everything is written into a temporary sibling folder renamed into place once
    complete; a failure leaves an existing folder untouched.

    Raises:
        ValueError: ``extra`` is not a JSON-ready mapping, or holds slicer keywords the slicer
            refuses.
        OSError: the folder cannot be written.
    """
    from slime_adapters.hf import SliMEImageProcessor, SliMEProcessor

    directory = Path(directory)
    if extra is not None and not isinstance(extra, Mapping):
        raise ValueError(f"extra must be a dict, got {type(extra).__name__}")
    extra = dict(extra or {})
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extra must be JSON-serialisable: {exc}") from exc
    config = model.config
    if extra.get("slicer") is not None:
        config.slicer_config = {**config.slicer_config, **extra["slicer"]}
    if extra.get("stage") is not None:
        config.training_stage = {**extra["stage"], "preset": extra.get("preset")}
    processor = None
    if tokenizer is not None:
        image_processor = SliMEImageProcessor(**config.slicer_config)
        processor = SliMEProcessor(
            image_processor=image_processor, tokenizer=tokenizer,
            template=extra.get("template") or "qa",
            image_token=tokenizer.convert_ids_to_tokens(config.image_token_id))
    if state_dict is None and _is_peft(model.llm):
        state_dict = model.state_dict()
    if state_dict is not None and _is_peft(model.llm):
        state_dict = _merged_lora_state(model, state_dict)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_sibling(directory, "tmp")
    try:
        with quiet_transformers():
            model.save_pretrained(tmp, state_dict=None if state_dict is None
                                  else dict(state_dict))
            if processor is not None:
                processor.save_pretrained(tmp)
        _honour_umask(tmp)
        replace_folder(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return directory


def _honour_umask(folder: Path) -> None:
    """Give every file under ``folder`` the mode ``open()`` would (0666 minus the umask):
    safetensors writes its files 0600 whatever the umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~mask)


def load_model_folder(directory: str | os.PathLike[str], **kwargs):
    """Check (:func:`check_model_folder`) and load a saved folder.

    Returns:
        ``(model, processor)``: the model in eval mode (``kwargs`` go to ``from_pretrained``:
        ``dtype``, ``attn_implementation``, ...), its :class:`SliMEProcessor` (``None`` when the
        folder holds none).

    Raises:
        As :func:`check_model_folder`.
    """
    from slime_adapters.hf import SliMEForConditionalGeneration, SliMEProcessor

    directory = Path(directory)
    check_model_folder(directory)
    model = load_complete(SliMEForConditionalGeneration, directory, **kwargs)
    processor = None
    if (directory / "processor_config.json").is_file():
        with quiet_transformers():
            processor = SliMEProcessor.from_pretrained(directory)
    return model.eval(), processor
