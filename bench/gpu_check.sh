#!/usr/bin/env bash
# bench/gpu_check.sh -- everything one scarce GPU call should do, in well under its 10-minute limit.
#
# Steps: versions and nvidia-smi; offline install (which builds the CUDA extension); the GPU tests
# (`pytest -m gpu`); the rest of the suite with QWEN2VL_FAST_TEST_DEVICE=cuda; the full-model forward
# benchmark on the qwen2-vl-2b and qwen2.5-vl-3b presets. Each step runs under `timeout`, inside one overall
# budget; a failed step is reported and the next one still runs. A summary table is printed last.
#
# Usage, from the repository root (on the lent GPU machine `$OUT` is the folder that comes back):
#     bash bench/gpu_check.sh
#     QWEN2VL_FAST_GIT_COMMIT=<hash here> GPU_CHECK_STEPS="install bench-2b" bash bench/gpu_check.sh
# Output: everything tee'd to ${OUT:-bench/results/_scratch}/gpu_check.log; result JSON files in bench/results
# and copied next to the log (QWEN2VL_FAST_BENCH_OUT). At most 8 files come back from $OUT: keep it that way.
# Knobs (environment): GPU_CHECK_STEPS (default: all of env install gpu-tests tests bench-2b bench-3b),
# GPU_CHECK_BUDGET_S (default 560 s for everything), PYTHON (default python3), BENCH_REPS (default 10),
# BENCH_GEN_REPS (default 3, for bench_generate and bench_quant_decode). Opt-in steps, named in GPU_CHECK_STEPS
# only: generate-2b, llm-kernels, generate-7b (decode/prefill vs transformers; the LLM kernels vs SDPA /
# torch.compile), quant-decode (7B decode tok/s with bf16 / int8 / int4 weights, built in memory: no
# checkpoint), quant-decode-72b (the 72B preset in int4 on one GPU, ~42 GiB), sanitize (compute-sanitizer
# memcheck and racecheck on the CUDA C++ kernels' small GPU tests: out-of-bounds accesses, shared-memory races).
# The copied tree has no .git there: pass the commit as QWEN2VL_FAST_GIT_COMMIT (and _DIRTY=1 if so).
# Packages the GPU image lacks (PyAV for the video tests and benchmark) travel as wheels in .whl/ (git-ignored;
# name it in the run's `carry`), prepared here with:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl av==18.1.0

set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-bench/results/_scratch}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
PY="${PYTHON:-python3}"  # the lent machines have python3 (with torch), maybe no `python`
STEPS="${GPU_CHECK_STEPS:-env install gpu-tests tests vision-kernels vision-tower bench-2b bench-3b processing}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-560}"
REPS="${BENCH_REPS:-10}"
GEN_REPS="${BENCH_GEN_REPS:-3}"  # generate runs are seconds each (transformers eager: 128 steps of ~30 ms)
export PYTHONUNBUFFERED=1
export QWEN2VL_FAST_BENCH_OUT="$OUT_DIR"
export MAX_JOBS="${MAX_JOBS:-16}"  # parallel nvcc jobs for the extension build (torch cpp_extension)

SUMMARY=()
FAILED=0

# step NAME LIMIT_S CMD...: run CMD under `timeout`, capped by what is left of the overall budget.
step() {
    local name=$1 limit=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    local left=$((BUDGET_S - SECONDS - 5))
    if ((left < limit)); then limit=$left; fi
    if ((limit < 15)); then
        SUMMARY+=("$(printf '%-10s %-16s %6s' "$name" "skipped (budget)" "-")")
        FAILED=$((FAILED + 1))
        return 0
    fi
    echo
    echo "=== [$name] limit ${limit}s: $*"
    local start=$SECONDS rc
    timeout -k 10 "$limit" "$@"
    rc=$?
    local took=$((SECONDS - start)) verdict="ok"
    if ((rc == 124 || rc == 137)); then verdict="TIMEOUT"; elif ((rc != 0)); then verdict="FAILED rc=$rc"; fi
    if [[ $name == *tests && $rc == 5 ]]; then verdict="no tests"; fi  # pytest: nothing collected
    [[ $verdict == ok || $verdict == "no tests" ]] || FAILED=$((FAILED + 1))
    echo "=== [$name] $verdict in ${took}s"
    SUMMARY+=("$(printf '%-10s %-16s %5ss' "$name" "$verdict" "$took")")
}

