#!/usr/bin/env bash
# The whole GPU run as one prepared command: `fluxfill bench gpu-run`'s five parts in at most 8.5
# minutes on one H200 (see benchmarks/README.md, "The GPU run").
#
#   bash benchmarks/gpu_run.sh wheels            here, once: the wheels the device image lacks, into .whl
#   bash benchmarks/gpu_run.sh [run] [ARGS...]   device: install .whl, run gpu-run --out "$OUT" ARGS
#   bash benchmarks/gpu_run.sh dry-run [ARGS...] anywhere: the same code on the CPU at a tiny size
#
# The device tool calls (15 minutes of device time: a start of up to 2, this call, the optional second):
#   run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=540)
#   then at once, if the reply's lease.budget_left_s is 200 or more (the levers, on the warm machine):
#   run(command="bash benchmarks/gpu_run.sh run --parts latency --rows lever --budget-s 130",
#       carry=[".whl"], timeout_s=190), then give_back().
# ARGS go to gpu-run (--parts, --rows, --budget-s; see fluxfill bench gpu-run --help).
set -euo pipefail
cd "$(dirname "$0")/.."

# The device image has torch 2.11 and none of these. torchao 0.17 is the release paired with torch 2.11:
# its C++ extensions load from torch 2.11 on (its own import check) and ExecuTorch's torch-2.11 release
# pins it; its row-wise fp8 (torch._scaled_mm) needs none of them anyway. importlib_metadata is a declared need of diffusers
# (which uses the standard library's on Python 3.12); 8.7 needs only zipp, which the image has (the
# newest, 10.2, also needs lazy-importer, which it lacks).
DIFFUSERS_VERSION="${DIFFUSERS_VERSION:-0.42.1}"
TORCHAO_VERSION="${TORCHAO_VERSION:-0.17.0}"
QUANTO_VERSION="${QUANTO_VERSION:-0.2.7}"
IMPORTLIB_METADATA_VERSION="${IMPORTLIB_METADATA_VERSION:-8.7.0}"

usage() {
    # The comment block at the top of this file.
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
}

fetch_wheels() {
    local exclude
    exclude="$(git rev-parse --git-path info/exclude)"
    mkdir -p "$(dirname "$exclude")" .whl
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    # One version of each package: two versions of one wheel stop the whole install on the device.
    rm -f .whl/*.whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
        "diffusers==${DIFFUSERS_VERSION}" "torchao==${TORCHAO_VERSION}" \
        "optimum-quanto==${QUANTO_VERSION}" "importlib_metadata==${IMPORTLIB_METADATA_VERSION}"
    ls -l .whl
}

device_run() {
    : "${OUT:?OUT must name the folder for the results (the device tool sets it)}"
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
    else
        echo "gpu_run.sh: no wheels in .whl (bash benchmarks/gpu_run.sh wheels, then carry .whl);" \
            "the run stops at once if diffusers, torchao or optimum-quanto does not import" >&2
    fi
    # Run from the tree: the device cannot fetch the build backend for `pip install -e .`.
    export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    mkdir -p "$OUT"
    python3 -m fluxfill_engine bench gpu-run --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_run.log"
}

action="${1:-run}"
[[ $# -gt 0 ]] && shift
case "$action" in
    wheels) fetch_wheels ;;
    run) device_run "$@" ;;
    dry-run)
        export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
        python3 -m fluxfill_engine bench gpu-run --dry-run --out "${OUT:-gpu-run-dry}" "$@"
        ;;
    *) usage ;;
esac
