#!/usr/bin/env bash
# bench/gpu_check.sh -- everything one scarce GPU call should do, inside its 10-minute limit with margin.
#
# Default steps and their expected seconds on one H200 with 16 cores: measured by the first run (2026-11-30,
# bench/results/gpu_check-nvidia-h200-20261130.md) except bench-2b-compile's compile share, an estimate:
#   env             7   nvidia-smi, versions
#   install        26   pip install -e . offline, the CUDA extension built for sm_90a only (QWEN2VL_FAST_CUDA_ARCHS)
#   diagnose-ext   45   bench/diagnose_cuda_ext_errors.py: the bad-input calls of _C that crashed there, each in its own
#                       process (an estimate: not yet run), before the tests that make the same calls
#   gpu-tests      92   pytest -m gpu (pytest-xdist with 4 workers where installed: the Triton compiles overlap)
#   gemm           44   bench_gemm.py: the 27 GEMM shapes (vision 6144/1536 rows, LLM M = 1, lm_head at M = 1
#                       and 1600) vs cuBLAS, torch.compile and the measured dispatch
#   vision-tower   36   bench_vision_tower.py 1344x896, Qwen2-VL and Qwen2.5-VL ViTs, ours (auto) vs transformers
#   bench-2b-compile 160  bench_model_forward.py qwen2-vl-2b, ours (auto, tuned) vs transformers sdpa and
#                       transformers + torch.compile, then transformers once in fp32 for the bf16 parity rule
#                       (bench-2b alone, without the compiled side: 55 s)
#   total         410   of the 560 s budget (GPU_CHECK_BUDGET_S): one call that, with a cold start, fits a
#                       session's 15 minutes of device time
# Opt-in steps (name them in GPU_CHECK_STEPS; expected seconds): tests (the whole suite on CUDA, 150), decode-tests
# (issue 13's kernels, the device-resident decode step and its graphs, on CUDA: 120 expected, not yet measured),
# vision-kernels (attention / norms / rotary / patch embedding vs SDPA backends and torch.compile; 240 expected, not yet
# measured: the first run timed out after its first case (likely a host-blocking candidate in the queue fallback,
# retried with unbounded spins: bounded in bench/harness.py); it now stops itself at the step's limit less 20 s and
# keeps its finished cases and candidates, each case within 60 s), bench-2b (without the compiled side, 55), bench-3b
# (qwen2.5-vl-3b, with compile, 300), processing (preprocessing on CPU and GPU, 60), quant (int4/int8 GEMMs vs cuBLAS
# bf16, 7B and 72B layers, 200), llm-kernels (decoder attention / rope / norms vs SDPA and torch.compile, 200),
# generate-2b (decode tok/s and prefill vs transformers eager and static cache + compile, 420), generate-7b (480, writes
# a 16 GB checkpoint first), quant-decode (7B decode tok/s bf16 / int8 / int4, 480), quant-decode-72b (72B int4 on one
# GPU, 480), sanitize (compute-sanitizer memcheck + racecheck on the CUDA decode GEMM's tests, 300), serve-2b
# (bench_serve.py, engine target: 128 mixed image prompts at rate inf and 8 req/s vs static generate batches; 150
# expected, not yet measured), serve-http-2b (the same through `qwen2vl-fast serve` over HTTP, the server started by the
# script, then the baseline in-process; 200 expected, not yet measured), suites-ops (`pytest bench --benchmark-only
# --bench-suites ops`: writes $OUT/bench_suites.json, 180 expected, not yet measured).
#
# Every step runs under `timeout`, capped by what is left of the budget (a step that would get < 15 s is skipped);
# a failed or timed-out step is reported and the next one still runs. A step's command sees
# QWEN2VL_FAST_BENCH_BUDGET_S (its limit less 20 s): budgeted benchmarks (bench_vision_kernels.py) stop by
# themselves and write what they timed. What comes back from $OUT (at most 8 files; this writes 3, and
# diagnose-ext a 4th):
#   gpu_check.log          everything printed;
#   gpu_check_summary.txt  one line per step (verdict, seconds taken, seconds expected), appended as each step
#                          starts and ends, so it is there even when the call itself is cut off;
#   bench_results.json     every result JSON of the run ({"files": {name: document}}), rewritten after each
#                          benchmark case (QWEN2VL_FAST_BENCH_BUNDLE), so a timed-out step keeps its finished
#                          cases. Unpack it here with: python bench/results.py unbundle bench_results.json
#
# Usage, from the repository root (on the lent GPU machine `$OUT` is the folder that comes back):
#     QWEN2VL_FAST_GIT_COMMIT=<hash here> bash bench/gpu_check.sh
#     QWEN2VL_FAST_GIT_COMMIT=<hash> GPU_CHECK_STEPS="env install vision-kernels llm-kernels" bash bench/gpu_check.sh
# Knobs (environment): GPU_CHECK_STEPS (default: env install diagnose-ext gpu-tests gemm vision-tower
# bench-2b-compile),
# GPU_CHECK_BUDGET_S (default 560), GPU_CHECK_TEST_WORKERS (pytest-xdist workers, default 4; 0: serial),
# PYTHON (default python3), BENCH_REPS (default 10, model-level benchmarks), KERNEL_REPS (default 30, kernel
# benchmarks: graph replays), BENCH_GEN_REPS (default 3, bench_generate and bench_quant_decode),
# QWEN2VL_FAST_CUDA_ARCHS (default 90a: the lent machines are Hopper; "80;90a" builds for A100 too, ~2x the time).
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
SUMMARY_FILE="$OUT_DIR/gpu_check_summary.txt"
PY="${PYTHON:-python3}"  # the lent machines have python3 (with torch), maybe no `python`
STEPS="${GPU_CHECK_STEPS:-env install diagnose-ext gpu-tests gemm vision-tower bench-2b-compile}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-560}"
REPS="${BENCH_REPS:-10}"
KREPS="${KERNEL_REPS:-30}"
GEN_REPS="${BENCH_GEN_REPS:-3}"  # generate runs are seconds each (transformers eager: 128 steps of ~30 ms)
WORKERS="${GPU_CHECK_TEST_WORKERS:-4}"
RESERVE_S=5  # for the summary after the last step
export PYTHONUNBUFFERED=1
export QWEN2VL_FAST_BENCH_BUNDLE="$OUT_DIR/bench_results.json"
unset QWEN2VL_FAST_BENCH_OUT  # one bundle instead of a file per result: the 8-file limit of $OUT
export MAX_JOBS="${MAX_JOBS:-16}"  # parallel nvcc jobs for the extension build (torch cpp_extension)
export QWEN2VL_FAST_CUDA_ARCHS="${QWEN2VL_FAST_CUDA_ARCHS:-90a}"

