#!/usr/bin/env bash
# One GPU run: build, GPU tests, compute-sanitizer, benchmarks, report -> OUTDIR.
#
#   benchmarks/gpu_run.sh OUTDIR [STEP ...]
#
# STEPs, in run order (default: all of them):
#   env       nvidia-smi, python / torch / triton / CUDA versions, commit   -> <tag>_env.txt
#   install   make `import fastvit` work: pip install -e . (no deps, no build isolation, no
#             extension build), else a symlink shim on PYTHONPATH
#   build     the CUDA extension through fastvit's own build-on-first-use (csrc/build.py, into the
#             cache fastvit.cuda loads it from)
#   gputests  pytest -m gpu tests
#   tests     the rest of tests/ (pytest -m "not gpu" tests), under CUDA
#   sanitize  compute-sanitizer memcheck on benchmarks/sanitize_smoke.py (+ tests marked sanitizer)
#   kernels   pytest benchmarks/test_bench_kernels.py --benchmark-json=<tag>_kernels.json
#   models    pytest benchmarks/test_bench_models.py  --benchmark-json=<tag>_models.json
#   report    python -m benchmarks.report <tag>_kernels.json <tag>_models.json --name <tag>
#   bench     = kernels models report
#
# Everything fits GPU_RUN_BUDGET seconds (default 570, under the 10-minute limit of one call):
# each step gets min(its own cap, what is left), 45 s stay reserved for the report, a step with
# under 20 s left is skipped and says so. Benchmark steps are stopped with SIGINT, on which
# pytest-benchmark still writes the JSON of every benchmark that finished. All steps together
# rarely fit one call: split them, e.g.
#   benchmarks/gpu_run.sh $OUT env install build gputests tests sanitize
#   benchmarks/gpu_run.sh $OUT install kernels models report
# Build outputs and compile caches go under build/ and .triton_cache/ (git-ignored), so a
# warm machine reuses them between calls.
#
# Environment: PYTHON (default python3), GPU_RUN_BUDGET, FASTVIT_COMMIT (recorded in every
# result when there is no .git), FASTVIT_BENCH_GRID (default on a GPU: 'default'),
# FASTVIT_BENCH_COMPILE=0 (skip the torch.compile baselines), GPU_RUN_ALLOW_CPU=1 (let the
# script run without a GPU, to check the script itself: smoke grid, no build / sanitizer).
set -u -o pipefail

if [ $# -lt 1 ]; then
    sed -n '2,30p' "$0"
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
BUDGET=${GPU_RUN_BUDGET:-570}
START=$SECONDS
SUMMARY="$OUT/gpu_run_summary.txt"
: > "$SUMMARY"

STEPS=("$@")
if [ ${#STEPS[@]} -eq 0 ]; then
    STEPS=(env install build gputests tests sanitize kernels models report)
fi
EXPANDED=()
for s in "${STEPS[@]}"; do
    case "$s" in
        bench) EXPANDED+=(kernels models report) ;;
        env|install|build|gputests|tests|sanitize|kernels|models|report) EXPANDED+=("$s") ;;
        *) echo "unknown step '$s' (expected env install build gputests tests sanitize kernels models report bench)"; exit 2 ;;
    esac
done
WANT_REPORT=0
for s in "${EXPANDED[@]}"; do [ "$s" = report ] && WANT_REPORT=1; done

# caches in git-ignored folders of the repo: kept between calls on a warm machine
mkdir -p build
export FASTVIT_CUDA_CACHE="$ROOT/build/fastvit_cuda_cache"
export TRITON_CACHE_DIR="$ROOT/.triton_cache"
export TORCHINDUCTOR_CACHE_DIR="$ROOT/build/inductor_cache"
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

HAS_GPU=0
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    HAS_GPU=1
elif [ "${GPU_RUN_ALLOW_CPU:-0}" != 1 ]; then
    echo "no CUDA device visible to $PY (set GPU_RUN_ALLOW_CPU=1 to check this script on a CPU)" | tee -a "$SUMMARY"
    exit 3
fi
DEV=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>/dev/null)
TAG=$(echo "${DEV}" | tr 'A-Z' 'a-z' | sed -e 's/nvidia //' -e 's/[^a-z0-9]\+/_/g' -e 's/^_//' -e 's/_$//')_$(date -u +%Y-%m-%d)
echo "gpu_run: device '$DEV', tag $TAG, commit $FASTVIT_COMMIT, steps ${EXPANDED[*]}, budget ${BUDGET}s" | tee -a "$SUMMARY"

left() { echo $((BUDGET - (SECONDS - START))); }

