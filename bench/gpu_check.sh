#!/usr/bin/env bash
# One command for the day a GPU is lent: everything this project has never measured on a GPU, in at most
# 8 minutes (each step has its own time limit inside a global one), everything written to $OUT.
#
#   1. compile     tests/test_kernel_compile.py: both Triton kernels built for sm_80/90/100 (registers, spills,
#                  load widths; the table is in compile.log)
#   2. liger       Liger-Kernel, installed (--no-deps) when it is not importable and the machine can reach PyPI
#   3. bench_kernel  bench/bench_kernel.py: our kernel vs eager, torch.compile and Liger-Kernel, against the
#                  HBM floor (copy bandwidth measured on the spot)
#   4. bench_step  bench/bench_step.py --model llava-7b: LLaVA-1.5-7B's real config, random weights, bf16,
#                  NRCA vs Full FT, without and with activation checkpointing, measured peak beside the planner's
#   5. testbed     one epoch of the embedded testbed (train.py: base pre-training, then NRCA and Full FT)
# Then $OUT/summary.md: each step's exit status and seconds, the device, the versions and the commit.
#
#   OUT=/some/dir bash bench/gpu_check.sh                 # on the GPU (default OUT: runs/gpu_check)
#   OUT=/tmp/x bash bench/gpu_check.sh --dry-run          # CPU: the same steps at tiny shapes (about a minute)
#   ... --skip compile                                    # leave a step out (repeatable)
# The dry run checks the plumbing only: its numbers say nothing about a GPU. Exit status: 0 when every step
# passed, 1 otherwise (every step runs regardless).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
SKIP=" "
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --skip) SKIP+="$2 "; shift ;;
        *) echo "gpu_check.sh: unknown option $1 (--dry-run, --skip STEP)" >&2; exit 2 ;;
    esac
    shift
done
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SCRATCH="$(mktemp -d)"  # run folders and checkpoints: too large to bring back, only their logs go to $OUT
trap 'rm -rf "$SCRATCH"' EXIT
DEADLINE=$((SECONDS + 470))  # 8 minutes, less a margin for the summary
FAILED=0

{
    echo "# gpu_check $([[ $DRY_RUN == 1 ]] && echo '--dry-run (CPU, tiny shapes: no figure here is a GPU figure)')"
    echo
    echo "date $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'device',
torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    echo
    echo "| step | exit status | seconds | log |"
    echo "|---|---:|---:|---|"
} > "$OUT/summary.md"

step() {  # step NAME LIMIT_S COMMAND...: run it with its output in $OUT/NAME.log, a row in the summary
    local name=$1 limit=$2 started=$SECONDS rc
    shift 2
    if [[ "$SKIP" == *" $name "* ]]; then
        echo "| $name | skipped | - | - |" >> "$OUT/summary.md"
        return
    fi
    (( limit > DEADLINE - SECONDS )) && limit=$((DEADLINE - SECONDS))
    if (( limit <= 0 )); then
        echo "| $name | not run: out of time | - | - |" >> "$OUT/summary.md"; FAILED=1
        return
    fi
    echo "== $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    (( rc == 124 || rc == 137 )) && echo "gpu_check.sh: stopped after ${limit} s" >> "$OUT/$name.log"
    (( rc != 0 )) && FAILED=1
    echo "| $name | $rc | $((SECONDS - started)) | $name.log |" >> "$OUT/summary.md"
    tail -n 3 "$OUT/$name.log"
}

# 1. The compiled kernels (CPU-possible: ptxas comes with the triton wheel).
step compile 60 env -u TRITON_INTERPRET python -m pytest -q -s tests/test_kernel_compile.py

if [[ $DRY_RUN == 1 ]]; then
    step bench_kernel 90 env TRITON_INTERPRET=1 python bench/bench_kernel.py --smoke
    step bench_step 90 python bench/bench_step.py --model tiny-llava --batch 2 --micro-batch 2 --steps 1 \
        --warmup 0 --only nrca --no-checkpointing-runs --json "$OUT/bench_step.json"
    step testbed 90 python train.py --epochs 1 --base-epochs 0 --samples-per-dataset 4 --batch-size 4 \
        --micro-batch-size 4 --eval-limit 2 --data-dir "$SCRATCH/world" --out-dir "$SCRATCH/testbed/nrca"
else
    # Liger-Kernel is optional: bench_kernel.py leaves it out (and says so) when it cannot be imported.
    if ! python -c "import liger_kernel" 2>/dev/null; then
        step liger 30 bash -c "pip install --no-deps --timeout 10 --retries 0 liger-kernel \
            || echo 'Liger-Kernel not installable here (optional, not a failure)'"
    fi
    step bench_kernel 90 env -u TRITON_INTERPRET python bench/bench_kernel.py
    step bench_step 200 env -u TRITON_INTERPRET python bench/bench_step.py --model llava-7b --batch 16 \
        --micro-batch 4 --steps 2 --warmup 1 --only full --only nrca --json "$OUT/bench_step.json"
    step testbed 90 env -u TRITON_INTERPRET python train.py --epochs 1 --compare full \
        --data-dir "$SCRATCH/world" --out-dir "$SCRATCH/testbed"  # into testbed/nrca and testbed/full
fi
# The testbed's per-epoch metrics, beside its log.
for run in "$SCRATCH"/testbed/*/; do
    [[ -f "$run/metrics.jsonl" ]] && cp "$run/metrics.jsonl" "$OUT/testbed-$(basename "$run")-metrics.jsonl"
done

echo >> "$OUT/summary.md"
echo "$([[ $FAILED == 0 ]] && echo 'every step passed' || echo 'some step failed: see its log'), \
$SECONDS s in all" >> "$OUT/summary.md"
cat "$OUT/summary.md"
exit $FAILED