SUMMARY=()
FAILED=0

summary_line() {  # name verdict took expected
    printf '%-17s %-16s %6s %9s' "$1" "$2" "$3" "$4"
}

# step NAME EXPECTED_S LIMIT_S CMD...: run CMD under `timeout`, capped by what is left of the overall budget.
step() {
    local name=$1 expected=$2 limit=$3
    shift 3
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    local left=$((BUDGET_S - SECONDS - RESERVE_S))
    if ((left < limit)); then limit=$left; fi
    if ((limit < 15)); then
        SUMMARY+=("$(summary_line "$name" "skipped (budget)" "-" "${expected}s")")
        echo "${SUMMARY[-1]}" >>"$SUMMARY_FILE"
        FAILED=$((FAILED + 1))
        return 0
    fi
    echo
    echo "=== [$name] limit ${limit}s (expected ${expected}s): $*"
    echo "$(summary_line "$name" "running" "..." "${expected}s")  started at ${SECONDS}s" >>"$SUMMARY_FILE"
    local start=$SECONDS rc
    # Benchmarks that take a time budget (bench/compare.py Budget: bench_vision_kernels.py) stop by themselves
    # before the step's `timeout`, and write what they timed; the margin covers the write and the exit.
    QWEN2VL_FAST_BENCH_BUDGET_S=$((limit > 40 ? limit - 20 : limit * 2 / 3)) timeout -k 10 "$limit" "$@"
    rc=$?
    local took=$((SECONDS - start)) verdict="ok"
    if ((rc == 124 || rc == 137)); then verdict="TIMEOUT"; elif ((rc != 0)); then verdict="FAILED rc=$rc"; fi
    if [[ $name == *tests && $rc == 5 ]]; then verdict="no tests"; fi  # pytest: nothing collected
    [[ $verdict == ok || $verdict == "no tests" ]] || FAILED=$((FAILED + 1))
    echo "=== [$name] $verdict in ${took}s (expected ${expected}s)"
    SUMMARY+=("$(summary_line "$name" "$verdict" "${took}s" "${expected}s")")
    echo "${SUMMARY[-1]}" >>"$SUMMARY_FILE"
}

# pytest arguments that spread the tests over WORKERS processes where pytest-xdist is installed.
parallel_tests() {
    if ((WORKERS > 0)) && "$PY" -c "import xdist" 2>/dev/null; then
        echo "-n $WORKERS"
    fi
}

finish() {
    echo
    echo "=== summary (${SECONDS}s of ${BUDGET_S}s budget; log: $LOG; results: $QWEN2VL_FAST_BENCH_BUNDLE)"
    summary_line step verdict took expected
    echo
    printf '%s\n' "${SUMMARY[@]}"
}

