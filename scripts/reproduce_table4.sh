#!/usr/bin/env bash
# Reproduce the layout of the paper's Table 4 (Sec. 4.3) on one multi-task pair (one caption set + one
# multiple-choice set): every method fine-tunes the same starting model on the same data with the same
# trainable set (connector + last 2 decoder layers) and the same schedule, one run each:
#
#   the paper's counterparts and NRCA:  full  l2  grafting  random-mask  magnitude-mask  nrca
#   related methods of the same line:   spider  mi-consistency
#
# then the starting model is evaluated zero-shot on the same test splits, and
#   python evaluate.py table OUT_ROOT/<method>... --zero-shot OUT_ROOT/zero-shot
# prints the Table 4 layout (CIDEr x100, accuracy %, AVG, and the "+ vs zero-shot" rows), followed by a
# small table of each method's extra memory (the "extra memory of the method" line train.py prints at
# start; paper Table 2), its peak memory and its training time.
#
# Usage:
#   scripts/reproduce_table4.sh [OUT_ROOT] [extra train.py flags...]
#   scripts/reproduce_table4.sh                      # embedded default: the testbed (seed 0), tiny-llava, CPU
#   (for every method x 3 seeds with mean +- std and the figures, use scripts/reproduce_testbed.py)
#   scripts/reproduce_table4.sh runs/t4_llava --preset llava --model /ckpt/llava-1.5-7b-hf \
#       --train caption:flickr30k=/data/flickr30k.json --train choice:scienceqa=/data/sqa.json \
#       --test caption:flickr30k=/data/flickr30k_test.json --test choice:scienceqa=/data/sqa_test.json \
#       --image-folder /data/images
#   LAUNCH="torchrun --nproc_per_node=8" scripts/reproduce_table4.sh runs/t4_llava --preset llava ...
#       (--batch-size must be a multiple of --micro-batch-size x ranks: e.g. --micro-batch-size 2 on 8 ranks;
#       with --fsdp the per-epoch evaluation is off and each run is evaluated after training instead)
#
# Environment:
#   LAUNCH    how train.py and evaluate.py are started (default: python)
#   METHODS   the methods to run, space separated (default: all eight above)
#
# OUT_ROOT (default runs/table4) gets one run folder per method, zero-shot/, logs/ and, for the embedded
# default, the cached pre-trained tiny base model (base-tiny-llava-testbed*-seed0-e3/, shared by every method).
# A method whose OUT_ROOT/<method>/final exists is not trained again (delete the folder to rerun it);
# an interrupted one continues from its latest checkpoint (--resume).
# The starting model of the zero-shot row is read from the first run's config.json ("model": train.py
# records the resolved path there, i.e. the cached base model for the embedded default).
#
# Cost on CPU: see README ('Every method side by side').
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_ROOT="${1:-runs/table4}"
if [[ $# -gt 0 ]]; then shift; fi
if [[ "$OUT_ROOT" == -* ]]; then
    echo "reproduce_table4.sh: the first argument is OUT_ROOT, got the flag $OUT_ROOT" >&2
    exit 2
fi
OUT_ROOT="$(mkdir -p "$OUT_ROOT" && cd "$OUT_ROOT" && pwd)"
read -r -a LAUNCH_CMD <<< "${LAUNCH:-python}"
read -r -a RUN_METHODS <<< "${METHODS:-full l2 grafting random-mask magnitude-mask nrca spider mi-consistency}"
mkdir -p "$OUT_ROOT/logs"
sweep_start=$SECONDS

# --- 1. one fine-tuning run per method -------------------------------------------------------------------
for method in "${RUN_METHODS[@]}"; do
    run="$OUT_ROOT/$method"
    if [[ -d "$run/final" ]]; then
        echo "== $method: $run/final exists, kept"
        continue
    fi
    resume=()
    if [[ -f "$run/latest" ]]; then
        resume=(--resume)
        echo "== $method: continuing from $run/$(cat "$run/latest")"
    else
        rm -rf "$run"  # a run that never reached a checkpoint: start clean (metrics.jsonl is appended to)
        echo "== $method -> $run"
    fi
    started=$SECONDS
    # Our --method/--out-dir come last so that they win over the same flags in "$@".
    "${LAUNCH_CMD[@]}" "$REPO/train.py" "$@" --method "$method" --out-dir "$run" "${resume[@]}" \
        2>&1 | tee -a "$OUT_ROOT/logs/$method.log"
    echo $((SECONDS - started)) > "$OUT_ROOT/logs/$method.seconds"
done

# --- 2. evaluation arguments of the runs' test data, and the starting model ------------------------------
first="$OUT_ROOT/${RUN_METHODS[0]}"
mapfile -t EVAL_ARGS < <(python - "$first/config.json" <<'EOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
args = [f"--test={t}" for t in cfg["test"] or []] or [f"--data={cfg['data_dir']}"]
if cfg["test"] and cfg["image_folder"]:
    args.append(f"--image-folder={cfg['image_folder']}")
args.append(f"--max-new-tokens={cfg['eval_max_new_tokens']}")
if cfg["eval_limit"]:
    args.append(f"--limit={cfg['eval_limit']}")
print("\n".join(args))
EOF
)
base_model="$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["model"])' "$first/config.json")"

# Runs without per-epoch evaluation (--fsdp on several ranks, --no-eval-every-epoch) are evaluated now.
for method in "${RUN_METHODS[@]}"; do
    run="$OUT_ROOT/$method"
    if [[ ! -f "$run/eval.json" ]] && ! grep -q '"eval"' "$run/metrics.jsonl" 2>/dev/null; then
        echo "== evaluating $run"
        "${LAUNCH_CMD[@]}" "$REPO/evaluate.py" "$run" "${EVAL_ARGS[@]}" 2>&1 | tee -a "$OUT_ROOT/logs/$method.log"
    fi
done

# --- 3. zero-shot: the starting model on the same test splits ---------------------------------------------
if [[ ! -f "$OUT_ROOT/zero-shot/eval.json" ]]; then
    echo "== zero-shot evaluation of $base_model"
    "${LAUNCH_CMD[@]}" "$REPO/evaluate.py" "$base_model" "${EVAL_ARGS[@]}" --out "$OUT_ROOT/zero-shot" \
        2>&1 | tee "$OUT_ROOT/logs/zero-shot.log"
fi

# --- 4. the tables ------------------------------------------------------------------------------------------
declare -A PAPER_NAME=([full]="Full FT" [l2]="L2-Reg" [grafting]="Grafting" [random-mask]="Ran Mask"
                       [magnitude-mask]="Mag Mask" [nrca]="NRCA" [spider]="SPIDER" [mi-consistency]="MI-Consistency")
runs=() names=()
for method in "${RUN_METHODS[@]}"; do
    runs+=("$OUT_ROOT/$method")
    names+=("${PAPER_NAME[$method]:-$method}")
done
{
    echo
    echo "Table 4 layout: every method from $base_model (OUT_ROOT $OUT_ROOT)"
    echo
    python "$REPO/evaluate.py" table "${runs[@]}" --zero-shot "$OUT_ROOT/zero-shot" --names "${names[@]}"
    echo
    echo "Extra memory of each method (train.py's start line; paper Table 2), peak memory (GPU: max allocated,"
    echo "CPU: max resident set of the process) and training time (incl. per-epoch evaluation):"
    echo
    echo "| Methods | extra memory (MiB) | peak memory (MiB) | training time (s) |"
    echo "|---|---:|---:|---:|"
    for i in "${!RUN_METHODS[@]}"; do
        method="${RUN_METHODS[$i]}"
        extra="$(grep -o 'extra memory of the method: [0-9.]* MiB' "$OUT_ROOT/logs/$method.log" 2>/dev/null \
                 | tail -n 1 | awk '{print $6}' || true)"
        peak="$(python -c 'import json, sys
peaks = [json.loads(line).get("peak_memory_mb") for line in open(sys.argv[1]) if line.strip()]
print(f"{max(p for p in peaks if p is not None):.0f}")' "$OUT_ROOT/$method/metrics.jsonl" 2>/dev/null || true)"
        seconds="$(cat "$OUT_ROOT/logs/$method.seconds" 2>/dev/null || true)"
        echo "| ${names[$i]} | ${extra:-?} | ${peak:-?} | ${seconds:-?} |"
    done
    echo
    echo "wall time of this invocation: $((SECONDS - sweep_start)) s (runs kept from an earlier one not included)"
} | tee "$OUT_ROOT/table4.md"