# run_step NAME CAP SIGNAL CMD...: time-boxed, output to $OUT/NAME.log, one summary line
run_step() {
    local name=$1 cap=$2 sig=$3
    shift 3
    local reserve=0
    [ "$WANT_REPORT" = 1 ] && [ "$name" != report ] && reserve=45
    local t=$(( $(left) - reserve ))
    [ "$t" -gt "$cap" ] && t=$cap
    if [ "$t" -lt 20 ]; then
        printf '%-9s SKIPPED (only %ss of the %ss budget left)\n' "$name" "$(left)" "$BUDGET" | tee -a "$SUMMARY"
        return 0
    fi
    local t0=$SECONDS rc
    echo "== $name (limit ${t}s): $*" > "$OUT/$name.log"
    timeout -s "$sig" -k 20 "$t" "$@" >> "$OUT/$name.log" 2>&1
    rc=$?
    local note=""
    { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && note=" (time limit ${t}s hit)"
    printf '%-9s rc=%-3s %4ss%s  -> %s\n' "$name" "$rc" "$((SECONDS - t0))" "$note" "$OUT/$name.log" | tee -a "$SUMMARY"
    tail -n 3 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
    return 0
}

step_env() {
    {
        echo "date: $(date -u +%FT%TZ)"
        echo "commit: $FASTVIT_COMMIT"
        echo "host: $(uname -a)"
        echo "cpus: $(nproc)"
        command -v nvidia-smi >/dev/null && nvidia-smi
        command -v nvcc >/dev/null && nvcc --version | tail -n 2
        command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -n 2
        "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton unavailable:", e)
for name in ("timm", "transformers", "pytest_benchmark", "matplotlib"):
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
    printf '%-9s written %s\n' env "$OUT/${TAG}_env.txt" | tee -a "$SUMMARY"
}

step_install() {
    if "$PY" -c "import fastvit.kernels" >/dev/null 2>&1; then
        printf '%-9s fastvit already importable (%s)\n' install \
            "$("$PY" -c 'import fastvit, os; print(os.path.dirname(fastvit.__file__))')" | tee -a "$SUMMARY"
        return 0
    fi
    FASTVIT_BUILD_CUDA=0 timeout 120 "$PY" -m pip install -q -e . --no-deps --no-build-isolation > "$OUT/install.log" 2>&1
    if "$PY" -c "import fastvit.kernels" >/dev/null 2>&1; then
        printf '%-9s pip install -e . ok\n' install | tee -a "$SUMMARY"
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
        printf '%-9s pip failed (see install.log); using the symlink shim %s\n' install "$shim" | tee -a "$SUMMARY"
    else
        printf '%-9s FAILED: fastvit not importable (see %s)\n' install "$OUT/install.log" | tee -a "$SUMMARY"
    fi
}

for s in "${EXPANDED[@]}"; do
    case "$s" in
        env) step_env ;;
        install) step_install ;;
        build)
            if [ "$HAS_GPU" = 1 ]; then
                run_step build 300 TERM "$PY" csrc/build.py --verbose
            else
                printf '%-9s skipped: no GPU\n' build | tee -a "$SUMMARY"
            fi ;;
        gputests) run_step gputests 240 TERM "$PY" -m pytest -q -m gpu tests -p no:cacheprovider --timeout=300 -rfEs ;;
        tests) run_step tests 300 TERM "$PY" -m pytest -q -m "not gpu" tests -p no:cacheprovider --timeout=300 -rfEs ;;
        sanitize)
            if [ "$HAS_GPU" != 1 ] || ! command -v compute-sanitizer >/dev/null; then
                printf '%-9s skipped: needs a GPU and compute-sanitizer\n' sanitize | tee -a "$SUMMARY"
            else
                # caching allocator off: every tensor is its own cudaMalloc, so memcheck sees overruns
                run_step sanitize 180 TERM env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
                    --error-exitcode 1 --print-limit 20 "$PY" -m benchmarks.sanitize_smoke
                if grep -rqs "mark.sanitizer" tests; then
                    run_step sanitize_tests 180 TERM env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
                        --error-exitcode 1 --print-limit 20 "$PY" -m pytest -q -m sanitizer tests -p no:cacheprovider
                fi
            fi ;;
        kernels) run_step kernels 300 INT "$PY" -m pytest -q benchmarks/test_bench_kernels.py -p no:cacheprovider \
                     --timeout=240 --benchmark-json="$OUT/${TAG}_kernels.json" --benchmark-columns=median,iqr,rounds -rfEs ;;
        models) run_step models 300 INT "$PY" -m pytest -q benchmarks/test_bench_models.py -p no:cacheprovider \
                    --timeout=240 --benchmark-json="$OUT/${TAG}_models.json" --benchmark-columns=median,iqr,rounds -rfEs ;;
        report)
            JS=()
            for f in "$OUT/${TAG}_kernels.json" "$OUT/${TAG}_models.json"; do [ -s "$f" ] && JS+=("$f"); done
            if [ ${#JS[@]} -eq 0 ]; then
                printf '%-9s skipped: no benchmark JSON in %s\n' report "$OUT" | tee -a "$SUMMARY"
            else
                run_step report 60 TERM "$PY" -m benchmarks.report "${JS[@]}" --name "$TAG"
                if [ -s "$OUT/$TAG.md" ]; then
                    sed -n '/^## Issue 5 targets/,/^## Kernels/p' "$OUT/$TAG.md" | grep '^|' | tee -a "$SUMMARY"
                fi
            fi ;;
    esac
done
echo "gpu_run: done in $((SECONDS - START))s; outputs in $OUT" | tee -a "$SUMMARY"
