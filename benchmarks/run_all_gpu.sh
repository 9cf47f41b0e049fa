#!/usr/bin/env bash
# The one script a GPU session runs: every GPU benchmark of benchmarks/, each under its own timeout so that one
# failure or hang does not stop the rest, all under one overall time budget. Prints a combined table last.
#
#   OUT=/path/to/results bash benchmarks/run_all_gpu.sh          # from the repository root, on an H100/H200
#   TINY=1 OUT=/tmp/rehearsal bash benchmarks/run_all_gpu.sh     # CPU rehearsal: tiny models, same steps
#
# Environment: OUT (results folder; default bench-out); BUDGET_S (overall wall-clock budget in seconds, default
# 480 = 8 minutes, leaving room for the machine's start in a 10-minute lease; each step's timeout is cut to what
# is left); PYTHON (default python3); TINY=1 (rehearsal: tiny models on the CPU with fewer steps and calls, the
# GPU-only steps skipped; what tests/test_benchmarks_smoke.py runs).
#
# What lands in $OUT (7 files, within what the device tool brings back): run_all.log (every step's output),
# steps.tsv (step, verdict, seconds), summary.md (the combined table), train_step-4b.json, generate-4b.json,
# train_step-27b.json (cards over 100 GB only), verify-4b.json.
#
# Estimated time on an H100 (80 GB), machine start not included:
#   train_step 4b  ~70 s   imports ~10 s; six variants (ours bf16 sft/peft, transformers sft/peft, ours fp32-master
#                          sft/peft; the fp32 SFT is expected to report OOM on 80 GB), each: model built on the GPU
#                          in seconds + 2 warmup + 5 timed steps of ~0.5-1 s at 4,096 tokens.
#   generate 4b    ~4 min  ours: 2 batches x (warmup + 2 x 128 tokens), ~15 s; transformers at ~13 tok/s (the
#                          anchor): ~10 s a call, ~45 s; then ours compiled (~1-2 min with its compilation), then the
#                          server's engine, eager (~10 s) and compiled (one more compilation, ~1 min): each phase
#                          writes the JSON, so a timeout only loses what came last (the compiled engine).
#   27B LoRA       ~50 s   H200 only: 54 GB of bf16 weights built on the GPU (twice: at 2,048 and 4,096 tokens),
#                          1 warmup + 2 steps each.
#   gpu_verify 4b  ~150 s  writes 8.6 GB of random weights (~1 min), imports them (~20 s), loads both models,
#                          compares logits and 16 greedy tokens.
#   total          ~5 min on an H100 (~7 min with a compiled generate), capped at BUDGET_S (gpu_verify, last, is
#                  what a slow run loses).

set -u
cd "$(dirname "$0")/.."

OUT=${OUT:-bench-out}
BUDGET_S=${BUDGET_S:-480}
PYTHON=${PYTHON:-python3}
TINY=${TINY:-}
mkdir -p "$OUT"
LOG="$OUT/run_all.log"
STEPS="$OUT/steps.tsv"
: >"$LOG"
: >"$STEPS"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
START=$SECONDS

# step NAME TIMEOUT_S COMMAND...: run COMMAND under min(TIMEOUT_S, what is left of the budget), log it, record it.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - (SECONDS - START)))
    if ((left < 20)); then
        printf '%s\tskipped: time budget spent\t0\n' "$name" >>"$STEPS"
        echo "=== $name: skipped, time budget spent" | tee -a "$LOG"
        return
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (timeout ${limit} s): $*" | tee -a "$LOG"
    local began=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]} verdict=ok
    if ((rc == 124 || rc == 137)); then
        verdict="timed out after ${limit} s"
    elif ((rc != 0)); then
        verdict="exit status $rc"
    fi
    printf '%s\t%s\t%s\n' "$name" "$verdict" "$((SECONDS - began))" >>"$STEPS"
}

skip() {
    printf '%s\tskipped: %s\t0\n' "$1" "$2" >>"$STEPS"
    echo "=== $1: skipped, $2" | tee -a "$LOG"
}

if [[ -n "$TINY" ]]; then
    # Rehearsal: tiny sizes on the CPU, and fewer steps/calls; everything else as on the GPU.
    SIZE=(--tiny --device cpu)
    TRAIN_COUNTS=(--warmup 1 --steps 1)
    GENERATE_COUNTS=(--repeats 1 --new-tokens 8 --warmup-tokens 2)
    NAME=tiny
    GPU_MIB=0
