"""The console scripts ``slime-train``, ``slime-chat``, ``slime-demo`` and ``slime-eval``.

``slime-train --config tiny/stage1.yaml`` also takes a configuration shipped with the package by
its path under :data:`recipes.CONFIGS` (a file of that name in the working folder wins). Bad
input ends with one line on stderr and exit status 2, as ``python -m recipes.train`` does.
"""

from __future__ import annotations

import sys
from pathlib import Path

from recipes import CONFIGS

__all__ = ["chat", "demo", "evaluate", "train"]


def _shipped(argv: list[str]) -> list[str]:
    """``--config NAME`` → the shipped file when ``NAME`` is no file here but one under
    ``CONFIGS``."""
    out = list(argv)
    for i, arg in enumerate(out):
        value, prefix = None, ""
        if arg == "--config" and i + 1 < len(out):
            i, value = i + 1, out[i + 1]
        elif arg.startswith("--config="):
            value, prefix = arg.split("=", 1)[1], "--config="
        if value is not None and not Path(value).exists() and (CONFIGS / value).is_file():
            out[i] = prefix + str(CONFIGS / value)
    return out


def train(argv: list[str] | None = None) -> int:
    from recipes.train import main
    from recipes.train_config import TrainConfigError

    try:
        main(_shipped(sys.argv[1:] if argv is None else argv))
    except (TrainConfigError, FileNotFoundError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    return 0


def chat(argv: list[str] | None = None) -> int:
    from recipes.chat import main

    return main(argv)


def demo(argv: list[str] | None = None) -> int:
    from recipes.demo import main

    main(argv)
    return 0


def evaluate(argv: list[str] | None = None) -> int:
    from recipes.eval import main

    return main(argv)
