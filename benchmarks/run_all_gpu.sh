#!/usr/bin/env bash
# The one script a GPU session runs: every GPU benchmark of benchmarks/, each under its own timeout so that one
# failure or hang does not stop the rest, all under one overall time budget. Prints a combined table last.
#
#   OUT=/path/to/results bash benchmarks/run_all_gpu.sh          # from the repository root, on an H100/H200
#   TINY=1 OUT=/tmp/rehearsal bash benchmarks/run_all_gpu.sh     # CPU rehearsal: tiny models, same steps
#
# Environment: OUT (results folder; default bench-out); BUDGET_S (overall wall-clock budget in seconds, default
# 540 = 9 minutes, leaving room for the machine's start in a 15-minute lease; each step's timeout is cut to what
# is left); PYTHON (default python3); TINY=1 (rehearsal: tiny models on the CPU with fewer steps and calls, the
# GPU-only steps skipped; what tests/test_benchmarks_smoke.py runs).
# LONG_SEQS (the long-context lengths, default 131072,16384,32768,65536: the most wanted first); GENERATE_ARGS
# (benchmarks/generate.py's arguments on a GPU; default '--order compiled,eager,graph,transformers,long --repeats 1
# --profile --long-prompt 131072': the long part at the full context, chunked prefill against the whole prompt at
# once; the 32,768-token rows were measured on 2026-11-28).
#
# What lands in $OUT (within what the device tool brings back): run_all.log (every step's output), steps.tsv
# (step, verdict, seconds), summary.md (the combined table), train_step-4b.json, train_step-4b-peft.json,
# packing_gain-4b.json, train_step-4b-long.json, train_step-27b.json (cards over 100 GB only),
# train_step-4b-frozen-vision.json, train_step-4b-offload.json, generate-4b.json,
# flex_tune-4b.json, verify-4b.json (more than the device tool's 8 files: tar them, or split the parts).
#
# Time on an H200 (measured 2026-11-28; machine start not included; compiling dominates first steps):
#   sft 4b              92-110 s: flex check, then ours fast (first step compiles: 30 s), ours plain,
#                       transformers, 2 warmup + 3 timed steps each, one profiled step.
#   lora 4b             70 s: ours fast (first step 44 s) and transformers + peft.
#   packing gain 4b     ~120 s: the packed step measured 13 s (compiling) + 4.8 s; then the padded one (24
#                       micro-batches of 24 shapes) and transformers on it. Timeout 130 s.
#   long 4b             286 s: 131,072 (first step 63 s, then 17 s), 16,384, 32,768, 65,536, transformers' rows
#                       (its 65,536 and 131,072 rows run out of memory).
#   27B LoRA            85 s (H200 only): ours fast (first step 47 s) and transformers + peft.
#   levers 4b           unmeasured; ~150 s: SFT with the SigLIP tower frozen (ours fast and transformers, first
#                       step compiles), then ours fast with AdamW's state on the host (optim.cpu_offload: ~52 GB
#                       of host memory for the 4B's fp32 masters and moments; the update runs on the CPU).
#   generate 4b         ~250 s with the default GENERATE_ARGS: the compiled step compiles in ~60 s per batch
#                       size; eager batch 8 and transformers ~60 s; the long part ~60 s at 32,768 tokens (at 131,072, the default now: unmeasured). gpu_verify 4b ~150 s.
#   flex_tune 4b        unmeasured; ~6 candidates x (compile ~15 s + timing): ~100 s.
#   cuda tests          unmeasured; the two CUDA-only tests (compiled decode and engine): compiling, ~60-120 s.
# PARTS picks and orders the steps (train = sft,lora). Default:
# sft,generate,cudatests,flex,packing,27b,levers,verify,lora,long: what the H200 runs of 2026-11-28 left unmeasured
# first (the SFT step with the compiled loss and vision blocks and the clipping inside fused AdamW, with its profile;
# generate's compiled-vs-eager tokens after the decode-attention and prefill changes, and the CUDA-only tests;
# flex kernel options; the padded packing baseline; the 27B LoRA memory under the low-rank policy; the frozen
# tower and the optimizer on the host); the budget cuts the last.

set -u
cd "$(dirname "$0")/.."

