#!/usr/bin/env bash
# Everything that needs a lent GPU, for few, full device calls (BENCHMARKS.md, "Still to take").
#
#   bench/gpu.sh fetch-wheels     here, once: bitsandbytes' wheel into .whl/ (git ignores it)
#   bash bench/gpu.sh tests       on the GPU machine (device tool, carry [".whl"]): CUDA tests
#   bash bench/gpu.sh kernels     ... the Triton kernel table (bench_kernels.py)
#   bash bench/gpu.sh offload     ... the expert-offloading table (bench_offload.py)
#
# Each stage stays well inside the tool's 10-minute limit and copies its log and new tables to
# $OUT (what comes back). Commit the tables under bench/results/ with the GPU's name and date.
set -uo pipefail
cd "$(dirname "$0")/.."
stage="${1:?stage: fetch-wheels, tests, kernels or offload}"

if [ "$stage" = fetch-wheels ]; then
    grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        bitsandbytes==0.50.2
fi

export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/qlite-gpu}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then  # the machine has no package index: carried wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"  # qlite from this checkout, not installed
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/machine.txt" 2>&1
stamp=$(mktemp) && touch "$stamp"
case "$stage" in
    tests) python3 -m pytest -q -m cuda tests/test_kernels.py tests/test_quant.py \
               tests/test_offload.py 2>&1 | tee "$OUT/cuda-tests.log" ;;
    kernels) python3 bench/bench_kernels.py 2>&1 | tee "$OUT/bench_kernels.log" ;;
    offload) python3 bench/bench_offload.py 2>&1 | tee "$OUT/bench_offload.log" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
rc=${PIPESTATUS[0]}
find bench/results -name '*.md' -newer "$stamp" -exec cp {} "$OUT"/ \;  # the tables it wrote
exit "$rc"
