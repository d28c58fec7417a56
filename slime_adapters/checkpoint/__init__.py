"""Checkpoints: save and load modules, and import or export the released SliME weights.

=================================  ==============================================================
submodule                          public names
=================================  ==============================================================
``checkpoint.modules``             :func:`save_module`, :func:`load_module`,
                                   :func:`register_module`, :func:`registered_kinds`,
                                   :func:`read_safetensors`, :func:`check_state_dict`,
                                   :class:`CheckpointError`, ``WEIGHTS_NAME``, ``CONFIG_NAME``
``checkpoint.released``            :class:`ReleasedWeights`, :func:`import_released`,
                                   :func:`export_released`, :func:`save_released`
``checkpoint.released_layout``     the released layout's file names, key mapping and readers
=================================  ==============================================================

Every public name is importable from here. ``checkpoint.modules`` imports none of the library's
modules (the built-in kinds are looked up on first use); ``checkpoint.released`` depends on it,
never the other way round.
"""

from slime_adapters.checkpoint.modules import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    check_state_dict,
    load_module,
    read_safetensors,
    register_module,
    registered_kinds,
    save_module,
)
from slime_adapters.checkpoint.released import (
    ReleasedWeights,
    export_released,
    import_released,
    save_released,
)
from slime_adapters.checkpoint.released_layout import PROJECTOR_FILE, SAMPLER_FILE

__all__ = [
    "CONFIG_NAME",
    "PROJECTOR_FILE",
    "SAMPLER_FILE",
    "WEIGHTS_NAME",
    "CheckpointError",
    "ReleasedWeights",
    "check_state_dict",
    "export_released",
    "import_released",
    "load_module",
    "read_safetensors",
    "register_module",
    "registered_kinds",
    "save_module",
    "save_released",
]
