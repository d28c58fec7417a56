"""Build the full SliME model from a plain dict: what a training YAML's ``model:`` section holds.

Schema (every key is checked, by :func:`recipes.model_config.parse_model_config` and then against
the loaded encoder and LLM; an unknown key or a wrong type raises ``ValueError`` naming the dotted
key, e.g. ``model.vision.typo``; a missing folder raises ``FileNotFoundError`` naming it)::

    vision:                  exactly one of path / type
      path: DIR              a saved CLIPVisionModel / SiglipVisionModel, or a full CLIPModel /
                             SiglipModel folder (its vision tower is used)
      type: clip | siglip    random initialisation from ``config`` (the HF vision config's fields)
      config: {...}
    feature_layer: -2        hidden state feeding the adapter
    drop_cls: null           null = true for CLIP (it has a CLS token), false for SigLIP
    llm:                     exactly one of path / type
      path: DIR              AutoModelForCausalLM.from_pretrained(DIR, gguf_file=...)
      gguf_file: null
      type: llama            random initialisation from ``config`` (LlamaConfig fields; vocab_size
      config: {...}          and the pad/bos/eos ids default to the tokenizer's)
    tokenizer:               default {path: <llm.path>, gguf_file: <llm.gguf_file>}
      path: DIR | type: word (recipes.data.build_word_tokenizer)
    adapter: {...}           SliMEVisualAdapterConfig fields; projector.in_dim, projector.out_dim,
                             projector.num_tokens and compressor.dim are filled in from the encoder
                             and the LLM when omitted, and checked when given
    image_token: "<image>"   added to the tokenizer as a special token if missing
    separator_token: ","     added if missing; used when adapter.separator == "embedding"
    lora: null               or {r: 8, alpha: 16, dropout: 0.05, target_modules: [q_proj, v_proj]}
    gradient_checkpointing: false
    init_from: null          a folder written by recipes.model_folder.save_model_folder (a
                             training run's final/): its weights and tokenizer are loaded; the rest
                             of the cfg must agree with the saved one (gradient_checkpointing,
                             dtype and lora may differ: a LoRA model is saved merged, and lora adds
                             new LoRA layers on top)
    dtype: float32           float32 | bfloat16 | float16

The LLM's embeddings are resized when tokens were added; a tokenizer without a pad token gets its
unk (else eos) token as pad. Roles for
:class:`slime_adapters.AlternatingScheduler`: the adapter's own (``adapter.roles()``:
``mlp_expert`` with the learned separator, ``query_expert``, ``gate``, ``compressor`` with the own
local MLP; every adapter parameter in exactly one); ``llm``
(without LoRA: the whole LLM; with LoRA: every LLM parameter but the LoRA ones); ``llm_lora`` (the
LoRA parameters, with LoRA only); ``vision``.

Shapes: none are computed here. The adapter's ``num_tokens`` is the encoder's tokens per view,
``(image_size // patch_size)²`` plus its CLS token unless dropped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recipes.model_config import (
    DTYPES,
    LLM_TYPES,
    TOP,
    VISION_MODEL_TYPES,
    VISION_TYPES,
    existing_folder,
    parse_model_config,
)
from recipes.model_folder import load_complete, load_model_folder, quiet_transformers
from slime_adapters import RoleSpec, SliMEVisualAdapter, SliMEVisualAdapterConfig

__all__ = ["Built", "build_model", "roles_of"]

# keys that may differ from the saved build config under init_from
FREE_KEYS = ("init_from", "gradient_checkpointing", "dtype", "lora")


@dataclasses.dataclass
class Built:
    """What :func:`build_model` returns."""

    model: Any  # slime_adapters.hf.SliMEForConditionalGeneration
    tokenizer: Any
    roles: dict[str, RoleSpec | nn.Module]
    config: dict[str, Any]  # the normalised, JSON-ready cfg (also ``model.config.recipe_config``)


# ------------------------------------------------------------------------------------ building

def _load_vision(spec: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    import transformers

    v = spec["vision"]
    if "type" in v:
        conf_name, model_name, _ = VISION_TYPES[v["type"]]
        conf = getattr(transformers, conf_name)(**v["config"])
        # _from_config resolves the attention implementation as from_pretrained does
        return getattr(transformers, model_name)._from_config(conf).to(dtype)
    where = f"{TOP}.vision.path"
    path = Path(existing_folder(v["path"], where))
    model_type = _model_type(path, where)
    kind = VISION_MODEL_TYPES.get(model_type)
    if kind is None:
        raise ValueError(f"{where}: {str(path)!r} holds a {model_type!r} model; expected one of "
                         f"{sorted(VISION_MODEL_TYPES)} (a full CLIP/SigLIP folder gives its "
                         "vision tower)")
    return load_complete(getattr(transformers, VISION_TYPES[kind][1]), path, where=where,
                         dtype=dtype)


def _model_type(path: Path, where: str) -> str | None:
    conf = path / "config.json"
    if not conf.is_file():
        raise FileNotFoundError(f"{where}: {str(conf)!r} does not exist (not a saved Hugging Face "
                                "model folder)")
    try:
        return json.loads(conf.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{where}: {str(conf)!r} is not a JSON object: {exc}") from exc


def _gguf(folder: str, gguf_file: str | None, where: str) -> dict[str, str]:
    if gguf_file is None:
        return {}
    if not (Path(folder) / gguf_file).is_file():
        raise FileNotFoundError(f"{where}: {str(Path(folder) / gguf_file)!r} does not exist")
    return {"gguf_file": gguf_file}


def _load_tokenizer(spec: dict[str, Any]):
    tok = spec["tokenizer"]
    if tok.get("type") == "word":
        from recipes.data import build_word_tokenizer

        return build_word_tokenizer()
    from transformers import AutoTokenizer

    where = f"{TOP}.tokenizer.path"
    path = existing_folder(tok["path"], where)
    with quiet_transformers():
        return AutoTokenizer.from_pretrained(path, **_gguf(path, tok["gguf_file"],
                                                           f"{TOP}.tokenizer.gguf_file"))


def _separator_kind(spec: dict[str, Any]) -> str:
    return spec["adapter"].get("separator", SliMEVisualAdapterConfig().separator)


def _add_tokens(tokenizer, spec: dict[str, Any]) -> tuple[int, int | None]:
    """Add the image placeholder (special) and, for an embedding separator, the separator token
    when missing; give the tokenizer a pad token (unk, else eos) when it has none.
    Returns their ids."""
    if spec["image_token"] not in tokenizer.get_vocab():
        tokenizer.add_tokens([spec["image_token"]], special_tokens=True)
    sep_id = None
    if _separator_kind(spec) == "embedding":
        if spec["separator_token"] not in tokenizer.get_vocab():
            tokenizer.add_tokens([spec["separator_token"]])
        sep_id = tokenizer.convert_tokens_to_ids(spec["separator_token"])
    if tokenizer.pad_token is None and (tokenizer.unk_token or tokenizer.eos_token):
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(spec["image_token"]), sep_id


def _fill_llm_config(spec: dict[str, Any], tokenizer) -> None:
    """A randomly initialised LLM's vocabulary and special ids default to the tokenizer's."""
    conf = spec["llm"].get("config")
    if conf is None:
        return
    conf.setdefault("vocab_size", len(tokenizer))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, key, None)
        if key not in conf and value is not None:
            conf[key] = value


def _load_llm(spec: dict[str, Any], tokenizer, dtype: torch.dtype) -> nn.Module:
    import transformers

    llm = spec["llm"]
    if "type" in llm:
        conf_name, model_name = LLM_TYPES[llm["type"]]
        model = getattr(transformers, model_name)._from_config(
            getattr(transformers, conf_name)(**llm["config"]))
        model = model.to(dtype)
    else:
        where = f"{TOP}.llm.path"
        path = existing_folder(llm["path"], where)
        gguf = _gguf(path, llm["gguf_file"], f"{TOP}.llm.gguf_file")
        model = load_complete(transformers.AutoModelForCausalLM, path, where=where, dtype=dtype,
                                 **gguf)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model


def _tokens_per_view(vision: nn.Module, drop_cls: bool) -> int:
    conf = vision.config
    has_cls = VISION_TYPES[VISION_MODEL_TYPES[conf.model_type]][2]
    return (conf.image_size // conf.patch_size) ** 2 + int(has_cls) - int(drop_cls)


def _plain(d: Any) -> Any:
    """A config dict without the ``kind``/version bookkeeping, nested configs included."""
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items() if k not in ("kind", "slime_adapters_version")}
    return d


def _normalise(spec: dict[str, Any], vision: nn.Module, llm: nn.Module) -> SliMEVisualAdapterConfig:
    """Resolve ``drop_cls`` and fill in / check the adapter's widths and token count against the
    loaded encoder and LLM (in place). Returns the adapter config."""
    kind = VISION_MODEL_TYPES.get(getattr(vision.config, "model_type", None))
    if kind is None:
        raise ValueError(f"{TOP}.vision: {type(vision).__name__} is not a CLIP or SigLIP encoder")
    if spec["drop_cls"] is None:
        spec["drop_cls"] = VISION_TYPES[kind][2]
    dv, dl = vision.config.hidden_size, llm.get_input_embeddings().embedding_dim
    tokens = _tokens_per_view(vision, spec["drop_cls"])
    a = copy.deepcopy(spec["adapter"])
    proj, comp = a.setdefault("projector", {}), a.setdefault("compressor", {})
    w = f"{TOP}.adapter"
    for key, want, what in (("in_dim", dv, "the vision encoder's width"),
                            ("out_dim", dl, "the LLM's embedding width"),
                            ("num_tokens", tokens, "the encoder's tokens per view")):
        proj.setdefault(key, want)
        if proj[key] != want:
            raise ValueError(f"{w}.projector.{key} is {proj[key]} but {what} is {want}")
    comp.setdefault("dim", dv)
    kv_key = "kv_dim" if comp.get("kv_dim") is not None else "dim"
    if comp[kv_key] != dv:
        raise ValueError(f"{w}.compressor.{kv_key} is {comp[kv_key]} but the compressor reads "
                         f"the vision encoder's tokens, of width {dv}")
    out_key = "out_dim" if comp.get("out_dim") is not None else "dim"
    if comp[out_key] != dv:
        raise ValueError(f"{w}.compressor.{out_key} is {comp[out_key]} but compressed tiles go "
                         f"through the projector's MLP, of input width {dv}")
    try:
        config = SliMEVisualAdapterConfig.from_dict(a)
    except ValueError as exc:
        raise ValueError(f"{w}: {exc}") from exc
    spec["adapter"] = _plain(config.to_dict())
    return config


def _normalisation(spec: dict[str, Any], vision: nn.Module) -> dict[str, Any]:
    """The slicer's mean and std: the encoder folder's own image processor's, else its family's
    (CLIP's or SigLIP's)."""
    from slime_adapters.hf import SliMEImageProcessor

    ip = SliMEImageProcessor.for_encoder(vision.config, spec["vision"].get("path"))
    return {"mean": list(ip.mean), "std": list(ip.std)}


def _base(llm: nn.Module) -> nn.Module:
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def _checkpoint_activations(part: nn.Module) -> None:
    # non-reentrant: frozen blocks still pass gradients on to the trained adapter
    kwargs = {"use_reentrant": False}
    if hasattr(part, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
        part.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        part.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _finish(model, spec: dict[str, Any], add_lora: bool):
    # cast before wrapping: peft keeps new LoRA weights in float32 under a half-precision base
    model.to(DTYPES[spec["dtype"]])
    if add_lora:
        from peft import LoraConfig, get_peft_model

        lora = spec["lora"]
        conf = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                          target_modules=lora["target_modules"], task_type="CAUSAL_LM")
        try:
            model.llm = get_peft_model(model.llm, conf)
        except ValueError as exc:
            raise ValueError(f"{TOP}.lora.target_modules: {exc}") from exc
    if spec["gradient_checkpointing"]:
        for part in (_base(model.llm), model.vision):
            if getattr(part, "supports_gradient_checkpointing", False):
                _checkpoint_activations(part)
    model.config.recipe_config = spec
    return model.train()


def _flatten(d: Any, prefix: str) -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: d}


def _differences(spec: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    skip = set(FREE_KEYS)
    a = _flatten({k: v for k, v in spec.items() if k not in skip}, TOP)
    b = _flatten({k: v for k, v in saved.items() if k not in skip}, TOP)
    return [f"{k}: saved {b.get(k, '<absent>')!r}, cfg {a.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def build_model(cfg: Mapping[str, Any]) -> Built:
    """Build (or, with ``init_from``, load) the full SliME model the ``model:`` dict describes.

    Random initialisations draw from torch's global generator: seed it for a reproducible model.

    Returns:
        :class:`Built`: the model (in training mode, in ``dtype``; with LoRA its ``llm`` is a peft
        model), the tokenizer (image placeholder and separator added, a pad token set), the
        scheduler roles and the normalised config.

    Raises:
        ValueError: an unknown key or a wrong type or value (naming the dotted key), an encoder
            that is not CLIP or SigLIP, adapter widths that contradict the encoder or the LLM, or,
            with ``init_from``, a cfg that differs from the saved one (listing every difference).
        FileNotFoundError: a folder or file the cfg names does not exist.
    """
    spec = parse_model_config(cfg)
    if spec["init_from"] is not None:
        return _build_from_saved(spec)
    dtype = DTYPES[spec["dtype"]]
    vision = _load_vision(spec, dtype)
    tokenizer = _load_tokenizer(spec)
    image_id, sep_id = _add_tokens(tokenizer, spec)
    _fill_llm_config(spec, tokenizer)
    llm = _load_llm(spec, tokenizer, dtype)
    adapter_config = _normalise(spec, vision, llm)
    try:
        adapter = SliMEVisualAdapter.from_config(adapter_config, dtype=dtype)
    except ValueError as exc:
        raise ValueError(f"{TOP}.adapter: {exc}") from exc
    from slime_adapters.hf import SliMEConfig, SliMEForConditionalGeneration

    try:
        config = SliMEConfig(vision_config=vision.config, text_config=llm.config,
                             adapter_config=spec["adapter"], image_token_id=image_id,
                             separator_token_id=sep_id, feature_layer=spec["feature_layer"],
                             drop_cls=spec["drop_cls"], slicer_config=_normalisation(spec, vision),
                             tie_word_embeddings=bool(llm.config.tie_word_embeddings))
    except ValueError as exc:
        raise ValueError(f"{TOP}: {exc}") from exc
    model = SliMEForConditionalGeneration(config, vision=vision, llm=llm, adapter=adapter)
    model = _finish(model, spec, add_lora=spec["lora"] is not None)
    return Built(model, tokenizer, roles_of(model), spec)


def _build_from_saved(spec: dict[str, Any]) -> Built:
    where = f"{TOP}.init_from"
    folder = existing_folder(spec["init_from"], where)
    try:
        model, processor = load_model_folder(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from exc
    saved = model.config.recipe_config
    if saved is None:
        raise ValueError(f"{where}: {folder!r} was saved without a build config (a model not made "
                         "by build_model); load it with "
                         "SliMEForConditionalGeneration.from_pretrained")
    tokenizer = processor.tokenizer if processor is not None else _load_tokenizer(spec)
    image_id, sep_id = _add_tokens(tokenizer, spec)
    _fill_llm_config(spec, tokenizer)
    _normalise(spec, model.vision, model.llm)
    diff = _differences(spec, saved)
    if diff:
        raise ValueError(f"{where}: the cfg differs from the one {folder!r} was built from: "
                         + "; ".join(diff))
    ids = (model.config.image_token_id, model.config.separator_token_id)
    if (image_id, sep_id) != ids:
        raise ValueError(f"{where}: the tokenizer gives image/separator ids {(image_id, sep_id)} "
                         f"but {folder!r} was saved with {ids}")
    model = _finish(model, spec, add_lora=spec["lora"] is not None)
    return Built(model, tokenizer, roles_of(model), spec)


def _is_lora_name(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def roles_of(model) -> dict[str, RoleSpec | nn.Module]:
    """Scheduler roles of a SliME model (see the module docstring).

    Returns:
        ``{role: RoleSpec or module}`` for :class:`slime_adapters.AlternatingScheduler`.
    """
    roles: dict[str, RoleSpec | nn.Module] = dict(model.adapter.roles())
    names = [n for n, _ in model.llm.named_parameters()]
    lora = tuple(n for n in names if _is_lora_name(n))
    if lora:
        roles["llm"] = RoleSpec(model.llm, tuple(n for n in names if not _is_lora_name(n)))
        roles["llm_lora"] = RoleSpec(model.llm, lora)
    else:
        roles["llm"] = model.llm
    roles["vision"] = model.vision
    return roles
