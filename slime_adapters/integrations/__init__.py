"""Optional glue to training frameworks (DeepSpeed, Hugging Face ``Trainer``).

Import the submodules explicitly (``slime_adapters.integrations.deepspeed``,
``slime_adapters.integrations.hf``); each imports its framework inside its functions only, so the
package itself never needs deepspeed or transformers.
"""
