#!/usr/bin/env bash
# The GPU run rehearsed on a CPU under the GPU machine's versions: what fails here would fail there.
#
#   bash benchmarks/rehearse_gpu_versions.sh [VENV]
#
# VENV (default $REHEARSAL_VENV, else ~/.cache/fluxfill-engine/venv-gpu-versions): a virtual environment
# pinned to the device image's torch 2.11.0 (PyPI's CUDA build, which runs on a CPU), triton 3.6.0,
# transformers 5.17.0 and accelerate 1.15.0, and to the wheels the run carries there (diffusers 0.42.1,
# torchao 0.17.0, optimum-quanto 0.2.7), with pytest, cmake and ninja. Reused when its versions match;
# otherwise created (about 5 GB: torch's CUDA wheels) or given the pinned versions (nothing is
# deleted). The project itself is not installed: it runs from the tree, as on the device.
#
# Then, each timed, all run even when one fails (the exit status says whether any did):
#   1. the GPU run's dry run (fluxfill bench gpu-run --dry-run): every part and every variant, the
#      native library built by torch 2.11's CMake config (for sm_90 where nvcc is installed);
#   2. the sm_90 compile of every Triton kernel with Triton 3.6's ptxas
#      (tests/kernels/test_kernels_compile_for_hopper.py).
# The dry run's JSON and table go to $REHEARSAL_OUT (default: a temporary folder), named at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

PINS=(
    "torch==2.11.0" "triton==3.6.0" "transformers==5.17.0" "accelerate==1.15.0"
    "diffusers==0.42.1" "torchao==0.17.0" "optimum-quanto==0.2.7"
)
TOOLS=("pytest" "cmake" "ninja" "importlib_metadata==8.7.0")
VENV="${1:-${REHEARSAL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fluxfill-engine/venv-gpu-versions}}"

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
}
[[ "${1:-}" == -h || "${1:-}" == --help ]] && usage

pins_match() {  # the venv has every pinned version (and the tools)
    [[ -x "$VENV/bin/python" ]] || return 1
    "$VENV/bin/python" - "${PINS[@]}" <<'EOF'
import sys
from importlib import metadata

for pin in sys.argv[1:]:
    name, version = pin.split("==")
    try:
        found = metadata.version(name)
    except metadata.PackageNotFoundError:
        sys.exit(1)
    if found.split("+")[0] != version:
        sys.exit(1)
for tool in ("pytest", "cmake", "ninja"):
    metadata.version(tool)
EOF
}

start=$SECONDS
if pins_match; then
    echo "rehearsal: reusing $VENV (versions match)"
else
    # Never deletes anything: a missing venv is created, an existing one gets the pinned versions.
    echo "rehearsal: installing into $VENV: ${PINS[*]}"
    [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "${PINS[@]}" "${TOOLS[@]}"
    pins_match || { echo "rehearsal: $VENV does not hold the pinned versions after installing" >&2; exit 1; }
fi
echo "rehearsal: environment took $((SECONDS - start)) s"

# As on the device: the tree on PYTHONPATH, pip's cmake and ninja first on PATH, and one GPU
# architecture for torch's CMake config (the GPU run sets it from the device; without a GPU torch's
# config would try to detect one and fail).
export PATH="$VENV/bin:$PATH" PYTHONPATH="$PWD:$PWD/kernels" PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
out="${REHEARSAL_OUT:-$(mktemp -d -t fluxfill-rehearsal-XXXXXX)}"
failed=()

step() {  # step NAME COMMAND...: run it, say how long it took and whether it passed
    local name="$1" begin=$SECONDS
    shift
    echo "+ $*"
    if "$@"; then
        echo "rehearsal: $name passed in $((SECONDS - begin)) s"
    else
        echo "rehearsal: $name FAILED in $((SECONDS - begin)) s"
        failed+=("$name")
    fi
}

step "dry run" "$VENV/bin/python" -m fluxfill_engine bench gpu-run --dry-run --out "$out"
step "sm_90 compile" "$VENV/bin/python" -m pytest -q -p no:cacheprovider -o addopts= \
    tests/kernels/test_kernels_compile_for_hopper.py
echo "rehearsal: the dry run's record: $out/gpu_run.json (table: $out/gpu_run.txt)"
echo "rehearsal: $((SECONDS - start)) s in all"
if ((${#failed[@]})); then
    echo "rehearsal: FAILED under the GPU machine's versions: ${failed[*]}" >&2
    exit 1
fi
echo "rehearsal: passed under the GPU machine's versions"
