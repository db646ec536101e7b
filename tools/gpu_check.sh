#!/usr/bin/env bash
# One prepared GPU check, for a machine lent with a GPU (image: torch and transformers installed, no
# network): installs this checkout, runs the CUDA tests, then expertflow-bench on the Mixtral-8x7B-
# and Qwen3-30B-A3B-shaped loads (accelerate's offload row too, when it is installed), and writes
# every result into OUT_DIR as JSON and Markdown (summary.json: each step's exit status and seconds).
# Each step has its own time limit and the next runs whatever the last gave, so the whole fits in one
# call of 8 minutes. Without a usable CUDA device it stops at once, before installing anything.
#
# usage: bash tools/gpu_check.sh OUT_DIR
set -uo pipefail
if [ $# -ne 1 ]; then
    echo "usage: bash tools/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
OUT=$1
cd "$(dirname "$0")/.."
mkdir -p "$OUT" || exit 2
PY=${PYTHON:-python3}

# seconds: install, CUDA tests, each bench: 45 + 200 + 2 x 110 = 465, under the call's 480
LIMITS=(45 200 110 110)

if ! timeout 60 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no usable CUDA device here (torch.cuda.is_available() is False, or torch is missing): run it on a GPU machine" >&2
    printf '{"cuda": false, "steps": []}\n' > "$OUT/summary.json"
    exit 3
fi
"$PY" -c "import torch, transformers; print(torch.cuda.get_device_name(0), torch.__version__, transformers.__version__)" \
    > "$OUT/device.txt" 2>&1

steps=()
run() {  # run NAME LIMIT COMMAND...: the step's output in OUT/NAME.log, its status and time in summary.json
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    steps+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start)), \"limit\": $limit}")
    echo "gpu_check: $name rc=$rc in $((SECONDS - start)) s (log: $OUT/$name.log)"
}

run install "${LIMITS[0]}" "$PY" -m pip install --no-deps --no-build-isolation -e .
run cuda_tests "${LIMITS[1]}" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests --junitxml="$OUT/cuda_tests.xml"
for load in load-mixtral-8x7b-shaped load-qwen3-30b-a3b-shaped; do
    run "bench-$load" "${LIMITS[2]}" "$PY" -m expertflow.tools.cli.bench "$load" --device cuda --budget 25% \
        --tokens 32 --repeats 2 --skip-compile-memory --json "$OUT/bench-$load.json" --markdown "$OUT/bench-$load.md"
done

{
    printf '{"cuda": true, "device": "%s", "steps": [' "$(head -1 "$OUT/device.txt" | tr -d '"\\')"
    (IFS=,; printf '%s' "${steps[*]}")
    printf ']}\n'
} > "$OUT/summary.json"
cat "$OUT/summary.json"
