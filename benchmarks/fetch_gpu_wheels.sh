#!/usr/bin/env bash
# Download, on a networked machine, the wheels that benchmarks/gpu_session.sh installs offline on a
# GPU machine (torch 2.11.0+cu130, CPython 3.12, x86_64, no network):
#
#   xformers 0.0.35                 the only release that admits torch >= 2.11
#   nvidia-cuda-runtime-cu12 12.8.90  libcudart.so.12, which xformers' CUDA extension links against
#                                   (the machine's CUDA 13 torch ships libcudart.so.13 only)
#   support set                     what the package, its tests and benchmarks import beyond torch
#                                   (einops, numpy, pillow, safetensors, pytest and its
#                                   dependencies, setuptools for torch.utils.benchmark);
#                                   gpu_session.sh installs each only when the machine lacks it
#
# Usage (from the repository root):  bash benchmarks/fetch_gpu_wheels.sh [DEST]
# DEST defaults to benchmarks/wheels/ (git-ignored; carry it to the GPU machine with the tree).
set -euo pipefail

cd "$(dirname "$0")/.."
DEST=${1:-benchmarks/wheels}
PY=${PYTHON:-python3}
mkdir -p "$DEST"

# Manylinux tags a glibc >= 2.28 machine accepts (torch 2.11's own wheels are manylinux_2_28), newest
# first; pip takes the repeated --platform as "any of these".
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64
           manylinux_2_17_x86_64 manylinux2014_x86_64)
PLATFORM_ARGS=()
for p in "${PLATFORMS[@]}"; do PLATFORM_ARGS+=(--platform "$p"); done

download() {
    "$PY" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
        --implementation cp --python-version 3.12 "${PLATFORM_ARGS[@]}" -d "$DEST" "$@"
}

download "xformers==0.0.35" "nvidia-cuda-runtime-cu12==12.8.90"
download "einops==0.8.2" "numpy==2.4.6" "pillow==13.0.0" "safetensors==0.8.0" \
    "pytest==9.2.0" "pluggy==1.7.0" "iniconfig==2.3.1" "packaging==26.4" "pygments==2.21.0" \
    "setuptools"

echo "wheels in $DEST:"
ls -l "$DEST"/*.whl | awk '{printf "  %-80s %6.1f MB\n", $9, $5 / 1e6}'
du -sh "$DEST"
