#!/usr/bin/env bash
# One GPU run: build, GPU tests, compute-sanitizer, benchmarks, report -> OUTDIR.
#
#   benchmarks/gpu_run.sh OUTDIR [STEP ...]
#
# STEPs, in run order (default: all of them; `bench` = kernels models report):
#   env       nvidia-smi, python / torch / triton / CUDA versions, commit   -> <tag>_env.txt
#   install   make `import fastvit` work: pip install -e . (no deps, no build isolation, no
#             extension build), else a symlink shim on PYTHONPATH
#   build     fastvit._signature (the C++ op-call key of fastvit.ops' host fast path: setup.py
#             build_ext --inplace) and the CUDA extension through csrc/build.py, into
#             $FASTVIT_CUDA_CACHE where fastvit.cuda loads it from
#   gputests  pytest -m gpu tests
#   tests     pytest -m "not gpu and not slow" tests, on CUDA, without tests/test_aot.py: the AOT
#             compile table and the two-arch nvcc build (the slow tests) use no GPU, CI runs them
#   sanitize  compute-sanitizer memcheck on benchmarks/sanitize_smoke.py
#   kernels   pytest benchmarks/test_bench_kernels.py --benchmark-json=<tag>_kernels.json
#   models    pytest benchmarks/test_bench_models.py  --benchmark-json=<tag>_models.json
#   report    python -m benchmarks.report <tag>_kernels.json <tag>_models.json --name <tag>
#
# Tuning: a tuned shape key compiles every candidate config (5-15 per key) and times each, so
# tuning is what a run's time goes to. gputests, tests and sanitize run FASTVIT_AUTOTUNE=0 (the
# heuristic config: one compile per specialisation, no timing runs). kernels and models run
# FASTVIT_AUTOTUNE=1 on the 'default' grid, which benchmarks/shapes.py keeps to the shapes of the
# issue's targets so that tuning each of its keys once fits; models reuse what kernels tuned
# ($FASTVIT_CACHE_DIR). Even untuned, the test steps compile ~1100 kernels: they run on
# pytest-xdist workers (GPU_RUN_JOBS, default all cores but two: 14 on the H200 machine) when the
# image has xdist >= 3.2, else serially (then they reach their caps, and the summary says so).
#
# The plan: two calls of the device tool, timeout_s=600 each, the second as soon as the first
# returns (a machine stays warm 30 s; warm, it keeps build/ and the caches in it):
#   call 1: GPU_RUN_PACK=1 benchmarks/gpu_run.sh $OUT env install build gputests tests sanitize
#   call 2: GPU_RUN_PACK=1 benchmarks/gpu_run.sh $OUT install build kernels models report
# Call 2 repeats install and build: cache hits on a warm machine, a rebuild on a fresh one.
# Estimated 5.9 + 6.3 min of command time (+1 min on a fresh machine); with one machine start
# (1-2 min) that is about the 15 minutes of device time a task gets. Short of that, drop the
# torch.compile baselines (FASTVIT_BENCH_COMPILE=0 in call 2: -2 min). Each call stays under
# GPU_RUN_BUDGET (570 s; the tool allows 600) even when every step runs to its cap.
#
# Budgets, in seconds. cap: the step's time limit, which the script reads from these rows (a step
# that reaches it is stopped: TERM, or INT for the benchmarks, on which pytest-benchmark still
# writes the JSON of every finished benchmark). est: the expected time on an H200, from the
# counts and rates (A)-(H) below. tests/test_gpu_run.py checks that each call's caps sum to under
# GPU_RUN_BUDGET.
#
#          call step      cap   est  est from
# budget   1    env        30     8  nvidia-smi, one python importing torch, triton, timm, transformers
# budget   1    install    30    15  pip install -e . --no-deps --no-build-isolation (setup.py imports torch)
# budget   1    build      90    65  (A)
# budget   1    gputests  150    90  (B) (C) (D) (E)
# budget   1    tests     170   130  (B) (C) (D) (E)
# budget   1    sanitize   90    60  (B) (C) (F)
# budget   2    install    30     4  import check: call 1's editable install is still there
# budget   2    build      90    10  cache hits (on a fresh machine 65, as in call 1)
# budget   2    kernels   160   126  (B) (C) (D) (G)
# budget   2    models    255   231  (B) (C) (D) (G) (H)
# budget   2    report     30    10  markdown and 3 plots from the two JSONs
#
# (A) `python csrc/build.py` for sm_90 alone: 50 s on this project's 2-core CPU VM (MAX_JOBS 2);
#     fastvit/_signature.cpp (one C++ file with torch's Python headers): 44 s there, assumed 15 s.
# (B) Triton compiles, counted here (commit 06ee00e, 2026-11-30) as distinct JIT specialisations
#     (kernel, argument dtypes, integer divisibility, constexprs, warps, stages): the step's
#     tests or cases ran on the CPU through the interpreter with every launch stubbed and
#     Tunable.pick hooked to launch the heuristic config (and, for tuning, every candidate) once.
#       gputests   2184 tests, 529 shape keys: 233 compiles (1112 were they tuned)
#                  Since then (#13, counted only as tests: 3148 GPU tests at 60cc4d4) the bias /
#                  RoPE attention and swiglu GEMM specialisations add, estimated from their AOT
#                  variants, ~150 compiles: gputests ~110 s, still under its cap; recount with
#                  the first GPU run's summary line.
#       tests      2942 tests: 954 compiles, 884 of them not already compiled by gputests (the
#                  random sweeps add 17); test_compile.py's inductor subprocess is not counted
#       sanitize   sanitize_smoke, both dtypes: 16 keys, 16 compiles
#       kernels    13 cases, 76 results: 11 keys, 65 compiles, 97 timed candidates
#       models     2 cases, 13 results: 9 more keys, 54 more compiles, 75 more timed candidates
#     The grid these two replace (46 + 18 cases; 116 keys, 313 compiles, 1027 timed candidates:
#     ~8 min of tuning alone) runs as FASTVIT_BENCH_GRID=full.
# (C) 1.2 s of CPU per compile: triton 3.6.0, sm_90, compiler and ptxas, median over 30 configs
#     of tests/test_aot.py (2.6-7.6 s of wall time each here, on a VM shared with other jobs).
# (D) No GPU here, so assumed, to be replaced by the first run's numbers (each step line of the
#     summary says how long it took and how many Triton kernels it compiled): 30 ms per GPU test,
#     0.1 s per timed candidate (do_bench: 5 ms warm-up, 20 ms of repeats, L2 flushes), 0.3 s per
#     kernel result (inputs, check, <= 30 rounds), 1 s per model result, 15 s to start a suite,
#     10 s to build a model family (timm, HF, fastvit), 25 s for xdist workers to start and
#     collect, 60 s for gputests' memcheck test (compute-sanitizer on the cuda backend), 90 s for
#     test_compile.py's subprocess (opchecks, inductor compiles of a tiny ViT per backend).
# (E) 14 workers, x 1.3 for kernels two workers both compile. gputests: 233 x 1.2 x 1.3 / 14 = 26 s
#     + 2184 x 30 ms / 14 = 5 s + 25 s; the memcheck test runs in one worker beside the others
#     (25 + 60 s). tests: 884 x 1.2 x 1.3 / 14 = 99 s + 2942 x 30 ms / 14 = 6 s + 25 s;
#     test_compile.py's subprocess runs beside.
# (F) 16 x 1.2 s = 19 s, and memcheck's start-up (the CUDA context and every module it loads
#     are instrumented): assumed 40 s.
# (G) kernels: 65 x 1.2 + 97 x 0.1 + 76 x 0.3 + 15 = 126 s. models: 54 x 1.2 + 75 x 0.1 + 13 x 1
#     + 10 + 15 = 111 s, then (H).
# (H) timm + torch.compile and fastvit + torch.compile of ViT-B/16 bs256 (max-autotune, no CUDA
#     graphs) run last, so they are what a short run loses: assumed 90 + 30 s (inductor tunes
#     GEMM templates for timm's 5 matmul shapes; fastvit's ops stay opaque custom ops).
#
# Every cache is under build/ (git-ignored), so a warm machine reuses them between calls:
# TRITON_CACHE_DIR=build/triton-cache, FASTVIT_CACHE_DIR=build/fastvit-cache (tuned configs),
# FASTVIT_CUDA_CACHE=build/cuda-ext, TORCHINDUCTOR_CACHE_DIR=build/inductor-cache (values set
# before the script runs are kept); pytest runs with its cache off.
#
# Summary: OUTDIR/gpu_run_summary.txt, one line per step: name, ok / FAILED / TIMEOUT / skipped,
# seconds, cap, Triton kernels compiled and configs tuned during the step; then the log's tail.
# Exit status 0 when every step passed or was skipped, 1 when one failed or hit its cap, 2 on
# bad arguments, 3 without a GPU (unless GPU_RUN_ALLOW_CPU=1).
#
# Environment: PYTHON (default python3), GPU_RUN_BUDGET (default 570 s for the whole call; each
# step gets min(its cap, what is left), a step with under 20 s left is skipped), GPU_RUN_JOBS
# (xdist workers, default all cores but two; 1 = serial), GPU_RUN_PACK=1 (at the end, pack every
# output but the summary, the .md and the .json files into <tag>_logs.tar.gz: the device tool
# returns at most 8 files), FASTVIT_COMMIT (recorded in every result when there is no .git),
# FASTVIT_BENCH_GRID (default on a GPU: 'default'), FASTVIT_BENCH_COMPILE=0 (no torch.compile
# baselines), GPU_RUN_ALLOW_CPU=1 (check the script without a GPU: build skipped, the test steps
# only collect, sanitize_smoke runs in the Triton interpreter without compute-sanitizer, the
# benchmarks run their smoke grid).
set -u -o pipefail

