"""The adapter's settings: :class:`SliMEVisualAdapterConfig` and its two presets.

The paper's behaviour and the released code's differ in seven switches that must agree with one
another (``projector.mode``, ``projector.noise``, ``compressor.mode``, ``router.text_pool``,
``router.crossing``, ``router.legacy_softmax``, ``separator``; ``projector.shared_mlp`` and
``local_mlp`` are shared in both). The presets set them together:

==========================  ====================  =============================================
switch                      ``paper()``           ``released(legacy_softmax=...)``
==========================  ====================  =============================================
projector.mode / noise      paper / learned       reference / reference
projector.shared_mlp        True                  True
compressor.mode             paper                 reference
router.text_pool            mean                  sum
router.crossing             reach                 exceed
router.legacy_softmax       False                 as given (True for checkpoints before Nov 2024)
separator / local_mlp       learned / shared      embedding / shared
==========================  ====================  =============================================

Any other field (widths, query counts, γ, heads, views, ...) is free: pass the sub-configs' changes
as dicts (``projector={"in_dim": 1024, "out_dim": 4096}``) or as configs. A preset refuses a change
that contradicts one of its switches (build the config directly to mix behaviours).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from slime_adapters.compressor import QueryCompressorConfig
from slime_adapters.config import ConfigBase, ConfigError, check_bool, check_choice
from slime_adapters.projector import NoisyMoEProjectorConfig
from slime_adapters.router import CosineTokenRouterConfig
from slime_adapters.selectors import (
    ROUTER_CONFIGS,
    DiversitySelectorConfig,
    NormSelectorConfig,
    QuestionTopKSelectorConfig,
    RandomSelectorConfig,
    SaliencySelectorConfig,
    SpatialSelectorConfig,
)
from slime_adapters.slicing.plan import VIEWS

__all__ = ["LOCAL_MLPS", "PRESETS", "SEPARATORS", "RouterConfig", "SliMEVisualAdapterConfig",
           "preset_switches"]

#: the configs the adapter's ``router`` takes: the SliME router or a baseline selector
RouterConfig = Union[  # noqa: UP007 (resolved by typing.get_type_hints when loading JSON)
    CosineTokenRouterConfig, RandomSelectorConfig, SpatialSelectorConfig, NormSelectorConfig,
    DiversitySelectorConfig, QuestionTopKSelectorConfig, SaliencySelectorConfig]

SEPARATORS = ("learned", "embedding", "none")
LOCAL_MLPS = ("shared", "own")

_SUB_CONFIGS = {
    "projector": NoisyMoEProjectorConfig,
    "compressor": QueryCompressorConfig,
    "router": CosineTokenRouterConfig,
}


PRESETS = ("paper", "released")


def preset_switches(preset: str, *, legacy_softmax: bool = False) -> dict[str, Any]:
    """The switches a preset sets (the module docstring's table): ``{"projector": {...},
    "compressor": {...}, "router": {...}, "separator": ..., "local_mlp": ...}``; the released
    weights' importer builds a lone projector or compressor with them.

    Raises:
        ConfigError: an unknown preset, or a non-bool ``legacy_softmax``.
    """
    check_choice("preset_switches", "preset", preset, PRESETS)
    check_bool("preset_switches", "legacy_softmax", legacy_softmax)
    return _switches(preset == "released", legacy_softmax)


def _switches(released: bool, legacy_softmax: bool = False) -> dict[str, Any]:
    ref = "reference" if released else "paper"
    return {
        "projector": {"mode": ref, "noise": "reference" if released else "learned",
                      "shared_mlp": True},
        "compressor": {"mode": ref},
        "router": {"text_pool": "sum" if released else "mean",
                   "crossing": "exceed" if released else "reach",
                   "legacy_softmax": legacy_softmax},
        "separator": "embedding" if released else "learned",
        "local_mlp": "shared",
    }


@dataclass(frozen=True)
class SliMEVisualAdapterConfig(ConfigBase):
    """Configuration of :class:`~slime_adapters.adapter.SliMEVisualAdapter`; the sub-module
    configs are nested. Validated on construction: the sub-configs' types, ``separator``,
    ``local_mlp`` and ``views`` against their choices, the compressor's output width against the
    projector's ``in_dim`` (compressed tiles go through the projector's MLP) and a square
    ``compressor.num_queries`` (tiles are laid out on a grid)."""

    kind: ClassVar[str] = "slime_visual_adapter"
    projector: NoisyMoEProjectorConfig = field(default_factory=NoisyMoEProjectorConfig)
    compressor: QueryCompressorConfig = field(default_factory=QueryCompressorConfig)
    router: RouterConfig = field(default_factory=CosineTokenRouterConfig)
    separator: str = "learned"
    local_mlp: str = "shared"
    views: str = "both"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name, cls in _SUB_CONFIGS.items():
            value = getattr(self, name)
            allowed = ROUTER_CONFIGS if name == "router" else (cls,)
            if type(value) not in allowed:
                kinds = " or ".join(c.__name__ for c in allowed)
                raise ConfigError(f"{owner}: {name} must be a {kinds}, got "
                                  f"{type(value).__name__} {value!r}")
        check_choice(owner, "separator", self.separator, SEPARATORS)
        check_choice(owner, "local_mlp", self.local_mlp, LOCAL_MLPS)
        check_choice(owner, "views", self.views, VIEWS)
        comp_out = self.compressor.out_dim or self.compressor.dim
        if comp_out != self.projector.in_dim:
            raise ConfigError(
                f"{owner}: compressor output width ({comp_out}) must equal the projector's in_dim "
                f"({self.projector.in_dim}): compressed tiles go through the projector's MLP"
            )
        side = int(round(self.compressor.num_queries ** 0.5))
        if side * side != self.compressor.num_queries:
            raise ConfigError(
                f"{owner}: compressor.num_queries must be a perfect square to lay tiles out on a "
                f"grid, got {self.compressor.num_queries}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SliMEVisualAdapterConfig:
        """As :meth:`ConfigBase.from_dict`; the ``router`` dict is read as the config its
        ``kind`` names (no ``kind``: the cosine router), e.g. ``{"kind": "norm_selector",
        "keep_fraction": 0.25}``.

        Raises:
            ConfigError: an unknown router kind, or an invalid field (named).
        """
        router = data.get("router") if isinstance(data, dict) else None
        if isinstance(router, dict):
            kinds = {c.kind: c for c in ROUTER_CONFIGS}
            kind = router.get("kind", CosineTokenRouterConfig.kind)
            if kind not in kinds:
                raise ConfigError(f"{cls.__name__}: router kind {kind!r} is unknown; kinds: "
                                  f"{sorted(kinds)}")
            try:
                data = {**data, "router": kinds[kind].from_dict(router)}
            except ConfigError as exc:
                raise ConfigError(f"{cls.__name__}: invalid config: router: {exc}") from exc
        return super().from_dict(data)

    @classmethod
    def paper(cls, **changes: Any) -> SliMEVisualAdapterConfig:
        """The paper's behaviour (see the module docstring); ``changes`` set the free fields:
        ``projector``/``compressor``/``router`` as dicts or configs, ``views``.

        Raises:
            ConfigError: a change contradicts a switch of the preset, or an invalid value.
        """
        return cls._preset("paper", _switches(released=False), changes)

    @classmethod
    def released(cls, *, legacy_softmax: bool = False, **changes: Any) -> SliMEVisualAdapterConfig:
        """The released SliME code's behaviour (see the module docstring). ``legacy_softmax``:
        True for checkpoints released before Nov 2024 (trained with the router's extra
        softmax). ``changes`` as in :meth:`paper`.

        Raises:
            ConfigError: a change contradicts a switch of the preset, or an invalid value.
        """
        return cls._preset("released", preset_switches("released", legacy_softmax=legacy_softmax),
                           changes)

    @classmethod
    def _preset(cls, preset: str, switches: dict[str, Any],
                changes: dict[str, Any]) -> SliMEVisualAdapterConfig:
        owner = f"{cls.__name__}.{preset}()"
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"{owner}: unknown fields {unknown}; fields: {sorted(names)}")
        kwargs: dict[str, Any] = {}
        for name, sub_cls in _SUB_CONFIGS.items():
            given = changes.get(name)
            if (name == "router" and type(given) in ROUTER_CONFIGS
                    and not isinstance(given, CosineTokenRouterConfig)):
                kwargs[name] = given  # a baseline selector: the router switches do not apply
                continue
            if given is None:
                fields: dict[str, Any] = {}
            elif isinstance(given, sub_cls):
                fields = {f.name: getattr(given, f.name) for f in dataclasses.fields(given)}
            elif isinstance(given, Mapping):
                fields = dict(given)
            else:
                raise ConfigError(f"{owner}: {name} must be a dict of changes or a "
                                  f"{sub_cls.__name__}, got {type(given).__name__}")
            for key, want in switches[name].items():
                if key in fields and fields[key] != want:
                    raise ConfigError(
                        f"{owner} sets {name}.{key}={want!r}, got {fields[key]!r}; build "
                        f"{cls.__name__}(...) directly to mix behaviours")
            try:
                kwargs[name] = sub_cls(**{**fields, **switches[name]})
            except TypeError as exc:
                raise ConfigError(f"{owner}: {name}: {exc}") from None
        for key in ("separator", "local_mlp"):
            if key in changes and changes[key] != switches[key]:
                raise ConfigError(f"{owner} sets {key}={switches[key]!r}, got {changes[key]!r}")
            kwargs[key] = switches[key]
        if "views" in changes:
            kwargs["views"] = changes["views"]
        return cls(**kwargs)
