"""The SliME recipes: build the full model from a ``model:`` dict (:mod:`recipes.build`), saved
model folders (:mod:`recipes.model_folder`), data and chat templates, training
(:mod:`recipes.train`), chat (:mod:`recipes.chat`) and the demo. Installed with the ``recipes``
extra; the console scripts ``slime-train``, ``slime-chat`` and ``slime-demo`` run them.

``CONFIGS`` is the folder of the shipped YAML configurations and DeepSpeed presets (``tiny/``,
``slime-llama3-8b/``, ..., ``deepspeed/``).
"""

from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"