SELF="${BASH_SOURCE[0]}"
ALL_STEPS=(env install build gputests tests sanitize kernels models report)

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$SELF"; }

# cap_of STEP: the cap column of STEP's budget row (the same in both calls)
cap_of() { awk -v s="$1" '$1 == "#" && $2 == "budget" && $4 == s { print $5; exit }' "$SELF"; }

if [ $# -lt 1 ]; then
    usage
    exit 2
fi
OUT_ARG=$1
shift
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=("${ALL_STEPS[@]}")
EXPANDED=()
for s in "${STEPS[@]}"; do
    case "$s" in
        bench) EXPANDED+=(kernels models report) ;;
        env|install|build|gputests|tests|sanitize|kernels|models|report) EXPANDED+=("$s") ;;
        *) echo "unknown step '$s' (expected ${ALL_STEPS[*]} bench)"; exit 2 ;;
    esac
done
for s in "${EXPANDED[@]}"; do
    if [ -z "$(cap_of "$s")" ]; then
        echo "step '$s' has no budget row in the header of $SELF"
        exit 2
    fi
done
WANT_REPORT=0
for s in "${EXPANDED[@]}"; do [ "$s" = report ] && WANT_REPORT=1; done

mkdir -p "$OUT_ARG" || exit 2
OUT=$(cd "$OUT_ARG" && pwd)
ROOT=$(cd "$(dirname "$SELF")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
BUDGET=${GPU_RUN_BUDGET:-570}
# xdist workers for the test steps: compiling is their work, so all cores but two (which feed the GPU)
NCPU=$(nproc 2>/dev/null || echo 2)
JOBS=${GPU_RUN_JOBS:-$(( NCPU > 4 ? NCPU - 2 : 2 ))}
START=$SECONDS
SUMMARY="$OUT/gpu_run_summary.txt"
: > "$SUMMARY"
FAILED=0

mkdir -p "$ROOT/build"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$ROOT/build/triton-cache}"
export FASTVIT_CACHE_DIR="${FASTVIT_CACHE_DIR:-$ROOT/build/fastvit-cache}"
export FASTVIT_CUDA_CACHE="${FASTVIT_CUDA_CACHE:-$ROOT/build/cuda-ext}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$ROOT/build/inductor-cache}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [ -z "${FASTVIT_COMMIT:-}" ]; then
    if git -C "$ROOT" rev-parse --short=12 HEAD >/dev/null 2>&1; then
        FASTVIT_COMMIT=$(git -C "$ROOT" rev-parse --short=12 HEAD)
        git -C "$ROOT" diff --quiet HEAD -- 2>/dev/null || FASTVIT_COMMIT="$FASTVIT_COMMIT-dirty"
    else
        FASTVIT_COMMIT="unknown (no .git in the copied tree; pass FASTVIT_COMMIT)"
    fi
