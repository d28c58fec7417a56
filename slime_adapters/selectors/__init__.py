"""Baseline token selectors with the router's interface: drop-in replacements of
:class:`~slime_adapters.router.CosineTokenRouter` in :class:`~slime_adapters.SliMEVisualAdapter`.

Each keeps a fixed budget of local tokens per image (:mod:`~slime_adapters.selectors.budget`) and
returns a :class:`~slime_adapters.router.RouterOutput`; the adapter's packing and splicing are
unchanged. The common interface is described in :mod:`~slime_adapters.selectors.base`.

=========================  ===============================  ==============
selector                   reads                            question-aware
=========================  ===============================  ==============
``RandomSelector``         the mask (seeded draw)           no
``SpatialSelector``        each image's raster (rows, cols) no
``NormSelector``           the tokens (‖v‖)                 no
``DiversitySelector``      the tokens (cosine distances)    no
``QuestionTopKSelector``   tokens + question (cosine)       yes
``SaliencySelector``       the encoder's [CLS] attention    no
=========================  ===============================  ==============
"""

from __future__ import annotations

from torch import nn

from slime_adapters.config import ConfigBase, ConfigError
from slime_adapters.router import CosineTokenRouter, CosineTokenRouterConfig
from slime_adapters.selectors.base import FixedBudgetSelector, select_packed
from slime_adapters.selectors.budget import budget_counts, match_mean_budget
from slime_adapters.selectors.diversity import DiversitySelector, DiversitySelectorConfig
from slime_adapters.selectors.saliency import cls_attention, contextual_tokens, pool_saliency
from slime_adapters.selectors.simple import (
    NormSelector,
    NormSelectorConfig,
    QuestionTopKSelector,
    QuestionTopKSelectorConfig,
    RandomSelector,
    RandomSelectorConfig,
    SaliencySelector,
    SaliencySelectorConfig,
    SpatialSelector,
    SpatialSelectorConfig,
    bayer_index,
)

__all__ = [
    "ROUTER_CONFIGS",
    "SELECTORS",
    "DiversitySelector",
    "DiversitySelectorConfig",
    "FixedBudgetSelector",
    "NormSelector",
    "NormSelectorConfig",
    "QuestionTopKSelector",
    "QuestionTopKSelectorConfig",
    "RandomSelector",
    "RandomSelectorConfig",
    "SaliencySelector",
    "SaliencySelectorConfig",
    "SpatialSelector",
    "SpatialSelectorConfig",
    "bayer_index",
    "budget_counts",
    "build_router",
    "cls_attention",
    "contextual_tokens",
    "match_mean_budget",
    "pool_saliency",
    "select_packed",
]

#: short name -> selector class (the benchmark's method names)
SELECTORS: dict[str, type[FixedBudgetSelector]] = {
    "random": RandomSelector,
    "spatial": SpatialSelector,
    "norm": NormSelector,
    "diversity": DiversitySelector,
    "question_topk": QuestionTopKSelector,
    "saliency": SaliencySelector,
}

_ROUTERS: dict[type[ConfigBase], type[nn.Module]] = {
    CosineTokenRouterConfig: CosineTokenRouter,
    **{cls.config_class: cls for cls in SELECTORS.values()},
}
#: every config the adapter's ``router`` field takes
ROUTER_CONFIGS: tuple[type[ConfigBase], ...] = tuple(_ROUTERS)


def build_router(config: ConfigBase, *, device=None, dtype=None) -> nn.Module:
    """The router or selector module for ``config`` (any of :data:`ROUTER_CONFIGS`).

    Raises:
        ConfigError: ``config`` is not one of them.
    """
    cls = _ROUTERS.get(type(config))
    if cls is None:
        names = ", ".join(c.__name__ for c in ROUTER_CONFIGS)
        raise ConfigError(f"router must be one of {names}, got {type(config).__name__}")
    return cls.from_config(config, device=device, dtype=dtype)
