"""slime-adapters: the SliME high-resolution front end for multimodal LLMs as PyTorch modules."""

from slime_adapters.ops import (
    AttentionInputError,
    BackendUnavailableError,
    attention,
    select_backend,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "AttentionInputError",
    "BackendUnavailableError",
    "__version__",
    "attention",
    "select_backend",
]