OUT=${OUT:-bench-out}
BUDGET_S=${BUDGET_S:-540}
PARTS=${PARTS:-sft,generate,cudatests,flex,packing,27b,levers,verify,lora,long}
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
    # A Python stack dump of every thread 25 s before the timeout (train_step.benchmark_setup): a hang says where.
    BENCH_STACKS_AFTER_S=$((limit > 60 ? limit - 25 : 0)) timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
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
    # Rehearsal: tiny sizes on the CPU, and fewer steps/calls; everything else as on the GPU. Checkpointing is forced
    # to selective so that the rehearsal runs it (on the GPU the length decides); nothing compiles on a CPU.
    SIZE=(--tiny --device cpu)
    TRAIN_COUNTS=(--warmup 1 --steps 1 --ac selective --profile)
    LONG_COUNTS=(--warmup 1 --steps 1 --seqs "${LONG_SEQS:-96,128}")
    PACKING_COUNTS=(--warmup 1 --steps 1)
    LEVER_COUNTS=(--warmup 1 --steps 1)
    FLEX_CHECK=(--flex-check 96)
    GENERATE_COUNTS=(--repeats 1 --new-tokens 8 --warmup-tokens 2 ${GENERATE_ARGS:-})
    NAME=tiny
    GPU_MIB=0
else
    SIZE=(--model 4b)
    TRAIN_COUNTS=(--warmup 2 --steps 3 --profile)
    LONG_COUNTS=(--warmup 1 --steps 1 --seqs "${LONG_SEQS:-131072,16384,32768,65536}")
    PACKING_COUNTS=(--warmup 1 --steps 1 --conversations 48)
    LEVER_COUNTS=(--warmup 1 --steps 2)
    FLEX_CHECK=(--flex-check 4096)
    GENERATE_COUNTS=(${GENERATE_ARGS:---order compiled,eager,graph,transformers,long --repeats 1 --profile --long-prompt 131072})
    NAME=4b
    GPU_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1)
    [[ "$GPU_MIB" =~ ^[0-9]+$ ]] || GPU_MIB=$("$PYTHON" -c \
        "import torch; print(torch.cuda.get_device_properties(0).total_memory // 2**20 if torch.cuda.is_available() else 0)")
    nvidia-smi 2>&1 | tee -a "$LOG"
fi
echo "card memory: ${GPU_MIB} MiB; budget ${BUDGET_S} s; parts ${PARTS}; commit $(git describe --always --dirty 2>/dev/null || echo unknown)" | tee -a "$LOG"

