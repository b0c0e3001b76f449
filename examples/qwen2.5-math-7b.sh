#!/usr/bin/env bash
# DCPO on Qwen2.5-Math-7B with the paper's settings (DESIGN.md 1.6), for one GPU node.
# The same loop as examples/tiny_loop.sh, with the vLLM engine and Hub model and data:
# 512 prompts x 16 responses per step, temperature 1.0, top-p 1.0, ~3k-token responses,
# AdamW lr 1e-6 with 10 warm-up steps, weight decay 0.1, grad norm 1.0, no KL, several
# mini-batch updates per step; AIME24/25, AMC23 and MATH-500 evaluated every EVAL_EVERY steps.
#
#   examples/qwen2.5-math-7b.sh RUN_DIR [STEPS]
#
# Needs `pip install 'dcpo-cli[vllm]'`, a GPU, and access to the Hub (or local copies: set
# MODEL to a model directory, DATA to a prompts/JSONL/verl file, DCPO_DATA_DIR to a folder
# holding the benchmark files). Rerun the same command after a crash: finished stages are
# skipped and train-step never absorbs a step twice.
set -euo pipefail

RUN=${1:?usage: examples/qwen2.5-math-7b.sh RUN_DIR [STEPS]}
STEPS=${2:-300}
MODEL=${MODEL:-Qwen/Qwen2.5-Math-7B}
DATA=${DATA:-BytedTsinghua-SIA/DAPO-Math-17k}  # the official DCPO training set (verl layout)
ALGO=${ALGO:-dcpo}                             # dcpo, grpo, dapo or gspo
SEED=${SEED:-0}
BATCH=${BATCH:-512}
N=${N:-16}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-3072}
MINI_BATCH=${MINI_BATCH:-128}                  # prompts per optimizer update: 4 per step
EVAL_EVERY=${EVAL_EVERY:-10}
EVAL_AT=${EVAL_AT:-32}
DCPO=${DCPO:-dcpo}
# GPUs: each vLLM engine spans TP GPUs (tensor parallel; the official DCPO runs used 4), and
# DP engines run side by side, one process per group of TP GPUs, each generating its
# --shard i/DP of the step's prompts. DP x TP GPUs in all; e.g. TP=4 DP=2 on 8 GPUs.
TP=${TP:-1}
DP=${DP:-1}
ENGINE_FLAGS=(--engine vllm --tensor-parallel-size "$TP")

mkdir -p "$RUN"
prompts=$RUN/train.parquet
[ -f "$prompts" ] || $DCPO prepare "$DATA" --out "$prompts"

evaluate() {  # evaluate MODEL LABEL
  $DCPO eval --model "$1" --benchmark aime24 --benchmark aime25 --benchmark amc23 \
    --benchmark math500 --avg-at "$EVAL_AT" --max-new-tokens "$MAX_NEW_TOKENS" \
    --seed "$SEED" "${ENGINE_FLAGS[@]}" --out "$RUN/eval/$2"
}

rollout() {  # rollout MODEL STEP DIR: DP shards in parallel, one per group of TP GPUs
  local shards=() pids=()
  for ((i = 0; i < DP; i++)); do
    local out=$3/rollouts-$i-of-$DP.parquet
    shards+=("$out")
    [ -f "$out" ] && continue
    CUDA_VISIBLE_DEVICES=$(seq -s, $((i * TP)) $((i * TP + TP - 1))) \
      $DCPO rollout --model "$1" --prompts "$prompts" --step "$2" --batch-size "$BATCH" \
      --n "$N" --temperature 1.0 --top-p 1.0 --max-new-tokens "$MAX_NEW_TOKENS" \
      --seed "$SEED" --shard "$i/$DP" "${ENGINE_FLAGS[@]}" --out "$out" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done  # set -e: a failed shard stops the run
  ROLLOUTS=("${shards[@]}")
}

# Resume: redo the newest train-step (it only syncs the SAS state if a kill came between its
# checkpoint and the state update) and go on from there.
start=0
last=$(ls -d "$RUN"/ckpt/step-* 2>/dev/null | sort | tail -n 1 || true)
[ -z "$last" ] || start=$((10#${last##*step-} - 1))
model=$MODEL
[ "$start" -eq 0 ] || model=$RUN/ckpt/step-$(printf '%06d' "$start")
[ -n "$last" ] || evaluate "$model" step-000000

for ((step = start; step < STEPS; step++)); do
  name=$(printf '%06d' "$step")
  next=$RUN/ckpt/step-$(printf '%06d' $((step + 1)))
  mkdir -p "$RUN/steps/$name"
  scored=$RUN/steps/$name/scored.parquet

  if [ ! -f "$scored" ]; then
    rollout "$model" "$step" "$RUN/steps/$name"
    $DCPO score "${ROLLOUTS[@]}" --out "$scored"
  fi
  $DCPO train-step --model "$model" --scored "$scored" --state "$RUN/state.json" \
    --out "$next" --algo "$ALGO" --lr 1e-6 --warmup-steps 10 --weight-decay 0.1 \
    --max-grad-norm 1.0 --mini-batch-size "$MINI_BATCH" --micro-batch-tokens 32768 \
    --gradient-checkpointing --seed "$SEED" --metrics-log "$RUN/metrics.jsonl"
  model=$next
  if (((step + 1) % EVAL_EVERY == 0)); then
    evaluate "$model" "step-$(printf '%06d' $((step + 1)))"
  fi
done

$DCPO report "$RUN"
