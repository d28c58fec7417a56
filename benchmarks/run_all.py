"""Run every benchmark at its default CPU size (``make bench``), or each one's ``--tiny`` mode.

Each benchmark runs as its own ``python -m benchmarks.<name>`` process (so one benchmark's thread
or device settings cannot leak into the next), in the order below; a failure is reported and the
others still run. Exit status: 0 when all succeeded, 1 otherwise.

    python -m benchmarks.run_all                  # default sizes, several minutes on 2 cores
    python -m benchmarks.run_all --tiny           # seconds each
    python -m benchmarks.run_all --only bench_stack bench_tokens --out /tmp/results
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._common import REPO_ROOT

BENCHMARKS = ("bench_tokens", "bench_slicing", "bench_router", "bench_sparsity", "bench_prefill",
              "bench_adapters", "bench_stack", "bench_attention", "bilinear")


def command(name: str, *, tiny: bool, out: Path | None, extra: list[str]) -> list[str]:
    """The command line that runs benchmark ``name``."""
    cmd = [sys.executable, "-m", f"benchmarks.{name}"]
    if tiny:
        cmd.append("--tiny")
    if out is not None:
        cmd += ["--out", str(out)]
    return cmd + extra


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="each benchmark's seconds-long mode")
    ap.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None,
                    help="run these benchmarks only (default: all)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder passed to every benchmark (default: benchmarks/results)")
    args, extra = ap.parse_known_args(argv)
    if extra:
        ap.error(f"unknown arguments {extra}")
    names = args.only or BENCHMARKS
    status: list[tuple[str, int, float]] = []
    for name in names:
        cmd = command(name, tiny=args.tiny, out=args.out, extra=[])
        print(f"=== {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        rc = subprocess.run(cmd, cwd=REPO_ROOT, check=False).returncode
        status.append((name, rc, time.perf_counter() - start))
    print("=== summary")
    for name, rc, seconds in status:
        print(f"{name:>15}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {seconds:.1f} s")
    return 0 if all(rc == 0 for _, rc, _ in status) else 1


if __name__ == "__main__":
    sys.exit(main())
