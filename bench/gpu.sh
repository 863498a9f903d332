#!/usr/bin/env bash
# Everything that needs a lent GPU, in ONE device call of at most 9 minutes (a lease is 15
# minutes in all, a minute or more of it to start the machine):
#
#   bench/gpu.sh fetch-wheels                here, once: bitsandbytes' wheel into .whl/ (git ignores it)
#   bash bench/gpu.sh                        on the GPU machine (device tool, carry [".whl"]): all stages
#   bash bench/gpu.sh smoke kernels          ... some stages, in this order
#
# Stages (bench/gpu_stages.py, each under its own timeout, seconds): preflight 30, smoke 150
# (bfloat16 first: most of it is compiling), kernels 150, decode 90, offload 100; 520 s in all.
# Each appends its lines to $OUT/<stage>.txt
# as they come, so a stage that times out keeps what it measured and the next still runs.
# QLITE_TUNE=1: the launchers time their short config whitelists once per shape (the kernel
# and decode stages then measure the tuned choice); the smoke stage uses fixed configs.
set -uo pipefail
cd "$(dirname "$0")/.."
declare -A LIMIT=([preflight]=30 [smoke]=150 [kernels]=150 [decode]=90 [offload]=100)
ORDER=(preflight smoke kernels decode offload)

if [ "${1:-}" = fetch-wheels ]; then
    grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        bitsandbytes==0.50.2
fi
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=("${ORDER[@]}")
for s in "${stages[@]}"; do
    [ -n "${LIMIT[$s]:-}" ] || { echo "unknown stage $s (stages: ${ORDER[*]})" >&2; exit 2; }
done

export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/qlite-gpu}" QLITE_CACHE="${OUT}/cache"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then  # the machine has no package index: carried wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || echo "carried wheels did not install" >&2
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"  # qlite from this checkout, not installed
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
} > "$OUT/machine.txt" 2>&1
rc=0
for s in "${stages[@]}"; do
    echo "== $s (limit ${LIMIT[$s]} s) $(date -u +%T)" | tee -a "$OUT/gpu.log"
    env QLITE_TUNE=$([ "$s" = smoke ] && echo 0 || echo 1) \
        timeout -k 5 "${LIMIT[$s]}" python3 bench/gpu_stages.py "$s" --out "$OUT" ${DRY_RUN:+--dry-run} \
        >> "$OUT/gpu.log" 2>&1
    r=$?
    echo "== $s exit $r" | tee -a "$OUT/gpu.log"
    [ $r -ne 0 ] && rc=1
done
tail -n 60 "$OUT/gpu.log"
exit "$rc"