fi
export FASTVIT_COMMIT

# one interpreter start (torch's import is seconds) answers both: is there a GPU, and its name
DEV=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>/dev/null)
HAS_GPU=0
if [ -n "$DEV" ] && [ "$DEV" != cpu ]; then
    HAS_GPU=1
elif [ "${GPU_RUN_ALLOW_CPU:-0}" != 1 ]; then
    echo "no CUDA device visible to $PY (set GPU_RUN_ALLOW_CPU=1 to check this script on a CPU)" | tee -a "$SUMMARY"
    exit 3
fi
DEV=${DEV:-cpu}
TAG=$(echo "${DEV}" | tr 'A-Z' 'a-z' | sed -e 's/nvidia //' -e 's/[^a-z0-9]\+/_/g' -e 's/^_//' -e 's/_$//')
TAG=${TAG}_$(date -u +%Y-%m-%d)
# worksteal (xdist >= 3.2) hands each worker a contiguous run of tests, which share shapes and so
# compiled kernels; the default round-robin start would have every worker compile nearly all of them
XDIST=()
if [ "$HAS_GPU" = 1 ] && [ "$JOBS" -gt 1 ] && "$PY" -c "
import sys, xdist
sys.exit(tuple(int(p) for p in xdist.__version__.split('.')[:2]) < (3, 2))" 2>/dev/null; then
    XDIST=(-n "$JOBS" --dist worksteal)
