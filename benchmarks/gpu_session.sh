#!/usr/bin/env bash
# The GPU work of the benchmark issue as three device calls, each under the device tool's 10-minute
# limit (see benchmarks/README.md, "Running gpu-full"). Nothing here has run on a GPU yet.
#
#   bash benchmarks/gpu_session.sh wheels    # here, once: diffusers, torchao, optimum-quanto as wheels in .whl
#   bash benchmarks/gpu_session.sh check     # device: the test suite + the GPU micro benchmarks
#   bash benchmarks/gpu_session.sh bench-a   # device: gpu-full, diffusers' variants
#   bash benchmarks/gpu_session.sh bench-b   # device: gpu-full, the engine presets
#
# Device calls carry `.whl` and write under $OUT. PRESET (default gpu-full) and BENCH_ARGS (extra
# `fluxfill bench` arguments) are for trying the bench stages on a CPU with a small preset.
set -euo pipefail
cd "$(dirname "$0")/.."

# torchao 0.18 is the release built against torch 2.11 (the device image's torch).
DIFFUSERS_VERSION="${DIFFUSERS_VERSION:-0.42.1}"
TORCHAO_VERSION="${TORCHAO_VERSION:-0.18.0}"
QUANTO_VERSION="${QUANTO_VERSION:-0.2.7}"
PRESET="${PRESET:-gpu-full}"

usage() {
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

fetch_wheels() {
    local exclude
    exclude="$(git rev-parse --git-path info/exclude)"
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    # The device has Python 3.12 and none of these; importlib_metadata is diffusers' one missing need.
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        "diffusers==${DIFFUSERS_VERSION}" "torchao==${TORCHAO_VERSION}" \
        "optimum-quanto==${QUANTO_VERSION}" importlib_metadata
    ls -l .whl
}

device_setup() {
    : "${OUT:?OUT must name the folder for the results (the device tool sets it)}"
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
    fi
    # Run from the tree: the device cannot fetch the build backend for `pip install -e .`.
    export PYTHONPATH="$PWD:$PWD/kernels:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
    mkdir -p "$OUT"
    { nvidia-smi || true; python3 -c "import torch; print(torch.__version__, torch.version.cuda)"; } \
        > "$OUT/machine.txt" 2>&1
}

bench() {
    local part="$1" variants="$2"
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    python3 -m fluxfill_engine bench --preset "$PRESET" --no-progress --repeats 3 --warmup 1 \
        --variants "$variants" --out "$OUT/$PRESET-$part.json" --markdown --plot "$OUT/$PRESET-$part.png" \
        ${BENCH_ARGS:-}
}

case "${1:-}" in
    wheels) fetch_wheels ;;
    check)
        device_setup
        # The whole suite (the kernels' bf16 cases at FLUX shapes run only on a GPU), then the micro
        # benchmarks at the real shapes; one failing does not stop the other.
        status=0
        # --dist loadfile: one worker per file, so the native library (a session fixture) builds once.
        parallel=$(python3 -c "import xdist" 2> /dev/null && echo "-n 8 --dist loadfile" || true)
        # shellcheck disable=SC2086  # $parallel is empty or a list of arguments
        python3 -m pytest -q -p no:cacheprovider $parallel --junitxml "$OUT/tests-gpu.xml" tests \
            2>&1 | tee "$OUT/tests-gpu.txt" || status=1
        python3 -m pytest -q -p no:cacheprovider benchmarks --benchmark-only -m gpu \
            --benchmark-json "$OUT/micro-gpu.json" 2>&1 | tee "$OUT/micro-gpu.txt" || status=1
        exit "$status"
        ;;
    # Baselines (diffusers, reference) are added to each part, so both parts have ratios and drift.
    bench-a) device_setup && bench a diffusers-compile,diffusers-fp8-compile,diffusers-fbcache ;;
    bench-b) device_setup && bench b balanced,fast,fastest ;;
    *) usage ;;
esac
