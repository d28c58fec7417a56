#!/usr/bin/env bash
# One command for a GPU session: every CUDA check and GPU figure of the project in one run of a few
# minutes (the device budget of a session is 15 minutes in all, start-up included).
#
#   bash benchmarks/gpu_session.sh [WHEEL_DIR]        # from the repository root
#
# Steps (each under `timeout`, all together under GPU_SESSION_BUDGET seconds, default 330; a step
# that fails does not stop the next):
#   1. the machine: nvidia-smi, Python, torch, CUDA, the commit (when git is there)
#   2. wheels: if WHEEL_DIR (default benchmarks/wheels, filled by fetch_gpu_wheels.sh) holds
#      wheels, install them offline with `pip install --no-index --no-deps --target` into a
#      temporary folder: xformers always, nvidia-cuda-runtime-cu12 (libcudart.so.12 for xformers)
#      into a folder of its own that goes on LD_LIBRARY_PATH only, and each support wheel (einops,
#      numpy, pytest, ...) only when the machine cannot import it already
#   3. the attention backends' probe verdicts and `auto` choices on this device
#   4. pytest -q tests/test_cuda.py tests/test_attention.py
#   5. python -m benchmarks.bench_attention and python -m benchmarks.bench_stack at their CUDA
#      defaults (bf16, full widths); on a machine without CUDA both run --tiny instead
# Everything lands in $OUT when it is set (else a fresh /tmp/gpu_session.* folder): session.log,
# backends.txt, pytest.txt, pytest.xml, results/*.json, steps.tsv. Exit status 0 when every step
# succeeded, 1 otherwise.
set -u

cd "$(dirname "$0")/.."
WHEELS=${1:-benchmarks/wheels}
DEST=${OUT:-$(mktemp -d /tmp/gpu_session.XXXXXX)}
mkdir -p "$DEST/results"

BUDGET=${GPU_SESSION_BUDGET:-330}
START=$(date +%s)
FAILED=0
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
printf 'step\tstatus\tseconds\n' > "$DEST/steps.tsv"

# step NAME CAP_SECONDS [--log FILE [--tail N]] CMD...: run CMD under `timeout`, capped by what is
# left of the budget; with --log its output also goes to FILE, and with --tail only the last N lines
# of it are shown (the whole of it stays in FILE)
step() {
    local name=$1 cap=$2 log=/dev/null tail_n="" left t0 rc
    shift 2
    if [ "$1" = "--log" ]; then log=$2; shift 2; fi
    if [ "$1" = "--tail" ]; then tail_n=$2; shift 2; fi
    left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 10 ]; then
        echo "=== $name: skipped, the session budget (${BUDGET} s) is spent"
        printf '%s\tskipped\t0\n' "$name" >> "$DEST/steps.tsv"
        FAILED=1
        return 0
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    echo "=== $name (timeout ${cap} s)"
    t0=$(date +%s)
    if [ -n "$tail_n" ]; then
        timeout --kill-after=10 "$cap" "$@" > "$log" 2>&1
        rc=$?
        [ "$tail_n" -gt 0 ] && tail -n "$tail_n" "$log"
        echo "(whole output: $log)"
    else
        timeout --kill-after=10 "$cap" "$@" 2>&1 | tee "$log"
        rc=${PIPESTATUS[0]}
    fi
    printf '%s\t%s\t%s\n' "$name" "$([ "$rc" -eq 0 ] && echo ok || echo "exit $rc")" \
        "$(($(date +%s) - t0))" >> "$DEST/steps.tsv"
    if [ "$rc" -ne 0 ]; then
        FAILED=1
        if [ "$rc" -eq 124 ]; then echo "=== $name: TIMED OUT after ${cap} s"
        else echo "=== $name: exit status $rc"; fi
    fi
    return 0
}

# the Python that has torch
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" 2>/dev/null
        then PY=$candidate; break; fi
    done
fi
if [ -z "$PY" ]; then
    echo "gpu_session: no python with torch found (set PYTHON=...)"
    exit 1
fi

# import name of a support wheel's distribution
module_of() {
    case "$1" in
        pillow) echo PIL ;;
        *) echo "${1//-/_}" ;;
    esac
}

# install_step NAME TARGET WHEEL...: pip's offline install, or unzipping when this Python has no pip
install_step() {
    local name=$1 target=$2
    shift 2
    mkdir -p "$target"
    if "$PY" -m pip --version >/dev/null 2>&1; then
        step "$name" 90 "$PY" -m pip install --no-index --no-deps --no-compile \
            --disable-pip-version-check --quiet --target "$target" "$@"
    else
        echo "no pip for $PY: unpacking the wheels"
        step "$name" 90 "$PY" -c \
            "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
            "$target" "$@"
    fi
}

