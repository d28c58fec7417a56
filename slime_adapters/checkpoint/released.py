"""Import and export the released SliME weights (github yfzhang114/SliME, SPEC §1).

Public home: :mod:`slime_adapters.checkpoint` (re-exported there); the layout's names and
readers are in :mod:`slime_adapters.checkpoint.released_layout`.

Legend and released layout (``v`` vision width, ``l`` LLM width, ``n`` projector queries (576),
``m`` compressor queries (144); names under ``model.mm_projector.`` and
``model.sampler.post_qformer.``)::

    mm_projector.w_gate, w_noise              (v, 2)      -> projector.w_gate, w_noise
    mm_projector.mean, std                    (1,)        -> projector.mean, std (buffers)
    mm_projector.projection.{0,2}.*           (l, v), (l, l) and (l,)  -> projector.mlp.{0,2}.*
    mm_projector.attn.<resampler>             the query expert          -> projector.query_expert.*
    sampler.post_qformer.<resampler>          the tile compressor       -> compressor.*

    <resampler>: query, pos_embed (q, v); ln_q, ln_kv, ln_post .{weight,bias} (v,);
                 attn.in_proj_weight (3v, v), attn.in_proj_bias (3v,)  -> {q,k,v}_proj (rows split
                 in that order, as nn.MultiheadAttention packs them);
                 attn.out_proj.{weight,bias}                           -> out_proj.*;
                 kv_proj.weight, proj.{weight,bias}: nn.Linear in the released code (never a raw
                 ``x @ proj`` matrix), so they copy without a transpose; the released models have
                 neither (kv_dim equals the width, no post projection).

Keys may carry ``model.mm_projector.``, ``mm_projector.`` or no prefix (then the file name or
``part=`` says which module they belong to). Widths, query counts and the optional
``kv_proj``/``proj`` come from the shapes; heads cannot, so ``num_heads`` defaults to the released
rule ``max(1, v // 128)``. The released trainer saves parameters only, so ``mean``/``std`` (which
take no part in any output) may be absent and then get their released values 0 and 1.
Torch pickles are opened with ``weights_only=True`` only; a full-model safetensors file is read
key by key, so only the adapter tensors are ever loaded.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as st_save
from torch import Tensor, nn

from slime_adapters.checkpoint.modules import CheckpointError
from slime_adapters.checkpoint.released_layout import (
    KNOWN_KEYS,
    NAMESPACES,
    PARTS,
    PROJECTOR_DEFAULTS,
    PROJECTOR_FILE,
    REQUIRED_KEYS,
    SAMPLER_FILE,
    classify_key,
    read_sources,
    shape_dim,
    to_ours,
    to_released,
)
from slime_adapters.adapter import SliMEVisualAdapter
from slime_adapters.adapter_config import SliMEVisualAdapterConfig, preset_switches
from slime_adapters.compressor import QueryCompressor, QueryCompressorConfig
from slime_adapters.config import atomic_write_bytes
from slime_adapters.projector import NoisyMoEProjector, NoisyMoEProjectorConfig
from slime_adapters.router import CosineTokenRouterConfig

__all__ = ["ReleasedWeights", "export_released", "import_released", "save_released"]


def _build(part: str, state: dict[str, Tensor], where: str, num_heads: int | None) -> nn.Module:
    """A meta-device module whose configuration the shapes imply, with the released behaviour
    (:func:`~slime_adapters.adapter_config.preset_switches` of ``"released"``)."""
    try:
        if part == "projector":
            w1 = state["projection.0.weight"]
            cfg = NoisyMoEProjectorConfig(
                in_dim=shape_dim(w1, 1, "mm_projector.projection.0.weight", where),
                out_dim=shape_dim(w1, 0, "mm_projector.projection.0.weight", where),
                num_tokens=shape_dim(state["attn.query"], 0, "mm_projector.attn.query", where),
                num_heads=num_heads, **preset_switches("released")["projector"])
            return NoisyMoEProjector.from_config(cfg, device="meta")
        query = state["query"]
        kv, proj = state.get("kv_proj.weight"), state.get("proj.weight")
        cfg = QueryCompressorConfig(
            dim=shape_dim(query, 1, "sampler.post_qformer.query", where),
            num_queries=shape_dim(query, 0, "sampler.post_qformer.query", where),
            num_heads=num_heads,
            kv_dim=None if kv is None else shape_dim(kv, 1, "sampler...kv_proj.weight", where),
            out_dim=None if proj is None else shape_dim(proj, 0, "sampler...proj.weight", where),
            **preset_switches("released")["compressor"])
        return QueryCompressor.from_config(cfg, device="meta")
    except CheckpointError:
        raise
    except ValueError as exc:
        raise CheckpointError(f"{where}: the {part} shapes give no valid module: {exc}") from exc


def _import_part(part: str, entries: dict[str, tuple[Tensor, str, str]], *, strict: bool,
                 num_heads: int | None, dtype: torch.dtype | None, device) -> nn.Module:
    """Check ``entries`` (plain name -> (tensor, key, file)) and build the module from them."""
    where = " + ".join(sorted({label for _, _, label in entries.values()}))
    ns = "model." + NAMESPACES[part]
    state = {name: t for name, (t, _, _) in entries.items()}
    missing = sorted(ns + k for k in REQUIRED_KEYS[part] if k not in state)
    unexpected = sorted(key for name, (_, key, _) in entries.items()
                        if name not in KNOWN_KEYS[part])
    problems = ([f"missing keys {missing}"] if missing else []) + (
        [f"unexpected keys {unexpected}"] if unexpected and strict else [])
    if problems:
        raise CheckpointError(f"{where}: not the released SliME {part}: " + ", ".join(problems))
    state = {k: v for k, v in state.items() if k in KNOWN_KEYS[part]}
    module = _build(part, state, where, num_heads)
    work = dtype or state["projection.0.weight" if part == "projector" else "query"].dtype
    fill = {k: torch.full((1,), v) for k, v in PROJECTOR_DEFAULTS.items()} \
        if part == "projector" else {}
    state = {**fill, **state}
    expected = {k: tuple(v.shape) for k, v in to_released(part, module.state_dict()).items()}
    # kv_proj / proj come as a set: a bias without its weight (or the reverse) cannot load
    unpaired = sorted(ns + k for k in set(state) ^ set(expected))
    if unpaired:
        raise CheckpointError(f"{where}: keys without their partner {unpaired}")
    shapes = [f"{ns}{k}: file {tuple(state[k].shape)} vs expected {expected[k]}"
              for k in sorted(state) if tuple(state[k].shape) != expected[k]]
    if shapes:
        raise CheckpointError(f"{where}: shape mismatches [" + "; ".join(shapes) + "]")
    nonfloat = sorted(ns + k for k, v in state.items() if not v.dtype.is_floating_point)
    if nonfloat:
        raise CheckpointError(f"{where}: tensors that are not floating point: {nonfloat}")
    ours = to_ours(part, {k: v.to(device=device or "cpu", dtype=work) for k, v in state.items()})
    # assign=True swaps the meta tensors for the file's, so nothing is allocated twice
    module.load_state_dict(ours, strict=True, assign=True)
    return module


@dataclass
class ReleasedWeights:
    """The modules rebuilt from released weights (each None when the source lacked it).

    ``projector``: :class:`NoisyMoEProjector` with ``mode="reference"``, ``noise="reference"``.
    ``compressor``: :class:`QueryCompressor` with ``mode="reference"``.
    ``sources``: the files (or ``"the state dict"``) read.
    """

    projector: NoisyMoEProjector | None
    compressor: QueryCompressor | None
    sources: tuple[str, ...]

    def adapter(
        self, *, router: CosineTokenRouterConfig | None = None, views: str = "both",
        legacy_softmax: bool = False,
    ) -> SliMEVisualAdapter:
        """A :class:`SliMEVisualAdapter` as released (:meth:`SliMEVisualAdapterConfig.released`):
        these modules' weights (storage shared, not copied), the projector's MLP shared with the
        local path, a ``","``-embedding separator (pass ``separator_embeds`` to ``forward``) and
        the released router (masked sum over the prompt tokens, keep while the cumulative score
        does not exceed γ; ``legacy_softmax=True`` for checkpoints released before Nov 2024).
        ``router`` replaces the whole router config when given.

        Raises:
            CheckpointError: the projector or the compressor was not in the source.
        """

        absent = [n for n, m in (("projector (mm_projector)", self.projector),
                                 ("compressor (sampler.post_qformer)", self.compressor))
                  if m is None]
        if absent:
            raise CheckpointError(f"ReleasedWeights.adapter needs both modules; "
                                  f"{', '.join(absent)} missing from {list(self.sources)}")
        config = SliMEVisualAdapterConfig.released(
            legacy_softmax=legacy_softmax, projector=self.projector.config,
            compressor=self.compressor.config, views=views)
        if router is not None:
            config = config.replace(router=router)
        adapter = SliMEVisualAdapter.from_config(config, device="meta")
        state = {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        state |= {f"compressor.{k}": v for k, v in self.compressor.state_dict().items()}
        adapter.load_state_dict(state, strict=True, assign=True)
        return adapter


def import_released(
    source: str | os.PathLike[str] | Mapping[str, Tensor],
    *,
    part: str | None = None,
    num_heads: int | None = None,
    vision_dim: int | None = None,
    llm_dim: int | None = None,
    strict: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> ReleasedWeights:
    """Rebuild the released projector and/or compressor from their weights.

    Args:
        source: ``mm_projector.bin`` / ``sampler.bin`` (torch pickles, read with
            ``weights_only=True``), a directory holding them (or else ``*.safetensors``), a
            full-model ``.safetensors`` file, or a state dict.
        part: ``"projector"`` or ``"sampler"`` for unprefixed keys whose file name does not say
            (guessed from the names when None).
        num_heads: attention heads of both resamplers (shapes cannot tell); None gives the
            released ``max(1, vision_dim // 128)``.
        vision_dim, llm_dim: when given, checked against the widths the shapes imply.
        strict: unexpected keys inside the adapter namespaces (and, in a ``.bin`` file, any key
            the adapter does not own) raise; with False they are ignored. Keys of other model
            parts in a full-model file or state dict are always ignored.
        dtype: cast to this dtype; None keeps the source's (that of ``projection.0.weight`` /
            ``query``; other floating tensors, e.g. a float16 ``pos_embed`` in a bfloat16
            file, are cast to it).
        device: where the modules live (default CPU).

    Returns:
        :class:`ReleasedWeights`, modules in training mode as freshly built ones (call
        ``.eval()`` for inference: the reference gate adds noise in training).

    Raises:
        CheckpointError: a missing, empty, corrupt or non-weights file; a pickle that needs
            arbitrary code; no SliME tensors at all; missing or (``strict``) unexpected keys;
            a key given twice; shape mismatches or a width other than ``vision_dim``/``llm_dim``.
        ValueError: an unknown ``part``; ``num_heads`` not a positive int.
    """
    if part is not None and part not in PARTS:
        raise ValueError(f"part must be None or one of {PARTS}, got {part!r}")
    if num_heads is not None and (isinstance(num_heads, bool) or not isinstance(num_heads, int)
                                  or num_heads < 1):
        raise ValueError(f"num_heads must be None or a positive int, got {num_heads!r}")
    entries: dict[str, dict[str, tuple[Tensor, str, str]]] = {p: {} for p in PARTS}
    foreign: list[tuple[str, str]] = []
    labels = []
    for label, state, default, full_model in read_sources(source, part):
        labels.append(label)
        for key, tensor in state.items():
            p, name = classify_key(key, default)
            if p is None:
                if not full_model:
                    foreign.append((label, key))
                continue
            if name in entries[p]:
                raise CheckpointError(f"{key!r} is given twice ({entries[p][name][2]} and {label})")
            entries[p][name] = (tensor, key, label)
    if foreign and strict:
        raise CheckpointError(f"{' + '.join(sorted({lb for lb, _ in foreign}))}: unexpected keys "
                              f"{sorted(k for _, k in foreign)} (not the released SliME adapter)")
    if not any(entries.values()):
        raise CheckpointError(
            f"{' + '.join(labels)}: no released SliME weights (no model.mm_projector.* or "
            "model.sampler.post_qformer.* keys, nor bare keys of one of them)")
    built = {p: _import_part(p, entries[p], strict=strict, num_heads=num_heads, dtype=dtype,
                             device=device) if entries[p] else None for p in PARTS}
    proj, comp = built["projector"], built["sampler"]
    widths = {"vision_dim": [(proj, "in_dim"), (comp, "kv_dim")], "llm_dim": [(proj, "out_dim")]}
    for arg, want in (("vision_dim", vision_dim), ("llm_dim", llm_dim)):
        for module, attr in widths[arg]:
            if want is not None and module is not None and getattr(module, attr) != want:
                have = getattr(module, attr)
                raise CheckpointError(f"{' + '.join(labels)}: {arg}={want} but the "
                                      f"{type(module).__name__} weights have {have}")
    return ReleasedWeights(projector=proj, compressor=comp, sources=tuple(labels))


# ------------------------------------------------------------------------------------ writing


def export_released(
    modules: SliMEVisualAdapter | ReleasedWeights | nn.Module, *, prefix: str = "model.",
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """The released state dict (CPU copies, ``dtype`` or the modules' own) of a
    :class:`SliMEVisualAdapter`, a :class:`ReleasedWeights`, a :class:`NoisyMoEProjector` or a
    :class:`QueryCompressor`; keys are ``prefix + "mm_projector." + name`` and
    ``prefix + "sampler.post_qformer." + name``. A projector without ``mean``/``std`` (paper mode)
    gets the released 0 and 1. Exporting a paper-mode module warns: the layout holds its weights,
    but the released code computes a different function with them.

    Raises:
        CheckpointError: something the released layout cannot hold (a separate query-expert or
            local MLP, a learned separator); an unsupported object.
    """

    if isinstance(modules, SliMEVisualAdapter):
        if modules.local_mlp is not None or modules.separator is not None:
            raise CheckpointError(
                "export_released: the released layout has no learned separator and no separate "
                "local MLP (build the adapter with separator='embedding' or 'none' and "
                "local_mlp='shared')")
        parts = {"projector": modules.projector, "sampler": modules.compressor}
    elif isinstance(modules, ReleasedWeights):
        parts = {"projector": modules.projector, "sampler": modules.compressor}
    elif isinstance(modules, NoisyMoEProjector | QueryCompressor):
        parts = {"projector" if isinstance(modules, NoisyMoEProjector) else "sampler": modules}
    else:
        raise CheckpointError(f"export_released: cannot export a {type(modules).__name__}")
    out = {}
    for part, module in ((p, m) for p, m in parts.items() if m is not None):
        if getattr(module, "mode", "reference") != "reference":
            # The released code runs these weights with its own rules (bicubic key positions,
            # normalised gates): a paper-mode module will not compute the same function there.
            warnings.warn(
                f"export_released: the {type(module).__name__} is in mode={module.mode!r}; the "
                "released code (and import_released) run its weights in reference mode, which "
                "gives different outputs", UserWarning, stacklevel=2)
        state = module.state_dict()
        meta = sorted(k for k, v in state.items() if v.is_meta)
        if meta:
            raise CheckpointError(f"export_released: tensors on the meta device have no values: "
                                  f"{meta}")
        if part == "projector":
            like = state["w_gate"]
            state = {**{k: torch.full((1,), v, dtype=like.dtype, device=like.device)
                        for k, v in PROJECTOR_DEFAULTS.items()}, **state}
        released = to_released(part, state)
        lacking = sorted(k for k in REQUIRED_KEYS[part] if k not in released)
        if lacking:
            raise CheckpointError(f"export_released: the {type(module).__name__} has nothing "
                                  f"for the released {lacking} (built with pos_embed='none'?)")
        for name, t in released.items():
            t = t.detach().to("cpu", dtype=dtype or t.dtype, copy=True).contiguous()
            out[f"{prefix}{NAMESPACES[part]}{name}"] = t
    return out


def save_released(
    modules: SliMEVisualAdapter | ReleasedWeights | nn.Module, path: str | os.PathLike[str], *,
    prefix: str = "model.", dtype: torch.dtype | None = None,
) -> Path:
    """Write :func:`export_released` atomically: one ``.safetensors`` or ``.bin`` file (torch
    pickle), or, for any other path, a directory with ``mm_projector.bin`` and ``sampler.bin``
    as released.

    Returns:
        The path written (file or directory).

    Raises:
        CheckpointError: see :func:`export_released`.
    """
    path = Path(path)
    state = export_released(modules, prefix=prefix, dtype=dtype)
    if path.suffix == ".safetensors":
        atomic_write_bytes(path, st_save(state, metadata={"format": "pt"}))
        return path
    if path.suffix == ".bin":
        atomic_write_bytes(path, _pickle_bytes(state))
        return path
    path.mkdir(parents=True, exist_ok=True)
    for part, name in (("projector", PROJECTOR_FILE), ("sampler", SAMPLER_FILE)):
        mine = {k: v for k, v in state.items() if k.startswith(prefix + NAMESPACES[part])}
        if mine:
            atomic_write_bytes(path / name, _pickle_bytes(mine))
    return path


def _pickle_bytes(state: dict[str, Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()
