"""Optional glue to training frameworks (DeepSpeed, Hugging Face ``Trainer``) and encoders
(open_clip).

Import the submodules explicitly (``slime_adapters.integrations.deepspeed``,
``slime_adapters.integrations.hf``, ``slime_adapters.integrations.open_clip``); each imports its
framework inside its functions only, so the package itself never needs deepspeed, transformers or
open_clip.
"""
