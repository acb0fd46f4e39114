#!/usr/bin/env bash
# Every GPU figure issue 16 asks for, in one run of at most 8 minutes on a lent GPU machine (H200 / H100):
#
#   1. install the carried wheels (.whl/: megatron-core, transformers; benchmarks/fetch_gpu_wheels.sh)
#   2. build the csrc extension for sm_90a
#   3. the new CUDA tests: attention backends (bf16, no host sync) and grouped-GEMM experts (bf16 kernel)
#   4. the training-step benchmark at Qwen3-30B-A3B layer shapes, every variant (sequential vs grouped
#      experts, each attention backend, fused vs reference loss) in one run, with the profile
#   5. the same at the default 0.76 B shape (today's 19.6 TFLOP/s row was measured there)
#   6. tests/ops (the fused-loss CUDA kernels)
#
# Results land in $OUT (what the device tool brings back; ./gpu_check_out without it): gpu_check.log
# (every command and its output), tests_gpu.log, train_step_qwen3_30b_a3b_gpu.md, train_step_gpu.md, and
# the markdown tables are also copied to docs/bench/. Each benchmark rewrites its table after every timed
# round and every profiled variant, and every step has its own time limit inside the overall budget, so a
# run that is cut short still leaves the tables it finished.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine:
#       run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#   bash benchmarks/gpu_check.sh --dry-run   # here, on a CPU: print the steps, run the CPU-quick variants
#
# Environment: GPU_CHECK_BUDGET_S (default 465: the whole script), PYTHON (default: .venv/bin/python if
# there is one, else python3).
set -u -o pipefail

DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
OUT_DIR=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT_DIR" docs/bench
LOG="$OUT_DIR/gpu_check.log"
# The project's .venv where there is one (here, for --dry-run); the device image's python3 otherwise.
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
BUDGET=${GPU_CHECK_BUDGET_S:-465}
START=$(date +%s)
FAILED=()

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} CUDA_DEVICE_MAX_CONNECTIONS=1

say() { echo "$*" | tee -a "$LOG"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME LIMIT_S COMMAND...: run COMMAND with at most LIMIT_S seconds (less when the budget is short),
# output to the log; in a dry run only print it.
step() {
    local name=$1 limit=$2
    shift 2
    local avail
    avail=$(left)
    ((limit > avail)) && limit=$avail
    if ((DRY_RUN)); then
        say "== [dry run] $name (limit ${limit} s): $*"
        return 0
    fi
    if ((limit < 20)); then
        say "== SKIPPED $name: only ${avail} s of the ${BUDGET} s budget left"
        FAILED+=("$name (skipped)")
        return 1
    fi
    say "== $name (limit ${limit} s, $(($(date +%s) - START)) s elapsed): $*"
    local t0=$(date +%s) rc
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    say "== $name: exit ${rc} after $(($(date +%s) - t0)) s"
    ((rc == 0)) || FAILED+=("$name (exit $rc)")
    return "$rc"
}

# keep a table: the benchmark writes it to $OUT_DIR as it goes; docs/bench gets the same file
keep() {
    [ -f "$OUT_DIR/$1" ] && cp "$OUT_DIR/$1" "docs/bench/$1" && say "   table: $OUT_DIR/$1 (and docs/bench/$1)"
    return 0
}

: >"$LOG"
say "gpu_check: $(date -u +%FT%TZ), budget ${BUDGET} s, dry run ${DRY_RUN}, results in ${OUT_DIR}"
say "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed files"
if ((DRY_RUN == 0)); then
    nvidia-smi -L 2>&1 | tee -a "$LOG"
fi

# 1. wheels: megatron-core and transformers are not on the GPU image (fetch_gpu_wheels.sh lists why)
SITE=/tmp/site
if ((DRY_RUN == 0)) && ! ls .whl/*.whl >/dev/null 2>&1; then
    say "gpu_check: no wheels in .whl/: run benchmarks/fetch_gpu_wheels.sh here and pass carry=[\".whl\"]"
    exit 2
fi
step "install wheels" 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/megatron_core-*.whl .whl/transformers-*.whl || exit 2
export PYTHONPATH="$SITE:$ROOT"
step "versions" 30 "$PY" -c "import torch, megatron.core, transformers; print('torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(), '| megatron-core', \
megatron.core.__version__, '| transformers', transformers.__version__)"

# 2. the csrc extension (CPU + CUDA kernels; sm_90a for Hopper)
step "build extension" 120 env TORCH_CUDA_ARCH_LIST=9.0a "$PY" setup.py build_ext --inplace

# 3. the new CUDA tests first (attention backends, grouped experts): they are what this issue changed
NEW_TESTS=(tests/models/test_attention.py
    "tests/parallel/test_grouped_experts.py::test_cuda_bf16_grouped_kernel_is_as_accurate_as_sequential_and_zeroes_empty_experts")
step "CUDA tests (attention, grouped experts)" 120 "$PY" -m pytest -q -p no:cacheprovider -rs "${NEW_TESTS[@]}" \
    --junitxml "$OUT_DIR/tests_new_gpu.xml"

# 4. Qwen3-30B-A3B layer shapes, as many layers as fit, every variant
if ((DRY_RUN)); then
    step "bench qwen3_30b_a3b" 210 "$PY" benchmarks/bench_train_step.py --shape qwen3_30b_a3b --steps 3 \
        --warmup 1 --out "$OUT_DIR/train_step_qwen3_30b_a3b_gpu.md"
    step "bench default shape" 110 "$PY" benchmarks/bench_train_step.py --steps 3 --warmup 1 \
        --out "$OUT_DIR/train_step_gpu.md"
    step "tests/ops" 120 "$PY" -m pytest -q -p no:cacheprovider tests/ops
    # what a CPU can check of the above: the CPU-quick benchmark variants, with the profile
    say "== dry run: CPU-quick benchmark (every CPU variant, profiled)"
    PYTHONPATH="$ROOT" "$PY" benchmarks/bench_train_step.py --quick --out "$OUT_DIR/train_step_quick_dryrun.md" \
        2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    say "== dry run: CPU-quick benchmark exit ${rc}; table: $OUT_DIR/train_step_quick_dryrun.md"
    exit "$rc"
fi
step "bench qwen3_30b_a3b" 210 "$PY" benchmarks/bench_train_step.py --shape qwen3_30b_a3b --steps 3 --warmup 1 \
    --out "$OUT_DIR/train_step_qwen3_30b_a3b_gpu.md"
keep train_step_qwen3_30b_a3b_gpu.md

# 5. the default shape, where the 19.6 TFLOP/s baseline was measured
step "bench default shape" 110 "$PY" benchmarks/bench_train_step.py --steps 3 --warmup 1 \
    --out "$OUT_DIR/train_step_gpu.md"
keep train_step_gpu.md

# 6. the fused-loss kernels (known good on an H100; last, with whatever time is left)
step "tests/ops" 120 "$PY" -m pytest -q -p no:cacheprovider tests/ops --junitxml "$OUT_DIR/tests_ops_gpu.xml"

say "gpu_check: done in $(($(date +%s) - START)) s; ${#FAILED[@]} step(s) failed or skipped: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]
