#!/usr/bin/env bash
# A complete DCPO run on the built-in tiny model: rollout -> score -> train-step, STEPS times,
# then an evaluation on the tiny test set. Every stage whose output already exists is
# skipped, so after a crash (or a scheduler's SIGKILL) you simply run the same command again.
#
#   examples/tiny_loop.sh RUN_DIR [STEPS]
#
# Environment knobs (defaults in brackets): ALGO [dcpo], SEED [0], TINY_SIZE [default],
# BATCH [32] prompts per step, N [8] responses per prompt, LR [2e-4], EVAL_AT [8] samples per
# test problem, REWARD [math-verify] your own reward as package.module:function. Copy this file as the starting point of your own runs.
set -euo pipefail

RUN=${1:?usage: examples/tiny_loop.sh RUN_DIR [STEPS]}
STEPS=${2:-20}
ALGO=${ALGO:-dcpo}
SEED=${SEED:-0}
TINY_SIZE=${TINY_SIZE:-default}
BATCH=${BATCH:-32}
N=${N:-8}
LR=${LR:-2e-4}
EVAL_AT=${EVAL_AT:-8}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-48}
REWARD=${REWARD:-}
DCPO=${DCPO:-dcpo}

tiny=$RUN/tiny
if [ ! -d "$tiny/model" ]; then
  $DCPO tiny init "$tiny" --seed "$SEED" --size "$TINY_SIZE"
fi

evaluate() {  # evaluate MODEL LABEL
  $DCPO eval --model "$1" --benchmark "$tiny/test.parquet" --avg-at "$EVAL_AT" \
    --max-new-tokens "$MAX_NEW_TOKENS" --seed "$SEED" --engine hf --out "$RUN/eval/$2"
}

evaluate "$tiny/model" step-000000

model=$tiny/model
for ((step = 0; step < STEPS; step++)); do
  name=$(printf '%06d' "$step")
  next=$RUN/ckpt/step-$(printf '%06d' $((step + 1)))
  mkdir -p "$RUN/steps/$name"
  rollouts=$RUN/steps/$name/rollouts.parquet
  scored=$RUN/steps/$name/scored.parquet

  [ -f "$rollouts" ] || $DCPO rollout --model "$model" --prompts "$tiny/train.parquet" \
    --step "$step" --batch-size "$BATCH" --n "$N" --temperature 1.0 \
    --max-new-tokens "$MAX_NEW_TOKENS" --seed "$SEED" --engine hf --out "$rollouts"
  [ -f "$scored" ] || $DCPO score "$rollouts" --out "$scored" ${REWARD:+--reward "$REWARD"}
  # train-step is idempotent: with its checkpoint already written it only finishes the
  # state update (if a kill interrupted it) and returns.
  $DCPO train-step --model "$model" --scored "$scored" --state "$RUN/state.json" \
    --out "$next" --algo "$ALGO" --lr "$LR" --warmup-steps 0 --seed "$SEED" \
    --metrics-log "$RUN/metrics.jsonl"
  model=$next
done

evaluate "$model" "step-$(printf '%06d' "$STEPS")"
echo "final model: $model"
