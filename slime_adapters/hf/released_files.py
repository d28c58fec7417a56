"""Reading a released SliME folder: its ``config.json`` and its weight shards.

Shards are ``*.safetensors`` (``model.safetensors`` or ``model-0000k-of-0000n.safetensors``) or
``pytorch_model*.bin`` torch pickles, opened with ``torch.load(weights_only=True)`` only; an
index file (``*.index.json``) is checked against the shards it names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from slime_adapters.checkpoint import CheckpointError
from slime_adapters.checkpoint.released_layout import read_sources

__all__ = ["read_weights", "released_config", "weight_files"]


def released_config(folder: Path) -> dict[str, Any]:
    """The folder's ``config.json`` as a dict.

    Raises:
        CheckpointError: no folder, no config, JSON that does not parse or is not an object, or
            a config without the released ``mm_*`` keys.
    """
    if not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} is not a folder")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} does not exist")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(cfg).__name__}, not an object")
    if "mm_vision_tower" not in cfg:
        raise CheckpointError(f"{str(path)!r} is not a released SliME / LLaVA config (no "
                              "mm_vision_tower)")
    return cfg


def weight_files(folder: Path) -> list[Path]:
    """The folder's shards (safetensors preferred over ``.bin``), checked against an index.

    Raises:
        CheckpointError: no shards, or shards an index names that are missing.
    """
    for pattern, index in (("*.safetensors", "model.safetensors.index.json"),
                           ("pytorch_model*.bin", "pytorch_model.bin.index.json")):
        files = sorted(folder.glob(pattern))
        idx = folder / index
        if idx.is_file():
            try:
                names = set(json.loads(idx.read_text(encoding="utf-8"))["weight_map"].values())
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                    AttributeError) as exc:
                raise CheckpointError(f"{str(idx)!r} is not a weights index: {exc}") from exc
            absent = sorted(n for n in names if not (folder / n).is_file())
            if absent:
                raise CheckpointError(f"{str(idx)!r} names shards that are missing: {absent}")
            files = [folder / n for n in sorted(names)]
        if files:
            return files
    raise CheckpointError(f"{str(folder)!r} holds no weights (*.safetensors or "
                          "pytorch_model*.bin)")


def read_weights(folder: Path) -> dict[str, Tensor]:
    """Every tensor of the folder's shards, by key.

    Raises:
        CheckpointError: a damaged shard, a pickle that needs code, or a key in two shards.
    """
    out: dict[str, Tensor] = {}
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            if path.stat().st_size == 0:
                raise CheckpointError(f"{str(path)!r} is empty (0 bytes)")
            try:
                state = load_file(str(path))
            except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                raise CheckpointError(f"{str(path)!r} is not a readable safetensors file "
                                      f"(truncated or corrupt?): {exc}") from exc
        else:
            # the adapter importer's reader: weights_only=True, clear errors
            ((_, state, _, _),) = read_sources(path, "projector")
        twice = sorted(set(state) & set(out))
        if twice:
            raise CheckpointError(f"{str(path)!r}: keys also in another shard: {twice[:5]}")
        out.update(state)
    return out