fi
MODE="xdist ${XDIST[*]:-off}"
[ "$HAS_GPU" = 1 ] || MODE="no GPU: a dry run (build skipped, test steps collect only, sanitize in the interpreter)"
echo "gpu_run: device '$DEV', tag $TAG, commit $FASTVIT_COMMIT, steps ${EXPANDED[*]}, budget ${BUDGET}s, $MODE" \
    | tee -a "$SUMMARY"

left() { echo $((BUDGET - (SECONDS - START))); }

# work counters shown on each step line: compiled Triton kernels, tuned shape keys
n_kernels() { find "$TRITON_CACHE_DIR" -name '*.cubin' 2>/dev/null | wc -l; }
n_tuned() { cat "$FASTVIT_CACHE_DIR"/autotune-*.json 2>/dev/null | grep -c '"num_warps"'; }

# line NAME STATUS SECONDS NOTE: the step's summary line
line() {
    printf '%-9s %-8s %4ss  (cap %ss)%s\n' "$1" "$2" "$3" "$(cap_of "$1")" "${4:+  $4}" | tee -a "$SUMMARY"
}

# run_step NAME SIGNAL CMD...: time-boxed at the step's cap (less when the call's budget runs
# short), output to $OUT/NAME.log, one summary line and the log's last lines
run_step() {
    local name=$1 sig=$2
    shift 2
    local cap reserve=0 t
    cap=$(cap_of "$name")
    [ "$WANT_REPORT" = 1 ] && [ "$name" != report ] && reserve=$(cap_of report)
    t=$(( $(left) - reserve ))
    [ "$t" -gt "$cap" ] && t=$cap
    if [ "$t" -lt 20 ]; then
        line "$name" skipped 0 "only $(left)s of the ${BUDGET}s budget left"
        return 0
    fi
    local t0=$SECONDS k0 u0 rc status
    k0=$(n_kernels)
    u0=$(n_tuned)
    echo "== $name (limit ${t}s): $*" > "$OUT/$name.log"
    timeout -s "$sig" -k 20 "$t" "$@" >> "$OUT/$name.log" 2>&1
    rc=$?
    status=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        status=TIMEOUT
        FAILED=1
    elif [ $rc -ne 0 ]; then
        status="FAILED"
        FAILED=1
    fi
    line "$name" "$status" "$((SECONDS - t0))" \
        "rc=$rc, +$(( $(n_kernels) - k0 )) triton kernels, +$(( $(n_tuned) - u0 )) tuned keys -> $OUT/$name.log"
    tail -n 3 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
}