else
    SIZE=(--model 4b)
    TRAIN_COUNTS=()
    GENERATE_COUNTS=()
    NAME=4b
    GPU_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1)
    [[ "$GPU_MIB" =~ ^[0-9]+$ ]] || GPU_MIB=$("$PYTHON" -c \
        "import torch; print(torch.cuda.get_device_properties(0).total_memory // 2**20 if torch.cuda.is_available() else 0)")
    nvidia-smi 2>&1 | tee -a "$LOG"
fi
echo "card memory: ${GPU_MIB} MiB; budget ${BUDGET_S} s; commit $(git describe --always --dirty 2>/dev/null || echo unknown)" | tee -a "$LOG"

# Most wanted first: the budget cuts whatever comes last.
step "train_step $NAME" 180 "$PYTHON" benchmarks/train_step.py "${SIZE[@]}" ${TRAIN_COUNTS[@]+"${TRAIN_COUNTS[@]}"} \
    --ours-weights bf16,fp32 --out "$OUT"
step "generate $NAME" 300 "$PYTHON" benchmarks/generate.py "${SIZE[@]}" ${GENERATE_COUNTS[@]+"${GENERATE_COUNTS[@]}"} \
    --out "$OUT"
if ((GPU_MIB > 100 * 1024)); then
    # 2,048 tokens first: if 4,096 (the recipe's length) does not fit, the shorter point still says what does.
    step "train_step 27b LoRA memory" 120 "$PYTHON" benchmarks/train_step.py --model 27b --mode peft --only ours \
        --seqs 2048,4096 --warmup 1 --steps 2 --out "$OUT"
else
    skip "train_step 27b LoRA memory" "needs a card with more than 100 GB (54 GB of bf16 weights)"
fi
if [[ -n "$TINY" ]]; then
    skip "gpu_verify $NAME" "needs CUDA"
else
    step "gpu_verify 4b" 240 "$PYTHON" benchmarks/gpu_verify.py --model 4b --work /tmp/gemma3vl-gpu-verify --out "$OUT"
    rm -rf /tmp/gemma3vl-gpu-verify
fi

# The combined table, from the JSON files the steps wrote (also whatever a timed-out step wrote before it stopped).
"$PYTHON" - "$OUT" "$STEPS" "$((SECONDS - START))" <<'PY' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path

out, steps_file, total = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]


def load(pattern):
    found = []
    for path in sorted(out.glob(pattern)):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            found.append({"unreadable": f"{path.name}: {exc}"})
    return found


rows, context = [], None
for data in load("train_step-*.json") + load("generate-*.json"):
    if "unreadable" in data:
        rows.append(["?", data["unreadable"], "", "", ""])
        continue
    context = context or data
    rows += data.get("summary_rows", [])
    for batch, match in (data.get("greedy_agreement") or {}).items():
        if match is not None:
            verdict = "equal" if match["equal"] else f"differ (common prefix {match['min_common_prefix']} tokens)"
            rows.append([f"generate {data['model']}", f"greedy tokens ours vs transformers, {batch}", verdict, "", ""])
for data in load("verify-*.json"):
    if "unreadable" in data:
        rows.append(["?", data["unreadable"], "", "", ""])
        continue
    context = context or data
    result = "PASS" if data.get("passed") else "FAIL: " + "; ".join(data.get("failures", []))
    rows.append([f"gpu_verify {data.get('model')}", f"logits + greedy vs transformers ({data.get('dtype')})",
                 f"{result}; cosine {data.get('cosine', float('nan')):.6f}; greedy {'equal' if data.get('greedy_equal') else 'DIFFERENT'}",
                 "", ""])

print("\n## Steps\n")
print("| step | verdict | seconds |\n|---|---|---:|")
for line in steps_file.read_text().splitlines():
    name, verdict, seconds = line.split("\t")
    print(f"| {name} | {verdict} | {seconds} |")
print(f"\nTotal: {total} s.")
if context:
    print(f"\n## Results: {context.get('device')}, torch {context.get('torch')}, "
          f"transformers {context.get('transformers')}, commit {context.get('commit')}, {context.get('date')}\n")
else:
    print("\n## Results\n")
print("| benchmark | variant | result | peak memory | note |\n|---|---|---|---|---|")
for row in rows:
    print("| " + " | ".join(str(cell) for cell in row) + " |")
if not rows:
    print("| (no results) | | | | |")
PY
