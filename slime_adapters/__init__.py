"""slime-adapters: the SliME high-resolution front end for multimodal LLMs as PyTorch modules.

Public names are imported on first use, so ``from slime_adapters.slicing import plan_grid`` works
in an environment without torch, and ``import slime_adapters`` stays cheap.
"""

import importlib as _importlib

__version__ = "0.1.0.dev0"

# public name -> submodule that defines it
_EXPORTS = {
    # attention kernels
    "attention": "ops.attention",
    "select_backend": "ops.attention",
    "backend_reasons": "ops.attention",
    "AttentionInputError": "ops.attention",
    "BackendUnavailableError": "ops.attention",
    # slicing
    "AdaptiveSlicer": "slicing.slicer",
    "SlicerConfig": "slicing.config",
    "SlicePlan": "slicing.plan",
    "SlicedImage": "slicing.batch",
    "SlicedBatch": "slicing.batch",
    "SlicingError": "slicing.plan",
    "plan_grid": "slicing.plan",
    "visual_token_count": "slicing.plan",
    "collate": "slicing.batch",
    "LLAVA_NEXT_PINPOINTS": "slicing.plan",
    # adapters
    "QueryCompressor": "compressor",
    "QueryCompressorConfig": "compressor",
    "NoisyMoEProjector": "projector",
    "NoisyMoEProjectorConfig": "projector",
    "MoEOutput": "projector",
    "CosineTokenRouter": "router",
    "CosineTokenRouterConfig": "router",
    "RouterOutput": "router",
    "PackedTokens": "router",
    "PaddedTokens": "router",
    "RouterInputError": "router",
    "pooled_cosine_scores": "router_scores",
    "pooled_text_direction": "router_scores",
    "cosine_scores_to": "router_scores",
    # baseline token selectors (the router's interface)
    "RandomSelector": "selectors",
    "RandomSelectorConfig": "selectors",
    "SpatialSelector": "selectors",
    "SpatialSelectorConfig": "selectors",
    "NormSelector": "selectors",
    "NormSelectorConfig": "selectors",
    "DiversitySelector": "selectors",
    "DiversitySelectorConfig": "selectors",
    "QuestionTopKSelector": "selectors",
    "QuestionTopKSelectorConfig": "selectors",
    "SaliencySelector": "selectors",
    "SaliencySelectorConfig": "selectors",
    "match_mean_budget": "selectors",
    "budget_counts": "selectors",
    "cls_attention": "selectors",
    "contextual_tokens": "selectors",
    "SliMEVisualAdapter": "adapter",
    "SliMEVisualAdapterConfig": "adapter_config",
    "VisualTokens": "adapter",
    "AdapterAux": "adapter",
    "splice_into_embeddings": "splice",
    "SplicedInputs": "splice",
    # training schedule
    "Stage": "schedule.stages",
    "ScheduleError": "schedule.stages",
    "paper_stages": "schedule.stages",
    "reference_stages": "schedule.stages",
    "alternating": "schedule.stages",
    "AlternatingScheduler": "schedule.scheduler",
    "RoleSpec": "schedule.roles",
    "projector_roles": "schedule.roles",
    "role_coverage": "schedule.roles",
    # checkpoints and configs
    "save_module": "checkpoint.modules",
    "load_module": "checkpoint.modules",
    "register_module": "checkpoint.modules",
    "CheckpointError": "checkpoint.modules",
    "ReleasedWeights": "checkpoint.released",
    "import_released": "checkpoint.released",
    "export_released": "checkpoint.released",
    "save_released": "checkpoint.released",
    "ConfigError": "config",
    "UnknownConfigKeyWarning": "config",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'slime_adapters' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"slime_adapters.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    # the public names and the module's own dunders (no helper imports, no loaded submodules)
    return sorted(set(__all__) | {k for k in globals() if k.startswith("__")})