# Most wanted first: the budget cuts whatever comes last.
IFS=, read -r -a PART_LIST <<<"${PARTS//train/sft,lora}"
for part in "${PART_LIST[@]}"; do
    case "$part" in
    sft)
        # SFT at 4,096 tokens: ours fast and plain (their first-step losses compared), transformers; the
        # flex-vs-sdpa check first.
        step "train_step $NAME SFT" 200 "$PYTHON" benchmarks/train_step.py "${SIZE[@]}" "${TRAIN_COUNTS[@]}" \
            "${FLEX_CHECK[@]}" --mode sft --ours-paths fast,plain --out "$OUT"
        ;;
    lora)
        # LoRA at 4,096 tokens: ours fast and transformers + peft.
        step "train_step $NAME LoRA" 150 "$PYTHON" benchmarks/train_step.py "${SIZE[@]}" "${TRAIN_COUNTS[@]}" \
            --mode peft --ours-paths fast --tag=-peft --out "$OUT"
        ;;
    packing)
        # Useful tokens/s of whole steps over one set of conversations: packed rows vs padded ones (issue 5).
        step "packing gain $NAME" 130 "$PYTHON" benchmarks/packing_gain.py "${SIZE[@]}" "${PACKING_COUNTS[@]}" \
            --out "$OUT"
        ;;
    long)
        # Long context, full fine-tuning with the optimizer step: ours fast against transformers (OOM reported).
        step "train_step $NAME long" 300 "$PYTHON" benchmarks/train_step.py "${SIZE[@]}" "${LONG_COUNTS[@]}" \
            --mode sft --ours-paths fast --tag=-long --out "$OUT"
        ;;
    27b)
        if ((GPU_MIB > 100 * 1024)); then
            # transformers with gradient checkpointing: without it the 27B's activations at 4,096 tokens do not fit.
            step "train_step 27b LoRA" 150 "$PYTHON" benchmarks/train_step.py --model 27b --mode peft --ours-paths fast \
                --seqs 4096 --warmup 1 --steps 2 --hf-checkpointing on --out "$OUT"
        else
            skip "train_step 27b LoRA" "needs a card with more than 100 GB (54 GB of bf16 weights)"
        fi
        ;;
    levers)
        # Issue 5's levers not yet timed on a GPU, at 4,096 tokens: the SigLIP tower frozen (both sides; against
        # the sft part's trained tower), and AdamW's state on the host (ours only: transformers has no such setting).
        step "train_step $NAME SFT frozen vision" 150 "$PYTHON" benchmarks/train_step.py "${SIZE[@]}" \
            "${LEVER_COUNTS[@]}" --mode sft --ours-paths fast --freeze-vision --tag=-frozen-vision --out "$OUT"
        step "train_step $NAME SFT AdamW on host" 150 "$PYTHON" benchmarks/train_step.py "${SIZE[@]}" \
            "${LEVER_COUNTS[@]}" --mode sft --ours-paths fast --only ours --cpu-offload --tag=-offload --out "$OUT"
        ;;
    flex)
        if [[ -n "$TINY" ]]; then
            skip "flex_tune $NAME" "needs CUDA (Triton kernel options)"
        else
            # FlexAttention kernel options at the 4B head shapes: the winner goes into GEMMA3VL_FLEX_KERNEL_OPTIONS.
            step "flex_tune 4b" 150 "$PYTHON" benchmarks/flex_tune.py --model 4b --seq 4096 --out "$OUT"
        fi
        ;;
    generate)
        step "generate $NAME" 360 "$PYTHON" benchmarks/generate.py "${SIZE[@]}" ${GENERATE_COUNTS[@]+"${GENERATE_COUNTS[@]}"} \
            --out "$OUT"
        ;;
    verify)
        if [[ -n "$TINY" ]]; then
            skip "gpu_verify $NAME" "needs CUDA"
        else
            step "gpu_verify 4b" 240 "$PYTHON" benchmarks/gpu_verify.py --model 4b --work /tmp/gemma3vl-gpu-verify --out "$OUT"
            rm -rf /tmp/gemma3vl-gpu-verify
        fi
        ;;
    cudatests)
        # The tests that skip without CUDA (compiled decode == eager decode; the compiled server engine == generate
        # alone; xgrammar's CUDA mask == the CPU mask, skipped where the image has no xgrammar), on tiny models: they
        # take the compile time only. Needs pytest in the image (not pytest-xdist: pyproject's `-n auto` is dropped).
        if [[ -n "$TINY" ]]; then
            skip "cuda tests" "needs CUDA"
        elif ! "$PYTHON" -c "import pytest" 2>/dev/null; then
            skip "cuda tests" "pytest is not installed"
        else
            step "cuda tests" 150 "$PYTHON" -m pytest -q -p no:cacheprovider -p no:xdist -o addopts= -rs \
                tests/test_generate_engine.py::test_compiled_decode_on_cuda_equals_eager \
                tests/test_generate_continuous.py::test_compiled_engine_on_cuda_equals_solo_generate \
                tests/test_structured_output.py::test_the_cuda_mask_equals_the_cpu_mask
        fi
        ;;
    *)
        skip "$part" "unknown part (PARTS takes train (= sft,lora), sft, lora, packing, long, 27b, levers, generate, cudatests, flex, verify)"
        ;;
    esac
done

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
for data in load("train_step-*.json") + load("packing_gain-*.json") + load("generate-*.json"):
    if "unreadable" in data:
        rows.append(["?", data["unreadable"], "", "", ""])
        continue
    context = context or data
    rows += data.get("summary_rows", [])
    for batch, match in (data.get("greedy_agreement") or {}).items():
        if match is not None:
            verdict = "equal" if match["equal"] else f"differ (common prefix {match['min_common_prefix']} tokens)"
            rows.append([f"generate {data['model']}", f"greedy tokens ours vs transformers, {batch}", verdict, "", ""])
for data in load("flex_tune-*.json"):
    if "unreadable" in data:
        rows.append(["?", data["unreadable"], "", "", ""])
        continue
    context = context or data
    timed = [r for r in data.get("rows", []) if "total_ms" in r]
    best = min((r for r in timed if r["status"] == "ok"), key=lambda r: r["total_ms"], default=None)
    if best is not None and timed and timed[0]["options"] == {}:
        verdict = (f"GEMMA3VL_FLEX_KERNEL_OPTIONS='{json.dumps(best['options'])}': {best['total_ms']:.1f} ms per step "
                   f"vs {timed[0]['total_ms']:.1f} default")
    else:
        verdict = "no candidate finished"
    rows.append([f"flex_tune {data.get('model')}", f"fwd+bwd, seq {data.get('seq')}", verdict, "", ""])
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
