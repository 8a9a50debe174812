#!/usr/bin/env bash
# One device call, many steps: build rocket, then run the named steps, each under its own time limit
# and stopped with SIGINT (pytest still prints its summary), writing logs and JSON to $OUT.
#   bash bench/device_run.sh [--no-build] STEP...   steps: gputests kernels trainrun lora_moe headline
#                                                   scoring scale train train7b augment profile7b bordered
# Carried wheels (faiss-cpu, ...) in .whl/ are installed to /tmp/site first. ROCKET_COMMIT names the
# commit in the JSON (the device copy has no .git); AUGMENT_LIMIT the augment step's seconds (500).
set -u
OUT=${OUT:-/tmp/rocket-out}; mkdir -p "$OUT"
export ROCKET_BENCH_RESULTS=$OUT PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} MAX_JOBS=${MAX_JOBS:-16}
t0=$(date +%s)
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
if [ "${1:-}" = "--no-build" ]; then shift
elif ! python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.txt" 2>&1; then
    tail -30 "$OUT/build.txt"; exit 1
fi
echo "ready after $(( $(date +%s) - t0 )) s on $(nvidia-smi --query-gpu=name --format=csv,noheader)"
run() {  # name, limit in seconds, pytest arguments...
    local name=$1 limit=$2; shift 2
    timeout -s INT "$limit" python3 -m pytest -q -p no:cacheprovider -o addopts="" "$@" > "$OUT/$name.txt" 2>&1
    tail -4 "$OUT/$name.txt"; echo "== $name done at $(( $(date +%s) - t0 )) s"
}
bench() { run "$@" --benchmark-enable -s; }
profile() {  # bench.profile_moe part, limit in seconds
    timeout -s INT "$2" python3 -m bench.profile_moe "$1" > "$OUT/profile_$1.txt" 2>&1
    tail -4 "$OUT/profile_$1.txt"; echo "== profile $1 done at $(( $(date +%s) - t0 )) s"
}
for step in "$@"; do
    case $step in
        gputests) run gpu_tests 300 -m gpu tests -ra ;;
        kernels)  run kernel_tests 300 tests/test_llama_ops_kernel.py tests/test_lora_moe_kernel.py -ra ;;
        trainrun) run train_tests 200 -m gpu tests/test_train.py tests/test_moe.py -ra ;;
        lora_moe) bench bench_lora_moe 550 bench/test_lora_moe.py ;;
        headline) ROCKET_BENCH_SHAPES=headline bench bench_lora_moe 200 bench/test_lora_moe.py ;;
        scoring)  bench bench_scoring 250 bench/test_scoring.py ;;
        scale)    bench bench_scoring_scale 330 bench/test_scoring_scale.py ;;
        train)    bench bench_train 300 bench/test_train.py ;;
        train7b)  ROCKET_BENCH_SHAPES=7b bench bench_train7b 240 bench/test_train.py ;;
        augment)  bench bench_augment_scale "${AUGMENT_LIMIT:-500}" bench/test_augment_scale.py ;;
        profile7b) profile train7b 240 ;;
        bordered)  profile bordered 120 ;;
        *) echo "unknown step $step"; exit 2 ;;
    esac
done
