"""Helpers shared by every ``benchmarks/bench_*.py``: device choice, result naming and saving,
timing with ``torch.utils.benchmark`` and peak-memory measurement.

Conventions (SPEC §4, STYLE "Benchmarks"): a benchmark checks its fast path against the oracle
before timing anything, times the oracle in the same run, prints the ratio last, and saves one JSON
(plus PNGs) named ``<bench>_<device>_torch<version>_<commit>`` under ``benchmarks/results/`` or
``--out DIR``. A benchmark never asserts a time; the test suite only runs its ``--tiny`` mode.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils import benchmark as tbench

from slime_adapters.config import atomic_write_text

__all__ = [
    "RESULTS_DIR",
    "device_tag",
    "environment",
    "git_commit",
    "peak_memory_bytes",
    "pick_device",
    "result_stem",
    "save_json",
    "summarise",
    "synchronize",
    "threads",
    "time_fn",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"`` gives CUDA when available, else the CPU; any other name is passed to torch.
    Raises ValueError when CUDA is asked for and absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def device_tag(device: torch.device) -> str:
    """Short file-name-safe name of the device: ``cpu`` or e.g. ``cuda-NVIDIA-H200``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "cuda-" + re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
    return device.type


def git_commit() -> str:
    """Short hash of HEAD, ``-dirty`` appended when tracked files changed; outside git (a copy of
    the tree on a device machine) ``SLIME_COMMIT`` when set, else ``nogit``."""
    given = os.environ.get("SLIME_COMMIT", "").strip()
    # only a name that is safe inside a file name counts
    given = given if re.fullmatch(r"[0-9A-Za-z._-]{1,64}", given) else ""
    if given and not (REPO_ROOT / ".git").exists():
        return given
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return given or "nogit"
    return head + ("-dirty" if dirty.strip() else "")


def result_stem(bench: str, device: torch.device) -> str:
    """``<bench>_<device>_torch<version>_<commit>``, the stem of every file a run writes."""
    torch_version = torch.__version__.split("+")[0]
    return f"{bench}_{device_tag(device)}_torch{torch_version}_{git_commit()}"


def environment(device: torch.device) -> dict[str, Any]:
    """What produced the numbers: device, torch, Python, threads, commit."""
    info = {
        "device": device_tag(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "commit": git_commit(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def save_json(path: str | os.PathLike[str], payload: dict[str, Any], *,
              indent: int | None = 2) -> Path:
    """Write ``payload`` as JSON atomically (NaN/inf become null; ``indent=None`` for one compact
    line, for large results); returns the path."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    path = Path(path)
    atomic_write_text(path, json.dumps(clean(payload), indent=indent) + "\n")
    return path


@contextlib.contextmanager
def threads(count: int | None):
    """Run the block with ``count`` torch CPU threads (``None``: unchanged), restoring the
    previous count after."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, *, min_run_time: float = 0.2,
            warmup: int = 2) -> dict[str, float]:
    """Median wall time of ``fn()`` in seconds (``torch.utils.benchmark.Timer.blocked_autorange``
    after ``warmup`` calls, synchronising CUDA around every call), with its IQR and run count."""
    def run() -> None:
        fn()
        synchronize(device)

    for _ in range(warmup):
        run()
    timer = tbench.Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return {"median_s": m.median, "iqr_s": m.iqr, "runs": len(m.times)}


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    # replay the profiler's raw allocation events (size < 0 for a free) and take the running max
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        stack.extend(ev.children)
        if ev.tag == _EventType.Allocation:
            events.append((ev.start_time_ns, ev.extra_fields.alloc_size))
    events.sort()
    peak = current = 0
    for _, size in events:
        current += size
        peak = max(peak, current)
    return peak


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes allocated by torch during ``fn()`` above what was allocated before (outputs
    included). CUDA: the caching allocator's peak counter. CPU: the profiler's allocation events
    (``profile_memory=True``). Returns None if this torch build cannot report it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        return _cpu_peak_bytes(fn)
    except (ImportError, AttributeError, RuntimeError):
        return None


def summarise(values: list[float]) -> dict[str, float]:
    """Median, mean, standard deviation, min and max of a list of numbers."""
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }
