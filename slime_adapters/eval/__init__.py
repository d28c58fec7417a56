"""SliME in lmms-eval: the ``slime`` model (:mod:`slime_adapters.eval.lmms_eval_slime`) and an
offline task over a local question file (:mod:`slime_adapters.eval.task`).

Needs the ``eval`` extra (``pip install "slime-adapters[eval]"``, lmms-eval ≥ 0.7.3). The package
declares the entry point ``lmms_eval.models: slime`` → :func:`lmms_eval_manifests`, so once it is
installed ``lmms_eval --model slime --model_args pretrained=DIR ...`` finds the model by name
(it takes the place of lmms-eval's own ``slime`` entry, a wrapper for the released LLaVA-based
code). Importing this package imports neither lmms-eval nor transformers.
"""

from __future__ import annotations

__all__ = ["CHAT_CLASS", "SIMPLE_CLASS", "lmms_eval_manifests"]

CHAT_CLASS = "slime_adapters.eval.lmms_eval_slime.SliMEChat"
SIMPLE_CLASS = "slime_adapters.eval.lmms_eval_slime.SliMESimple"


def lmms_eval_manifests():
    """The model manifest lmms-eval's registry loads from the entry point: the chat model (the
    default) and the simple one (``--force_simple``, with ``loglikelihood``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="slime", chat_class_path=CHAT_CLASS,
                          simple_class_path=SIMPLE_CLASS, aliases=("slime_adapters",))]
