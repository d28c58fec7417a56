"""``SliMEConfig``: the Hugging Face configuration of the full SliME model.

It holds the vision encoder's and the LLM's own configurations (``vision_config``,
``text_config``: any CLIP or SigLIP vision config, any causal-LM config), the SliME adapter's
configuration (``adapter_config``, the dict of :class:`slime_adapters.SliMEVisualAdapterConfig`),
the image placeholder id, which encoder layer feeds the adapter, whether its CLS token is dropped,
the router's text rule and the slicer the model was trained with. Everything that can be checked
without weights is checked when the config is made (also when ``config.json`` is read), each error
naming the field: a bad folder fails before any model is built.

Shapes: none.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from slime_adapters.adapter import SliMEVisualAdapter
from slime_adapters.adapter_config import SliMEVisualAdapterConfig
from slime_adapters.slicing.config import SlicerConfig

__all__ = ["ENCODERS", "ROUTER_TEXT_RULES", "SliMEConfig", "encoder_kind"]

# vision model_type -> (kind, has a CLS token, mean, std of its own image processor)
ENCODERS: dict[str, tuple[str, bool, tuple[float, ...], tuple[float, ...]]] = {
    "clip_vision_model": ("clip", True, (0.48145466, 0.4578275, 0.40821073),
                          (0.26862954, 0.26130258, 0.27577711)),
    "siglip_vision_model": ("siglip", False, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
# "question": the human turns' text (the processor's question_ids) steers the router;
# "prompt": every text token of the prompt but the answers does;
# "released": every token but the image placeholder, the answers too (the released code's rule)
ROUTER_TEXT_RULES = ("question", "prompt", "released")


def encoder_kind(vision_config: Any) -> tuple[str, bool, tuple[float, ...], tuple[float, ...]]:
    """``(kind, has_cls, mean, std)`` of a vision config.

    Raises:
        ValueError: the config is not a CLIP or SigLIP vision config.
    """
    model_type = getattr(vision_config, "model_type", None)
    if model_type not in ENCODERS:
        raise ValueError(f"vision_config: model_type {model_type!r} is not a supported encoder; "
                         f"expected one of {sorted(ENCODERS)}")
    return ENCODERS[model_type]


def _plain(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items() if k not in ("kind", "slime_adapters_version")}
    return d


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} must be an integer, got {value!r}")
    return value


class SliMEConfig(PreTrainedConfig):
    r"""Configuration of :class:`~slime_adapters.hf.SliMEForConditionalGeneration`.

    Args:
        vision_config: a CLIP or SigLIP vision config (or its dict; default a CLIP ViT-L/14-336).
        text_config: a causal LM's config (or its dict with ``model_type``; default Llama).
        adapter_config: the adapter's config dict; ``projector.in_dim``, ``projector.out_dim``,
            ``projector.num_tokens`` and ``compressor.dim`` are filled in from the encoder and the
            LLM when missing and checked when given.
        image_token_id: the prompt's image placeholder (one per image; the model expands it).
        separator_token_id: the token whose embedding separates global and local tokens (needed
            when ``adapter_config.separator == "embedding"``).
        feature_layer: the encoder hidden state that feeds the adapter (−2 as LLaVA).
        drop_cls: drop each view's first (CLS) token; ``None`` = drop it when the encoder has one.
        router_text: ``"question"``, ``"prompt"`` or ``"released"`` (see ``ROUTER_TEXT_RULES``).
        slicer_config: the :class:`slime_adapters.SlicerConfig` keywords the model was trained
            with (its tile size defaults to the encoder's image size).
        training_stage: the training stage the weights come from (``Stage.to_dict()``), or None.
        recipe_config: the ``model:`` dict the recipes built this model from, or None.

    Raises:
        ValueError: a field of the wrong type or value, naming it (an image token outside the
            vocabulary, a feature layer the encoder does not have, a CLS token to drop that the
            encoder lacks, adapter widths that contradict the encoder or the LLM, ...).
    """

    model_type = "slime"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model",
            init_kwargs={"hidden_size": 1024, "intermediate_size": 4096, "patch_size": 14,
                         "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16}),
        # Llama's 32000 tokens and the image placeholder added after them
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama",
                                     init_kwargs={"vocab_size": 32001}),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    adapter_config: dict | None = None
    image_token_id: int = 32000
    separator_token_id: int | None = None
    feature_layer: int = -2
    drop_cls: bool | None = None
    router_text: str = "question"
    slicer_config: dict | None = None
    training_stage: dict | None = None
    recipe_config: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # sub-configs handed in as objects keep their attention implementation unless one is
        # asked for (the base class writes the composite's, None by default, over them)
        keep = {} if kwargs.get("attn_implementation") is not None else {
            key: getattr(self, key)._attn_implementation for key in ("vision_config", "text_config")
            if isinstance(getattr(self, key), PreTrainedConfig)}
        super().__post_init__(**kwargs)
        for key, attn in keep.items():
            if attn is not None:
                getattr(self, key)._attn_implementation = attn
        kind, has_cls, mean, std = encoder_kind(self.vision_config)
        v, t = self.vision_config, self.text_config
        layers = _int(getattr(v, "num_hidden_layers", None), "vision_config.num_hidden_layers")
        fl = _int(self.feature_layer, "feature_layer")
        if not -(layers + 1) <= fl <= layers:
            raise ValueError(f"feature_layer {fl} does not exist: the {kind} encoder has "
                             f"{layers} layers, so hidden_states has indices "
                             f"{-(layers + 1)}..{layers}")
        if self.drop_cls is None:
            self.drop_cls = has_cls
        if not isinstance(self.drop_cls, bool):
            raise ValueError(f"drop_cls must be true, false or null, got {self.drop_cls!r}")
        if self.drop_cls and not has_cls:
            raise ValueError(f"drop_cls is true but the {kind} encoder has no CLS token to drop")
        vocab = _int(getattr(t, "vocab_size", None), "text_config.vocab_size")
        for name in ("image_token_id", "separator_token_id"):
            value = getattr(self, name)
            if value is None and name == "separator_token_id":
                continue
            if not 0 <= _int(value, name) < vocab:
                raise ValueError(f"{name} {value} is outside the LLM's vocabulary "
                                 f"(0..{vocab - 1})")
        if self.router_text not in ROUTER_TEXT_RULES:
            raise ValueError(f"router_text must be one of {ROUTER_TEXT_RULES}, "
                             f"got {self.router_text!r}")
        self.adapter_config = self._resolved_adapter(has_cls)
        if self.adapter_config["separator"] == "embedding" and self.separator_token_id is None:
            raise ValueError('adapter_config.separator is "embedding": separator_token_id is '
                             "required (e.g. the id of \",\", as the released model uses)")
        if self.slicer_config is not None and not isinstance(self.slicer_config, dict):
            raise ValueError(f"slicer_config must be a dict, got "
                             f"{type(self.slicer_config).__name__}")
        slicer = dict(self.slicer_config or {})
        unknown = sorted(set(slicer) - set(SlicerConfig.__dataclass_fields__) - {"kind"})
        if unknown:
            raise ValueError(f"slicer_config: unknown key(s) {unknown}")
        slicer.setdefault("tile_size", int(v.image_size))
        slicer.setdefault("mean", list(mean))
        slicer.setdefault("std", list(std))
        try:
            self.slicer_config = _plain(SlicerConfig.from_dict(slicer).to_dict())
        except (TypeError, ValueError) as exc:
            raise ValueError(f"slicer_config: {exc}") from exc
        if self.slicer_config["tile_size"] != v.image_size:
            raise ValueError(f"slicer_config.tile_size {self.slicer_config['tile_size']} differs "
                             f"from the encoder's image_size {v.image_size}")
        for name in ("training_stage", "recipe_config"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{name} must be a dict or null, got {type(value).__name__}")

    # -------------------------------------------------------------------------------- helpers
    @property
    def tokens_per_view(self) -> int:
        """Encoder tokens per view that reach the adapter: patches, plus CLS unless dropped."""
        v = self.vision_config
        _, has_cls, _, _ = encoder_kind(v)
        return (v.image_size // v.patch_size) ** 2 + int(has_cls) - int(self.drop_cls)

    def adapter(self) -> SliMEVisualAdapterConfig:
        """The adapter's config as a :class:`slime_adapters.SliMEVisualAdapterConfig`."""
        return SliMEVisualAdapterConfig.from_dict(copy.deepcopy(self.adapter_config))

    def _resolved_adapter(self, has_cls: bool) -> dict[str, Any]:
        v, t = self.vision_config, self.text_config
        a = copy.deepcopy(self.adapter_config or {})
        if not isinstance(a, dict):
            raise ValueError(f"adapter_config must be a dict, got {type(a).__name__}")
        a = _plain(a)
        dv, dl = int(v.hidden_size), int(t.hidden_size)
        tokens = (v.image_size // v.patch_size) ** 2 + int(has_cls) - int(self.drop_cls)
        proj = a.setdefault("projector", {})
        comp = a.setdefault("compressor", {})
        if not isinstance(proj, dict) or not isinstance(comp, dict):
            raise ValueError("adapter_config.projector and adapter_config.compressor must be dicts")
        for key, want, what in (("in_dim", dv, "the vision encoder's width"),
                                ("out_dim", dl, "the LLM's embedding width"),
                                ("num_tokens", tokens, "the encoder's tokens per view "
                                 f"(drop_cls={self.drop_cls})")):
            proj.setdefault(key, want)
            if proj[key] != want:
                raise ValueError(f"adapter_config.projector.{key} is {proj[key]} but {what} is "
                                 f"{want}")
        comp.setdefault("dim", dv)
        for key in ("kv_dim", "out_dim"):
            if comp.get(key) is not None and comp[key] != dv:
                raise ValueError(f"adapter_config.compressor.{key} is {comp[key]} but the "
                                 f"compressor works at the vision encoder's width {dv}")
        if comp["dim"] != dv:
            raise ValueError(f"adapter_config.compressor.dim is {comp['dim']} but the compressor "
                             f"reads the vision encoder's tokens, of width {dv}")
        try:
            config = SliMEVisualAdapterConfig.from_dict(a)
            # the modules' own checks (separator, views, a square query count, γ, ...), on the
            # meta device: nothing is allocated
            SliMEVisualAdapter.from_config(config, device="meta")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"adapter_config: {exc}") from exc
        return _plain(config.to_dict())
