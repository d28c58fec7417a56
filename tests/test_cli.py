"""The console scripts and the packaged recipes: entry points, shipped configurations, exit
status 2 on bad input. (`make test-install` installs the wheel into a fresh venv and runs them.)"""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest

import recipes
from recipes.cli import _shipped

ROOT = Path(__file__).resolve().parents[1]


def test_console_scripts_name_callables():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"slime-train", "slime-chat", "slime-demo", "slime-eval"}
    for target in scripts.values():
        module, name = target.split(":")
        assert callable(getattr(importlib.import_module(module), name))


def test_package_data_covers_every_shipped_config():
    import fnmatch

    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = conf["package-data"]["recipes"]
    assert "recipes*" in conf["packages"]["find"]["include"]
    files = [p.relative_to(ROOT / "recipes").as_posix()
             for p in (ROOT / "recipes" / "configs").rglob("*") if p.is_file()]
    assert files and all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files), files
    assert recipes.CONFIGS == ROOT / "recipes" / "configs"


def test_a_shipped_config_is_found_by_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _shipped(["--config", "tiny/stage1.yaml", "--set", "a=1"]) == [
        "--config", str(recipes.CONFIGS / "tiny" / "stage1.yaml"), "--set", "a=1"]
    assert _shipped(["--config=tiny/stage2.yaml"]) == [
        f"--config={recipes.CONFIGS / 'tiny' / 'stage2.yaml'}"]
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "stage1.yaml").write_text("base: x\n")  # a local file wins
    assert _shipped(["--config", "tiny/stage1.yaml"]) == ["--config", "tiny/stage1.yaml"]
    assert _shipped(["--config", "none.yaml"]) == ["--config", "none.yaml"]


def test_slime_train_and_chat_exit_2_on_bad_input(tmp_path, capsys):
    from recipes.cli import chat, train

    with pytest.raises(SystemExit) as exc:
        train(["--config", str(tmp_path / "none.yaml")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert chat(["--model", str(tmp_path / "none"), "--image", "x.png", "--question", "q"]) == 2
    assert "chat: error: model folder" in capsys.readouterr().err
