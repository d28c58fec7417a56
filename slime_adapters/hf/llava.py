"""Add SliME to a LLaVA: a transformers ``LlavaForConditionalGeneration`` becomes a
:class:`~slime_adapters.hf.SliMEForConditionalGeneration` that keeps its vision tower and its LLM
(the same modules, not copies) and replaces its projector with the SliME adapter, whose MLP expert
starts from LLaVA's ``multi_modal_projector.linear_1`` / ``linear_2`` (the SliME MLP has LLaVA's
shape, ``Linear(dv, dl) → GELU → Linear(dl, dl)``). The query expert, the gate and the tile
compressor start fresh: train them with the paper's stage II (the compressor, local views) and
further stages, LLaVA's MLP giving stage I's result from the start.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slime_adapters.adapter_config import SliMEVisualAdapterConfig
from slime_adapters.hf.configuration_slime import SliMEConfig
from slime_adapters.hf.modeling_slime import SliMEForConditionalGeneration

__all__ = ["from_llava"]


def _causal_lm(llava) -> nn.Module:
    """A causal LM over LLaVA's own language model and LM head (shared, not copied)."""
    from transformers import AutoModelForCausalLM

    text = llava.config.text_config
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(text)
    lm.model = llava.model.language_model
    lm.lm_head = llava.lm_head
    return lm


def from_llava(llava, *, adapter_config: SliMEVisualAdapterConfig | dict[str, Any] | None = None,
               image_token_id: int | None = None,
               slicer_config: dict[str, Any] | None = None) -> SliMEForConditionalGeneration:
    """SliME on top of ``llava`` (see the module docstring).

    Args:
        llava: a ``transformers.LlavaForConditionalGeneration`` with a CLIP or SigLIP tower.
        adapter_config: the adapter's settings (a config or its dict; default the paper's);
            widths and token count left out are filled in from the tower and the LLM.
        image_token_id: the prompt's image placeholder (default LLaVA's ``image_token_id``).
        slicer_config: :class:`slime_adapters.SlicerConfig` keywords (default the paper's).

    Raises:
        ValueError: not a LLaVA model, several feature layers, a feature strategy other than
            ``default`` / ``full``, or a projector LLaVA's MLP cannot warm-start (an activation
            other than GELU, no biases).
    """
    cfg = getattr(llava, "config", None)
    if getattr(cfg, "model_type", None) != "llava" or not hasattr(llava, "model"):
        raise ValueError(f"from_llava needs a LlavaForConditionalGeneration, got "
                         f"{type(llava).__name__}")
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"from_llava: vision_feature_layer {layer!r} (several layers) is not "
                         "supported; the SliME adapter reads one layer")
    strategy = cfg.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(f"from_llava: vision_feature_select_strategy {strategy!r} is not "
                         "supported (default or full)")
    if cfg.projector_hidden_act != "gelu":
        raise ValueError(f"from_llava: LLaVA's projector uses {cfg.projector_hidden_act!r}; the "
                         "SliME MLP expert is Linear → GELU → Linear, so it cannot start from it")
    if not getattr(cfg, "multimodal_projector_bias", True):
        raise ValueError("from_llava: LLaVA's projector has no biases; the SliME MLP expert has")
    adapter = (adapter_config.to_dict() if isinstance(adapter_config, SliMEVisualAdapterConfig)
               else dict(adapter_config or {}))
    config = SliMEConfig(vision_config=cfg.vision_config, text_config=cfg.text_config,
                         adapter_config=adapter,
                         image_token_id=cfg.image_token_id if image_token_id is None
                         else image_token_id,
                         feature_layer=layer, drop_cls=strategy == "default",
                         slicer_config=slicer_config)
    vision, llm = llava.model.vision_tower, _causal_lm(llava)
    model = SliMEForConditionalGeneration(config, vision=vision, llm=llm)
    proj = llava.model.multi_modal_projector
    with torch.no_grad():
        mlp = model.adapter.projector.mlp
        for ours, theirs in ((mlp[0], proj.linear_1), (mlp[2], proj.linear_2)):
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
    return model