main() {
    echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ)  steps: $STEPS  budget: ${BUDGET_S}s  out: $OUT_DIR"
    echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) steps: $STEPS budget: ${BUDGET_S}s" >"$SUMMARY_FILE"
    if compgen -G ".whl/*.whl" >/dev/null; then  # carried wheels (see the header), outside the image's venv
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
            && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    step env 5 60 bash -c "nvidia-smi; $PY -c 'import sys, torch; print(\"python\", sys.version.split()[0]);
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available())
print(\"device\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
$PY -m pip list 2>/dev/null | grep -i -E '^(triton|transformers|safetensors|numpy|pytest|pytest-xdist|setuptools) '"
    # No network there: --no-index --no-deps keep pip from retrying an index it cannot reach.
    step install 26 120 env QWEN2VL_FAST_REQUIRE_CUDA_EXT=1 "$PY" -m pip install --no-build-isolation --no-index --no-deps -e .
    # Which bad-input calls of _C crash instead of raising (views vs integers in the message; each call in its
    # own process; the environment's libstdc++ and compilers): writes $OUT/cuda_ext_errors.json.
    step diagnose-ext 45 120 "$PY" bench/diagnose_cuda_ext_errors.py --out "$OUT_DIR"
    # shellcheck disable=SC2046  # the xdist arguments are meant to split
    step gpu-tests 92 150 "$PY" -m pytest -q -m gpu $(parallel_tests) tests
    step gemm 44 120 "$PY" bench/bench_gemm.py --reps "$KREPS"
    step vision-tower 36 100 "$PY" bench/bench_vision_tower.py --cases 1344x896 --backends auto --reps "$REPS"
    step bench-2b 55 130 "$PY" bench/bench_model_forward.py --preset qwen2-vl-2b --reps "$REPS" --skip-compile

    # Opt-in steps, in the order they run when named.
    # shellcheck disable=SC2046
    step tests 150 240 env QWEN2VL_FAST_TEST_DEVICE=cuda "$PY" -m pytest -q -x -m "not gpu" $(parallel_tests) tests
    # Issue 13's kernels and the device-resident step on the GPU (the racy in-launch merges, bf16, the graphs)
    step decode-tests 120 240 env QWEN2VL_FAST_TEST_DEVICE=cuda "$PY" -m pytest -q tests/test_kernels_decode_step.py \
        tests/test_kernels_rope_decode_attention.py tests/test_kernels_gemv_splitk.py tests/test_cuda_quant_marlin.py \
        tests/test_decode_step.py tests/test_kernels_llm_attention.py
    step vision-kernels 240 300 "$PY" bench/bench_vision_kernels.py --reps "$KREPS"
    step bench-2b-compile 160 260 "$PY" bench/bench_model_forward.py --preset qwen2-vl-2b --reps "$REPS"
    step bench-3b 300 450 "$PY" bench/bench_model_forward.py --preset qwen2.5-vl-3b --reps "$REPS"
    step processing 60 120 "$PY" bench/bench_processing.py --device cuda --reps 5
    step quant 200 360 "$PY" bench/bench_quant.py --reps "$KREPS"
    step llm-kernels 200 360 "$PY" bench/bench_llm_kernels.py --reps "$KREPS"
    step generate-2b 420 500 "$PY" bench/bench_generate.py --presets qwen2-vl-2b --batches 1 4 16 64 \
        --new-tokens 128 --reps "$GEN_REPS"
    # Serving load (bench_serve.py): no new rate starts past half of QWEN2VL_FAST_BENCH_BUDGET_S.
    step serve-2b 150 240 "$PY" bench/bench_serve.py --preset qwen2-vl-2b --target engine --num-prompts 128 \
        --request-rate inf 8
    step serve-http-2b 200 300 "$PY" bench/bench_serve.py --preset qwen2-vl-2b --target http --num-prompts 128 \
        --request-rate inf
    # pytest-benchmark suites (issue 16): the small ops first (every registry op has a case); others by --bench-suites
    step suites-ops 180 300 "$PY" -m pytest bench --benchmark-only -q -p no:cacheprovider --bench-suites ops \
        --bench-no-compile --benchmark-json="$OUT_DIR/bench_suites.json"
    step generate-7b 480 540 "$PY" bench/bench_generate.py --presets qwen2-vl-7b --batches 1 16 --new-tokens 128 \
        --reps "$GEN_REPS"
    step sanitize 300 400 bash -c "compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -q -m gpu \
tests/test_cuda_quant_decode.py -k 'gpu_decode and (72-96 or 200-384)' && compute-sanitizer --tool racecheck \
--error-exitcode 9 $PY -m pytest -q -m gpu tests/test_cuda_quant_decode.py -k 'gpu_decode and 200-384 and bf16'"
    # Quantized decode: random weights built on the GPU (the 72B never exists in bf16, on disk or in memory).
    step quant-decode 480 540 "$PY" bench/bench_quant_decode.py --presets qwen2-vl-7b --batches 1 16 \
        --new-tokens 128 --reps "$GEN_REPS"
    step quant-decode-72b 480 540 "$PY" bench/bench_quant_decode.py --presets qwen2-vl-72b --weights int4 \
        --batches 1 16 --new-tokens 128 --reps "$GEN_REPS"

    finish | tee -a "$SUMMARY_FILE"
    return $((FAILED > 0))
}

main 2>&1 | tee "$LOG"
