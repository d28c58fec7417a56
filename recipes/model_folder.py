"""The folder of a saved SliME model: ``slime.json`` checks, atomic folder replacement, quiet loads.

:meth:`recipes.model.SliMEForCausalLM.save_pretrained` writes a folder (layout in
:mod:`recipes.model`) into a temporary sibling and renames it into place with
:func:`replace_folder`; :func:`read_slime_json` reads and checks its description file.

Shapes: none.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from recipes.model_config import matches_types, type_names

__all__ = ["FORMAT", "FORMAT_VERSION", "SLIME_JSON", "fresh_sibling", "load_complete",
           "quiet_transformers", "read_slime_json", "replace_folder"]

FORMAT = "slime-adapters/full-model"
FORMAT_VERSION = 1
SLIME_JSON = "slime.json"

# slime.json keys -> accepted types (bool is checked apart from int)
_META_TYPES: dict[str, tuple[type, ...]] = {
    "format": (str,), "format_version": (int,), "image_token_id": (int,),
    "separator_token_id": (int, type(None)), "feature_layer": (int,), "drop_cls": (bool,),
    "vision_class": (str,), "llm_class": (str,), "lora": (bool,), "tokenizer": (bool,),
    "config": (dict, type(None)), "extra": (dict,),
}


def read_slime_json(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check the ``slime.json`` of a folder written by
    :meth:`SliMEForCausalLM.save_pretrained`.

    Returns:
        Its content as a dict (``config``: the build config or ``None``; ``extra``: a dict).

    Raises:
        FileNotFoundError: the folder or its ``slime.json`` does not exist.
        ValueError: invalid JSON, another format, a newer format version, or a missing or
            mistyped key (named).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model folder {str(directory)!r} does not exist")
    path = directory / SLIME_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: {str(directory)!r} is not a folder "
                                "written by SliMEForCausalLM.save_pretrained")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{str(path)!r}: format is {got!r}, expected {FORMAT!r}")
    for key, types in _META_TYPES.items():
        if key not in meta:
            raise ValueError(f"{str(path)!r}: missing key {key!r}")
        value = meta[key]
        if not matches_types(value, types):
            raise ValueError(f"{str(path)!r}: {key} must be {type_names(types)}, got {value!r}")
    if meta["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{str(path)!r}: format_version {meta['format_version']} is newer than "
                         f"this version reads ({FORMAT_VERSION}); upgrade slime-adapters")
    return meta


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
