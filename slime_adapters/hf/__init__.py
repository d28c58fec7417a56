"""SliME as a Hugging Face model: ``SliMEConfig``, ``SliMEForConditionalGeneration``, the image
processor and the processor, registered with the Auto classes.

Needs the ``hf`` extra (``pip install "slime-adapters[hf]"``). After ``import slime_adapters.hf``
a folder written by ``save_pretrained`` loads with ``AutoConfig``,
``AutoModelForImageTextToText``, ``AutoModelForCausalLM``, ``AutoProcessor`` and
``AutoImageProcessor`` (no ``trust_remote_code``)::

    import slime_adapters.hf  # registers model_type "slime"
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from slime_adapters.hf.configuration_slime import SliMEConfig
from slime_adapters.hf.modeling_slime import (NonFiniteFeaturesError, SliMEForConditionalGeneration,
                                             SliMEPreTrainedModel)
from slime_adapters.hf.outputs import SliMEOutput
from slime_adapters.hf.processing_slime import SliMEImageProcessor, SliMEProcessor

__all__ = ["NonFiniteFeaturesError", "SliMEConfig", "SliMEForConditionalGeneration", "SliMEImageProcessor", "SliMEOutput",
           "SliMEPreTrainedModel", "SliMEProcessor"]

AutoConfig.register(SliMEConfig.model_type, SliMEConfig, exist_ok=True)
AutoModelForImageTextToText.register(SliMEConfig, SliMEForConditionalGeneration, exist_ok=True)
# it takes text alone too (and generates from it), so it is a causal LM where one is asked for
AutoModelForCausalLM.register(SliMEConfig, SliMEForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(SliMEConfig, image_processor_classes={"pil": SliMEImageProcessor},
                            exist_ok=True)
AutoProcessor.register(SliMEConfig, SliMEProcessor, exist_ok=True)