step_env() {
    {
        echo "date: $(date -u +%FT%TZ)"
        echo "commit: $FASTVIT_COMMIT"
        echo "host: $(uname -a)"
        echo "cpus: $(nproc)"
        # each tool time-boxed: the step has no other limit
        command -v nvidia-smi >/dev/null && timeout 10 nvidia-smi
        command -v nvcc >/dev/null && timeout 10 nvcc --version | tail -n 2
        command -v compute-sanitizer >/dev/null && timeout 10 compute-sanitizer --version | head -n 2
        timeout "$(cap_of env)" "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton unavailable:", e)
for name in ("timm", "transformers", "pytest_benchmark", "xdist", "matplotlib"):
    try:
        m = __import__(name); print(name, getattr(m, "__version__", "?"))
    except Exception as e:
        print(name, "unavailable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          round(p.total_memory / 2**30, 1), "GiB", "L2", getattr(p, "L2_cache_size", "?"))
EOF
    } > "$OUT/${TAG}_env.txt" 2>&1
    MSG="written $OUT/${TAG}_env.txt"
}

step_install() {
    local where
    if where=$("$PY" -c "import fastvit.kernels, os; print(os.path.dirname(fastvit.__file__))" 2>/dev/null); then
        MSG="fastvit already importable ($where)"
        return 0
    fi
    FASTVIT_BUILD_CUDA=0 FASTVIT_BUILD_EXT=0 timeout "$(cap_of install)" "$PY" -m pip install -q -e . --no-deps --no-build-isolation \
        > "$OUT/install.log" 2>&1
    if "$PY" -c "import fastvit.kernels" >/dev/null 2>&1; then
        MSG="pip install -e . ok"
        return 0
    fi
    # no pip / setuptools: fastvit.kernels lives in kernels/, so put a package of symlinks first
    local shim="$ROOT/build/pyshim"
    rm -rf "$shim" && mkdir -p "$shim/fastvit"
    for f in "$ROOT"/fastvit/*; do ln -s "$f" "$shim/fastvit/$(basename "$f")"; done
    ln -s "$ROOT/kernels" "$shim/fastvit/kernels"
    ln -s "$ROOT/csrc" "$shim/fastvit/cuda"
    export PYTHONPATH="$shim:$PYTHONPATH"
    if "$PY" -c "import fastvit.kernels" >> "$OUT/install.log" 2>&1; then
        MSG="pip failed (see install.log); using the symlink shim $shim"
        return 0
    fi
    MSG="fastvit not importable (see $OUT/install.log)"
    return 1
}

# in_process NAME FUNCTION: a step run in this shell, not a subshell (install may export the
# shim's PYTHONPATH for the later steps), timed; FUNCTION leaves its one-line result in MSG
in_process() {
    local name=$1 fn=$2 t0=$SECONDS
    MSG=""
    if "$fn"; then
        line "$name" ok "$((SECONDS - t0))" "$MSG"
    else
        line "$name" FAILED "$((SECONDS - t0))" "$MSG"
        FAILED=1
    fi
}

# the test steps: heuristic configs, no timing runs; on a CPU only collected (CI runs them)
PYTEST_TESTS=(env FASTVIT_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider --timeout=300 -rfEs)
[ "$HAS_GPU" = 1 ] || PYTEST_TESTS+=(--collect-only)
BENCH_ARGS=(-p no:cacheprovider --timeout=240 --benchmark-columns=median,iqr,rounds -rfEs)

for s in "${EXPANDED[@]}"; do
    case "$s" in
        env) in_process env step_env ;;
        install) in_process install step_install ;;
        build)
            if [ "$HAS_GPU" = 1 ]; then
                # a failed fastvit._signature build leaves the Python signature (fastvit info says which)
                run_step build TERM bash -c 'FASTVIT_BUILD_CUDA=0 "$0" setup.py -q build_ext --inplace \
                    --build-temp build/signature-ext; "$0" csrc/build.py --verbose' "$PY"
            else
                line build skipped 0 "no GPU"
            fi ;;
        gputests) run_step gputests TERM "${PYTEST_TESTS[@]}" "${XDIST[@]}" -m gpu tests ;;
        tests) run_step tests TERM "${PYTEST_TESTS[@]}" "${XDIST[@]}" -m "not gpu and not slow" \
                   --ignore=tests/test_aot.py tests ;;
        sanitize)
            if [ "$HAS_GPU" = 1 ] && command -v compute-sanitizer >/dev/null; then
                # caching allocator off: every tensor is its own cudaMalloc, so memcheck sees overruns
                run_step sanitize TERM env FASTVIT_AUTOTUNE=0 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
                    compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
                    "$PY" -m benchmarks.sanitize_smoke
            elif [ "$HAS_GPU" = 1 ]; then
                line sanitize skipped 0 "no compute-sanitizer on PATH"
            else
                # the same checks through the Triton interpreter: checks the script, not the memory
                run_step sanitize TERM env FASTVIT_SANITIZE_DEVICE=cpu TRITON_INTERPRET=1 \
                    "$PY" -m benchmarks.sanitize_smoke
            fi ;;
        kernels) run_step kernels INT env FASTVIT_AUTOTUNE=1 "$PY" -m pytest -q benchmarks/test_bench_kernels.py \
                     "${BENCH_ARGS[@]}" --benchmark-json="$OUT/${TAG}_kernels.json" ;;
        models) run_step models INT env FASTVIT_AUTOTUNE=1 "$PY" -m pytest -q benchmarks/test_bench_models.py \
                    "${BENCH_ARGS[@]}" --benchmark-json="$OUT/${TAG}_models.json" ;;
        report)
            JS=()
            for f in "$OUT/${TAG}_kernels.json" "$OUT/${TAG}_models.json"; do [ -s "$f" ] && JS+=("$f"); done
            if [ ${#JS[@]} -eq 0 ]; then
                line report skipped 0 "no benchmark JSON in $OUT"
            else
                run_step report TERM "$PY" -m benchmarks.report "${JS[@]}" --name "$TAG"
                if [ -s "$OUT/$TAG.md" ]; then
                    sed -n '/^## Issue 5 targets/,/^## Kernels/p' "$OUT/$TAG.md" | grep '^|' | tee -a "$SUMMARY"
                fi
            fi ;;
    esac
done

if [ "${GPU_RUN_PACK:-0}" = 1 ]; then
    mapfile -t LOOSE < <(cd "$OUT" && ls -A | grep -v -e '^gpu_run_summary\.txt$' -e '\.md$' -e '\.json$')
    if [ ${#LOOSE[@]} -gt 0 ]; then
        (cd "$OUT" && tar czf "${TAG}_logs.tar.gz" "${LOOSE[@]}" && rm -rf "${LOOSE[@]}")
        echo "gpu_run: packed ${#LOOSE[@]} files into $OUT/${TAG}_logs.tar.gz" | tee -a "$SUMMARY"
    fi
fi
END="gpu_run: done in $((SECONDS - START))s; outputs in $OUT"
[ "$FAILED" = 1 ] && END="$END; a step FAILED or hit its cap"
echo "$END" | tee -a "$SUMMARY"
exit "$FAILED"