main() {
    echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ)  steps: $STEPS  budget: ${BUDGET_S}s  out: $OUT_DIR"
    if compgen -G ".whl/*.whl" >/dev/null; then  # carried wheels (see the header), outside the image's venv
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
            && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    step env 60 bash -c "nvidia-smi; $PY -c 'import sys, torch; print(\"python\", sys.version.split()[0]);
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available())
print(\"device\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
$PY -m pip list 2>/dev/null | grep -i -E '^(triton|transformers|safetensors|numpy|pytest|setuptools) '"
    # No network there: --no-index --no-deps keep pip from retrying an index it cannot reach.
    step install 240 "$PY" -m pip install --no-build-isolation --no-index --no-deps -e .
    step gpu-tests 120 "$PY" -m pytest -q -m gpu tests
    step tests 150 env QWEN2VL_FAST_TEST_DEVICE=cuda "$PY" -m pytest -q -x -m "not gpu" tests
    step vision-kernels 240 "$PY" bench/bench_vision_kernels.py --reps 30
    step vision-tower 240 "$PY" bench/bench_vision_tower.py --reps "$REPS"
    step bench-2b 200 "$PY" bench/bench_model_forward.py --preset qwen2-vl-2b --reps "$REPS"
    step bench-3b 220 "$PY" bench/bench_model_forward.py --preset qwen2.5-vl-3b --reps "$REPS"
    step processing 120 "$PY" bench/bench_processing.py --device cuda --reps 5
    step quant 300 "$PY" bench/bench_quant.py --reps 30
    # Generation benchmarks: not in the default STEPS (each can take most of a call); name them, one per call:
    # GPU_CHECK_STEPS="install generate-2b", "install llm-kernels", "install generate-7b" (the 7B checkpoint
    # alone is ~16 GB of random weights to write first).
    step generate-2b 420 "$PY" bench/bench_generate.py --presets qwen2-vl-2b --batches 1 4 16 64 --new-tokens 128 \
        --reps "$GEN_REPS"
    step llm-kernels 360 "$PY" bench/bench_llm_kernels.py --reps 30
    step generate-7b 480 "$PY" bench/bench_generate.py --presets qwen2-vl-7b --batches 1 16 --new-tokens 128 \
        --reps "$GEN_REPS"
    step sanitize 300 bash -c "compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -q -m gpu \
tests/test_cuda_quant_decode.py -k 'gpu_decode and (72-96 or 200-384)' && compute-sanitizer --tool racecheck \
--error-exitcode 9 $PY -m pytest -q -m gpu tests/test_cuda_quant_decode.py -k 'gpu_decode and 200-384 and bf16'"
    # Quantized decode: random weights built on the GPU (the 72B never exists in bf16, on disk or in memory).
    step quant-decode 480 "$PY" bench/bench_quant_decode.py --presets qwen2-vl-7b --batches 1 16 --new-tokens 128 \
        --reps "$GEN_REPS"
    step quant-decode-72b 480 "$PY" bench/bench_quant_decode.py --presets qwen2-vl-72b --weights int4 \
        --batches 1 16 --new-tokens 128 --reps "$GEN_REPS"

    echo
    echo "=== summary (${SECONDS}s of ${BUDGET_S}s budget; log: $LOG)"
    printf '%s\n' "${SUMMARY[@]}"
    return $((FAILED > 0))
}

main 2>&1 | tee "$LOG"
