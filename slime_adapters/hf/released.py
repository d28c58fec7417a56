"""Released SliME checkpoints (github yfzhang114/SliME) as :class:`SliMEForConditionalGeneration`.

A released folder is a LLaVA-style model folder: ``config.json`` (the LLM's config, model type
``llava_llama`` / ``llava_mistral`` / ..., plus the ``mm_*`` keys) and the weights as safetensors
or ``pytorch_model*.bin`` shards (torch pickles, read with ``weights_only=True`` only), holding::

    model.vision_tower.vision_tower.<CLIPVisionModel keys>   -> model.vision
    model.mm_projector.*, model.sampler.post_qformer.*       -> model.adapter (import_released)
    everything else (model.embed_tokens, model.layers, ...)  -> model.llm (the LLM's own names)

What the folder says becomes the model's config, with the released behaviour:
``SliMEVisualAdapterConfig.released`` (reference modes, sum-pooled cosine router, keep while the
cumulative score does not exceed γ), γ = ``mm_resampler_topp``, the router's temperature =
``mm_resampler_temp``, the separator = ``config.seperator`` (as the released training wrote it)
or else ``tokenizer(",")["input_ids"][-1]`` (as the released training computes it),
``router_text="released"`` (every token but the image placeholder, system prompt included; in
training the answer too), ``mm_vision_select_layer`` / ``mm_vision_select_feature``,
``use_local_only`` / ``use_global_only`` and the released slicing
(:meth:`slime_adapters.AdaptiveSlicer.reference`). The released code marks images with id −200,
outside the vocabulary; here the tokenizer gets an ``<image>`` token, and when its id is outside
the LLM's table one embedding row is added for it (never read: the placeholder is replaced by
visual tokens; generation suppresses it). :func:`export_released_folder` drops that row again and
writes the original keys, tensors and ``config.json`` back.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import Tensor

from slime_adapters.checkpoint import CheckpointError, export_released, import_released
from slime_adapters.checkpoint.released_layout import NAMESPACES
from slime_adapters.config import atomic_write_bytes
from slime_adapters.hf.configuration_slime import SliMEConfig
from slime_adapters.hf.modeling_slime import SliMEForConditionalGeneration
from slime_adapters.hf.released_files import read_weights, released_config
from slime_adapters.router import CosineTokenRouterConfig

__all__ = ["VISION_PREFIX", "export_released_folder", "load_released", "released_settings"]

VISION_PREFIX = "model.vision_tower.vision_tower."
ADAPTER_PREFIXES = tuple("model." + ns for ns in NAMESPACES.values())
# the towers the released models name, for folders that do not hold a local tower
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": {"hidden_size": 1024, "intermediate_size": 4096,
                                          "num_hidden_layers": 24, "num_attention_heads": 16,
                                          "patch_size": 14, "image_size": 336,
                                          "projection_dim": 768},
}
# keys of a released config.json that are LLaVA's, not the LLM's
_LLAVA_KEYS = ("architectures", "_name_or_path", "model_type", "use_mm_proj", "use_local_only",
               "use_global_only", "seperator", "image_aspect_ratio", "image_grid_pinpoints",
               "tokenizer_padding_side", "tokenizer_model_max_length", "tune_mm_mlp_adapter",
               "freeze_mm_mlp_adapter", "transformers_version", "torch_dtype", "dtype")


def released_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """What a released ``config.json`` says about the SliME front end: ``feature_layer``,
    ``drop_cls``, ``views``, ``gamma``, ``temperature``, ``queries`` (or None),
    ``force_expert`` (None for the learned gate), ``separator`` (or None).

    Raises:
        CheckpointError: a setting this model does not reproduce, naming the key.
    """
    def need(key, allowed, default=None):
        value = cfg.get(key, default)
        if value not in allowed:
            raise CheckpointError(f"config.json: {key}={value!r} is not supported; the released "
                                  f"SliME front end needs one of {list(allowed)}")
        return value

    need("mm_projector_type", ("gated",))
    need("mm_resampler_type", ("cosine",))
    need("image_aspect_ratio", ("anyres",))
    need("mm_patch_merge_type", ("spatial",), "flat")
    select = need("mm_vision_select_feature", ("patch", "cls_patch"), "patch")
    if cfg.get("mm_use_im_start_end", False):
        raise CheckpointError("config.json: mm_use_im_start_end=true is not supported (the "
                              "released code raises NotImplementedError for it too)")
    local, glob = bool(cfg.get("use_local_only", False)), bool(cfg.get("use_global_only", False))
    if local and glob:
        raise CheckpointError("config.json: use_local_only and use_global_only are both true")
    out: dict[str, Any] = {"drop_cls": select == "patch",
                           "views": "local" if local else "global" if glob else "both"}
    for key, name in (("mm_vision_select_layer", "feature_layer"),):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(f"config.json: {key} must be an integer, got {value!r}")
        out[name] = value
    for key, name in (("mm_resampler_topp", "gamma"), ("mm_resampler_temp", "temperature")):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CheckpointError(f"config.json: {key} must be a number, got {value!r}")
        out[name] = float(value)
    out["queries"] = cfg.get("mm_resampler_dim")
    gated = cfg.get("mm_learnable_gated", -1)
    out["force_expert"] = gated if isinstance(gated, int) and gated >= 0 else None
    out["separator"] = cfg.get("seperator")
    return out


def _vision_config(cfg: dict[str, Any], folder: Path, vision_tower):
    from transformers import AutoConfig, CLIPVisionConfig

    if vision_tower is not None:
        if isinstance(vision_tower, str | os.PathLike):
            c = AutoConfig.from_pretrained(vision_tower)
            return getattr(c, "vision_config", c)
        return vision_tower
    name = cfg.get("mm_vision_tower")
    if not isinstance(name, str):
        raise CheckpointError("config.json: mm_vision_tower is missing")
    for where in (Path(name), folder / name):
        if (where / "config.json").is_file():
            c = AutoConfig.from_pretrained(where)
            return getattr(c, "vision_config", c)
    if name in KNOWN_TOWERS:
        return CLIPVisionConfig(**KNOWN_TOWERS[name])
    raise CheckpointError(f"config.json: mm_vision_tower {name!r} is neither a local folder nor a "
                          f"known tower ({sorted(KNOWN_TOWERS)}); pass vision_tower= (a folder or "
                          "a vision config)")


def _text_config(cfg: dict[str, Any]):
    from transformers import AutoConfig

    model_type = str(cfg.get("model_type", ""))
    base = model_type.removeprefix("llava_")
    if base == model_type:
        raise CheckpointError(f"config.json: model_type {model_type!r} is not a released LLaVA / "
                              "SliME type (llava_llama, llava_mistral, ...)")
    rest = {k: v for k, v in cfg.items() if not k.startswith("mm_") and k not in _LLAVA_KEYS}
    try:
        return AutoConfig.for_model(base, **rest)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"config.json: no LLM config for model_type {base!r}: {exc}") from exc


def load_released(folder: str | os.PathLike[str], *, tokenizer=None, vision_tower=None,
                  legacy_softmax: bool = False, num_heads: int | None = None,
                  template: str | None = "vicuna-v1"):
    """``(model, processor)`` for a released SliME folder (see the module docstring).

    Args:
        tokenizer: the tokenizer (default ``AutoTokenizer.from_pretrained(folder)``).
        vision_tower: the encoder's config or folder when ``mm_vision_tower`` names neither a
            local folder nor a known tower.
        legacy_softmax: True for checkpoints released before Nov 2024.
        num_heads: the resamplers' heads (default the released ``max(1, width // 128)``).
        template: the processor's chat format.

    Raises:
        CheckpointError: a missing or damaged file, an unsupported setting, weights the model
            lacks or that the model has and the files lack.
    """
    from transformers import AutoModelForCausalLM, AutoModel, AutoTokenizer

    from slime_adapters.hf.processing_slime import SliMEImageProcessor, SliMEProcessor

    folder = Path(folder)
    cfg = released_config(folder)
    settings = released_settings(cfg)
    vcfg, tcfg = _vision_config(cfg, folder, vision_tower), _text_config(cfg)
    weights = read_weights(folder)
    adapter_w = {k: v for k, v in weights.items() if k.startswith(ADAPTER_PREFIXES)}
    vision_w = {k[len(VISION_PREFIX):]: v for k, v in weights.items()
                if k.startswith(VISION_PREFIX)}
    llm_w = {k: v for k, v in weights.items() if not k.startswith(
        ADAPTER_PREFIXES + (VISION_PREFIX, "model.sampler."))}
    released = import_released(adapter_w, num_heads=num_heads, vision_dim=vcfg.hidden_size,
                               llm_dim=tcfg.hidden_size)
    if settings["queries"] is not None and released.compressor is not None and \
            released.compressor.num_queries != settings["queries"]:
        raise CheckpointError(f"config.json: mm_resampler_dim={settings['queries']} but "
                              f"sampler.post_qformer.query has {released.compressor.num_queries} "
                              "rows")
    router = CosineTokenRouterConfig(**_released_router(settings, legacy_softmax))
    adapter = released.adapter(router=router, views=settings["views"],
                               legacy_softmax=legacy_softmax)
    if settings["force_expert"] is not None:
        adapter.projector.force_expert = settings["force_expert"]
    vision = AutoModel.from_config(vcfg)
    if vision_w:
        _load(vision, vision_w, f"{folder}: the vision tower ({VISION_PREFIX}*)")
    elif vision_tower is not None and isinstance(vision_tower, str | os.PathLike):
        vision = type(vision).from_pretrained(vision_tower)
    else:
        raise CheckpointError(f"{folder}: the weights hold no vision tower ({VISION_PREFIX}*); "
                              "pass vision_tower= (its folder)")
    llm = AutoModelForCausalLM.from_config(tcfg)
    _load(llm, llm_w, f"{folder}: the LLM")
    tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(folder)
    separator = settings["separator"]
    if separator is None:
        separator = tok(",")["input_ids"][-1]  # the released training's rule
    if "<image>" not in tok.get_vocab():
        tok.add_tokens(["<image>"], special_tokens=True)
    image_id = tok.convert_tokens_to_ids("<image>")
    rows = llm.get_input_embeddings().num_embeddings
    if image_id >= rows:
        llm.resize_token_embeddings(image_id + 1, mean_resizing=False)
        with torch.no_grad():  # the placeholder's rows are never read; zero, not random
            llm.get_input_embeddings().weight[rows:] = 0
            if llm.get_output_embeddings() is not None:
                llm.get_output_embeddings().weight[rows:] = 0
    tcfg = llm.config
    config = SliMEConfig(
        vision_config=vcfg, text_config=tcfg, adapter_config=adapter.config.to_dict(),
        image_token_id=image_id, separator_token_id=int(separator),
        feature_layer=settings["feature_layer"], drop_cls=settings["drop_cls"],
        router_text="released",
        slicer_config={"policy": "reference", "global_view": "resize", "fill": [0, 0, 0],
                       "alpha": "drop"},
        released_config=copy.deepcopy(cfg), released_vocab_size=rows)
    model = SliMEForConditionalGeneration(config, vision=vision, llm=llm, adapter=adapter)
    model.generation_config.suppress_tokens = [image_id] if image_id >= rows else None
    model.eval()
    image_processor = SliMEImageProcessor(**{k: v for k, v in config.slicer_config.items()})
    processor = SliMEProcessor(image_processor=image_processor, tokenizer=tok, template=template)
    return model, processor


def _released_router(settings: dict[str, Any], legacy_softmax: bool) -> dict[str, Any]:
    return {"gamma": settings["gamma"], "temperature": settings["temperature"],
            "text_pool": "sum", "crossing": "exceed", "legacy_softmax": legacy_softmax,
            "noise_std": 0.1, "min_keep": 1}


def _load(module: torch.nn.Module, state: dict[str, Tensor], where: str) -> None:
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state and not _tied(module, k))
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in state.items() if k in own and v.shape != own[k].shape)
    problems = ([f"missing keys {missing}"] if missing else []) + (
        [f"unexpected keys {unexpected}"] if unexpected else []) + (
        [f"shape mismatches {shapes}"] if shapes else [])
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))
    module.load_state_dict(state, strict=False)


def _tied(module: torch.nn.Module, key: str) -> bool:
    out = getattr(module, "get_output_embeddings", lambda: None)()
    return (key == "lm_head.weight" and out is not None
            and out.weight is module.get_input_embeddings().weight)


def export_released_folder(model: SliMEForConditionalGeneration,
                           folder: str | os.PathLike[str]) -> Path:
    """Write ``model`` as a released SliME folder: ``config.json`` (the released one it was
    loaded from) and ``model.safetensors`` with the released names, the image row that
    :func:`load_released` added dropped (written atomically, file by file).

    Raises:
        CheckpointError: the model was not loaded from a released folder (no released config).
    """
    cfg = getattr(model.config, "released_config", None)
    if not isinstance(cfg, dict):
        raise CheckpointError("export_released_folder: the model's config has no released_config "
                              "(only models from load_released can be written back)")
    rows = int(model.config.released_vocab_size)
    state = {VISION_PREFIX + k: v for k, v in model.vision.state_dict().items()}
    tables = {model.llm.get_input_embeddings().weight.data_ptr()}
    if model.llm.get_output_embeddings() is not None:
        tables.add(model.llm.get_output_embeddings().weight.data_ptr())
    for k, v in model.llm.state_dict().items():
        state[k] = v[:rows] if v.data_ptr() in tables and v.dim() == 2 else v
    if _tied(model.llm, "lm_head.weight"):
        state.pop("lm_head.weight", None)
    state |= export_released(model.adapter)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "model.safetensors", st_save(state, metadata={"format": "pt"}))
    atomic_write_bytes(folder / "config.json", (json.dumps(cfg, indent=2) + "\n").encode())
    return folder
