"""The released SliME weights' layout (github yfzhang114/SliME): names, files and readers.

Used by :mod:`slime_adapters.checkpoint.released` (the importer and exporter), whose docstring
tables the released names against this library's. Keys may carry ``model.mm_projector.``,
``mm_projector.`` or no prefix; torch pickles are opened with ``weights_only=True`` only, and a
full-model safetensors file is read key by key.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from slime_adapters.checkpoint.modules import CheckpointError

__all__ = [
    "KNOWN_KEYS",
    "NAMESPACES",
    "PARTS",
    "PROJECTOR_DEFAULTS",
    "PROJECTOR_FILE",
    "REQUIRED_KEYS",
    "SAMPLER_FILE",
    "classify_key",
    "read_sources",
    "shape_dim",
    "to_ours",
    "to_released",
]

PROJECTOR_FILE = "mm_projector.bin"
SAMPLER_FILE = "sampler.bin"
PARTS = ("projector", "sampler")
NAMESPACES = {"projector": "mm_projector.", "sampler": "sampler.post_qformer."}
_RESAMPLER_PLAIN = ("query", "pos_embed", "ln_q.weight", "ln_q.bias", "ln_kv.weight",
                    "ln_kv.bias", "ln_post.weight", "ln_post.bias", "attn.out_proj.weight",
                    "attn.out_proj.bias")
_RESAMPLER_PACKED = ("attn.in_proj_weight", "attn.in_proj_bias")
_RESAMPLER_OPTIONAL = ("kv_proj.weight", "proj.weight", "proj.bias")
_PROJECTOR_PLAIN = ("w_gate", "w_noise", "projection.0.weight", "projection.0.bias",
                    "projection.2.weight", "projection.2.bias")
PROJECTOR_DEFAULTS = {"mean": 0.0, "std": 1.0}
REQUIRED_KEYS = {"projector": _PROJECTOR_PLAIN + tuple("attn." + k for k in _RESAMPLER_PLAIN
                                                   + _RESAMPLER_PACKED),
             "sampler": _RESAMPLER_PLAIN + _RESAMPLER_PACKED}
# the released GatedBlock's resampler has no kv_proj / proj (kv_dim = width, no post projection)
KNOWN_KEYS = {"projector": REQUIRED_KEYS["projector"] + tuple(PROJECTOR_DEFAULTS),
          "sampler": REQUIRED_KEYS["sampler"] + _RESAMPLER_OPTIONAL}


# ------------------------------------------------------------------------------- name mapping


def _ours(part: str, name: str) -> str:
    """Our name (inside the projector or the compressor) for a plain released name."""
    if part == "projector":
        if name.startswith("projection."):
            return "mlp." + name[len("projection."):]
        if name.startswith("attn."):
            return "query_expert." + _ours("sampler", name[len("attn."):])
        return name
    return name[len("attn."):] if name.startswith("attn.out_proj.") else name


def to_ours(part: str, released: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    packed_prefix = "attn." if part == "projector" else ""
    inner = "query_expert." if part == "projector" else ""
    for name, t in released.items():
        if name.removeprefix(packed_prefix) in _RESAMPLER_PACKED:
            kind = "weight" if name.endswith("weight") else "bias"
            # nn.MultiheadAttention packs the q, k and v projections as consecutive row blocks
            for proj, chunk in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0), strict=True):
                out[f"{inner}{proj}.{kind}"] = chunk.clone()
        else:
            out[_ours(part, name)] = t
    return out


def to_released(part: str, ours: Mapping[str, Tensor]) -> dict[str, Tensor]:
    back = {_ours(part, n): n for n in KNOWN_KEYS[part]}
    inner = "query_expert." if part == "projector" else ""
    packed = "attn.attn." if part == "projector" else "attn."
    out = {}
    for kind in ("weight", "bias"):
        out[f"{packed}in_proj_{kind}"] = torch.cat(
            [ours[f"{inner}{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")])
    for name, t in ours.items():
        if name in back:
            out[back[name]] = t
        elif not any(name == f"{inner}{p}.{k}" for p in ("q_proj", "k_proj", "v_proj")
                     for k in ("weight", "bias")):
            raise CheckpointError(
                f"export_released: {name!r} has no place in the released layout "
                f"({'a separate query-expert MLP' if 'query_mlp' in name else 'unknown tensor'})"
            )
    return out


# ------------------------------------------------------------------------------------ reading


def classify_key(key: str, default_part: str | None) -> tuple[str | None, str]:
    """``(part, plain name)``; part None marks a key of another model part."""
    name = key.removeprefix("model.")
    for part, ns in NAMESPACES.items():
        if name.startswith(ns):
            return part, name[len(ns):]
    if name.startswith("sampler.") or key != name:
        return None, key
    return default_part, key


def _guess_part(keys: list[str]) -> str | None:
    if any(k in ("w_gate", "w_noise") or k.startswith(("projection.", "attn.attn.")) for k in keys):
        return "projector"
    if "query" in keys or "attn.in_proj_weight" in keys:
        return "sampler"
    return None


def _load_pickle(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{str(path)!r} was refused by torch.load(weights_only=True): it needs arbitrary code "
            f"to unpickle or is not a weights file; it is never opened otherwise ({exc})"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - the restricted unpickler ran no code; a text or
        # damaged file fails in many ways (RuntimeError, EOFError, BadZipFile, KeyError, ...)
        raise CheckpointError(
            f"{str(path)!r} is not a readable torch weights file (truncated or corrupt?): {exc}"
        ) from exc
    return _as_state(obj, repr(str(path)))


def _as_state(obj: object, where: str) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a state dict")
    bad = sorted(str(k) for k, v in obj.items() if not (isinstance(k, str)
                                                           and isinstance(v, Tensor)))
    if bad:
        raise CheckpointError(f"{where}: entries that are not name -> tensor: {bad}")
    return dict(obj)


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            wanted = [k for k in fh.keys() if classify_key(k, None)[0] is not None]
            return {k: fh.get_tensor(k) for k in wanted}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from exc


def read_sources(source, part: str | None) -> list[tuple[str, dict[str, Tensor], str | None, bool]]:
    """``[(label, tensors, default part for bare keys, full-model?)]``."""
    if isinstance(source, Mapping):
        state = _as_state(source, "the state dict")
        return [("the state dict", state, part or _guess_part(list(state)), True)]
    if not isinstance(source, str | os.PathLike):
        raise CheckpointError(f"source must be a path or a state dict, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        found = [path / f for f in (PROJECTOR_FILE, SAMPLER_FILE) if (path / f).is_file()]
        found = found or sorted(path.glob("*.safetensors"))
        if not found:
            raise CheckpointError(
                f"{str(path)!r} holds neither {PROJECTOR_FILE}, {SAMPLER_FILE} nor *.safetensors")
        return [entry for f in found for entry in read_sources(f, part)]
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{str(path)!r} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        return [(str(path), _load_safetensors(path), part, True)]
    state = _load_pickle(path)
    by_name = {PROJECTOR_FILE: "projector", SAMPLER_FILE: "sampler"}.get(path.name)
    return [(str(path), state, part or by_name or _guess_part(list(state)), False)]


def shape_dim(t: Tensor, axis: int, key: str, where: str) -> int:
    if t.dim() != 2:
        raise CheckpointError(f"{where}: {key} must be a matrix, got shape {tuple(t.shape)}")
    return int(t.shape[axis])
