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
    "AdaptiveSlicer": "slicing",
    "SlicerConfig": "slicing",
    "SlicePlan": "slicing",
    "SlicedImage": "slicing",
    "SlicedBatch": "slicing",
    "SlicingError": "slicing",
    "plan_grid": "slicing",
    "visual_token_count": "slicing",
    "collate": "slicing",
    "LLAVA_NEXT_PINPOINTS": "slicing",
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
    "pooled_cosine_scores": "router",
    "pooled_text_direction": "router",
    "cosine_scores_to": "router",
    "SliMEVisualAdapter": "adapter",
    "SliMEVisualAdapterConfig": "adapter",
    "VisualTokens": "adapter",
    "AdapterAux": "adapter",
    "splice_into_embeddings": "splice",
    "SplicedInputs": "splice",
    # training schedule
    "Stage": "stages",
    "ScheduleError": "stages",
    "paper_stages": "stages",
    "reference_stages": "stages",
    "alternating": "stages",
    "AlternatingScheduler": "schedule",
    "RoleSpec": "schedule",
    "projector_roles": "schedule",
    # checkpoints and configs
    "save_module": "checkpoint",
    "load_module": "checkpoint",
    "register_module": "checkpoint",
    "CheckpointError": "checkpoint",
    "ReleasedWeights": "checkpoint",
    "import_released": "checkpoint",
    "export_released": "checkpoint",
    "save_released": "checkpoint",
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