main() {
    # -------------------------------------------------------------------------- 1. the machine
    echo "=== gpu_session $(date -u +%FT%TZ) in $(pwd), results in $DEST"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (no git here)')"
    if command -v nvidia-smi >/dev/null 2>&1; then
        step nvidia-smi 20 nvidia-smi
    else
        echo "=== nvidia-smi: not on this machine"
    fi
    step versions 60 "$PY" -c '
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| capability", f"{p.major}.{p.minor}", "|",
          round(p.total_memory / 2**30, 1), "GiB |", torch.cuda.device_count(), "device(s)")
else:
    print("no CUDA device: tests/test_cuda.py skips, the benchmarks run --tiny on the CPU")
'
    local cuda
    cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

    # ----------------------------------------------------------------------------- 2. wheels
    local site="" whl dist
    local -a pywheels=() cudart=()
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        site=$(mktemp -d /tmp/gpu_wheels.XXXXXX)
        for whl in "$WHEELS"/*.whl; do
            dist=$(basename "$whl" | cut -d- -f1 | tr 'A-Z_' 'a-z-')
            case "$dist" in
                nvidia-cuda-runtime-cu12) cudart+=("$whl") ;;
                xformers) pywheels+=("$whl"); export SLIME_EXPECT_XFORMERS=1 ;;
                *)
                    if "$PY" -c "import $(module_of "$dist")" 2>/dev/null; then
                        echo "have $dist: not installing $(basename "$whl")"
                    else
                        pywheels+=("$whl")
                    fi ;;
            esac
        done
        if [ ${#pywheels[@]} -gt 0 ]; then
            install_step "install ${#pywheels[@]} wheels" "$site/py" "${pywheels[@]}"
        fi
        # its own folder, off PYTHONPATH: its `nvidia` package must not shadow the one of torch
        if [ ${#cudart[@]} -gt 0 ]; then
            install_step "install libcudart.so.12" "$site/cudart" "${cudart[@]}"
        fi
        if [ -d "$site/cudart/nvidia/cuda_runtime/lib" ]; then
            export LD_LIBRARY_PATH="$site/cudart/nvidia/cuda_runtime/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        fi
    else
        echo "=== wheels: none in $WHEELS (fill it with benchmarks/fetch_gpu_wheels.sh)"
    fi
    export PYTHONPATH="$(pwd)${site:+:$site/py}${PYTHONPATH:+:$PYTHONPATH}"
    echo "PYTHONPATH=$PYTHONPATH"
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"

    # ------------------------------------------------------------------- 3. backend verdicts
    cat > "$DEST/backends.py" <<'PYEOF'
"""Probe verdicts of every attention backend and what `auto` picks, per dtype, dense and packed."""
import torch

from slime_adapters.ops.attention import BACKENDS, ProbeCache, backend_reasons, select_backend

try:
    import xformers
    print("xformers", xformers.__version__, "from", xformers.__file__)
except Exception as exc:  # report whatever stops it
    print("xformers does not import:", type(exc).__name__, exc)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
cache = ProbeCache()
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for lens in (None, [40, 24]):
        q = k = v = torch.randn(1 if lens else 2, 64, 4, 64, device=device, dtype=dtype)
        reasons = backend_reasons(q, k, v, seqlens=lens, probe_cache=cache)
        pick = select_backend(q, k, v, seqlens=lens, probe_cache=cache)
        verdicts = "; ".join(f"{b}: " + (" | ".join(reasons[b]) or "ok") for b in BACKENDS)
        print(f"{device} {str(dtype)[6:]:>8} {'packed' if lens else 'dense':>6}: "
              f"auto -> {pick}; {verdicts}")
PYEOF
    step backends 90 --log "$DEST/backends.txt" "$PY" "$DEST/backends.py"
    if [ -n "${SLIME_EXPECT_XFORMERS:-}" ]; then
        step xformers.info 60 --log "$DEST/xformers_info.txt" --tail 0 "$PY" -m xformers.info
    fi

    # ------------------------------------------------------------------------------ 4. tests
    step pytest 150 --log "$DEST/pytest.txt" --tail 60 "$PY" -m pytest -q -rfEsP -p no:cacheprovider \
        --junitxml="$DEST/pytest.xml" tests/test_cuda.py tests/test_attention.py

    # ------------------------------------------------------------------------- 5. benchmarks
    local -a size=()
    [ "$cuda" = 1 ] || size=(--tiny)
    step bench_attention 90 "$PY" -m benchmarks.bench_attention ${size[@]+"${size[@]}"} \
        --out "$DEST/results"
    step bench_stack 180 "$PY" -m benchmarks.bench_stack ${size[@]+"${size[@]}"} \
        --out "$DEST/results"

    # ---------------------------------------------------------------------------- summary
    echo "=== summary ($(($(date +%s) - START)) s of a ${BUDGET} s budget)"
    column -t -s $'\t' "$DEST/steps.tsv" 2>/dev/null || cat "$DEST/steps.tsv"
    echo "files in $DEST:"
    (cd "$DEST" && find . -type f | sort | sed 's/^/  /')
    return $FAILED
}

main 2>&1 | tee -a "$DEST/session.log"
exit "${PIPESTATUS[0]}"
