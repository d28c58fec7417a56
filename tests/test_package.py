"""The package surface: every public name resolves, metadata agrees, torch-free planning."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import slime_adapters


def test_every_public_name_resolves():
    for name in slime_adapters.__all__:
        assert getattr(slime_adapters, name) is not None, name
    assert set(slime_adapters.__all__) <= set(dir(slime_adapters))


def test_unknown_attribute_raises_attribute_error():
    try:
        slime_adapters.does_not_exist  # noqa: B018
    except AttributeError as exc:
        assert "does_not_exist" in str(exc)
    else:
        raise AssertionError("no AttributeError")


def test_installed_version_matches():
    assert metadata.version("slime-adapters") == slime_adapters.__version__


def test_import_loads_no_optional_framework():
    code = (
        "import sys, slime_adapters\n"
        "from slime_adapters import SliMEVisualAdapter, AlternatingScheduler, save_module\n"
        "bad = [m for m in ('transformers', 'deepspeed', 'peft', 'xformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plan_grid_without_torch():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any import of torch now fails\n"
        "from slime_adapters.slicing import plan_grid\n"
        "from slime_adapters import plan_grid as p2\n"
        "plan = plan_grid(1920, 1080)\n"
        "assert plan.grid == (6, 4), plan.grid\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_readme_quick_start_runs():
    """The README's first Python block is executed as written and prints what its comments say."""
    import contextlib
    import io
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[0]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "README.md", "exec"), {})
    lines = buf.getvalue().splitlines()
    assert lines[0] == "(3, 3) 1873"
    assert lines[2].startswith("torch.Size([1, ") and lines[2].endswith(", 96])")
