#!/usr/bin/env bash
# A complete DCPO run on the built-in tiny model: rollout -> score -> train-step, STEPS times,
# then an evaluation on the tiny test set. Every stage whose output already exists is
# skipped, so after a crash (or a scheduler's SIGKILL) you simply run the same command again.
#
#   examples/tiny_loop.sh RUN_DIR [STEPS]
#
# Environment knobs (defaults in brackets): ALGO [dcpo], SEED [0], TINY_SIZE [default],
# BATCH [32] prompts per step, N [8] responses per prompt, LR [2e-4], EVAL_AT [8] samples per
# test problem, REWARD [math-verify] your own reward as package.module:function,
# TRAIN_PROCS [1] processes of train-step (FSDP2, `--nproc-per-node`).
# ALGO=dcpo scores 1 / 0 / -1 (right / boxed but wrong / no boxed answer), as the official
# DCPO recipe; the baselines score 1 / 0. ALGO=dapo refills each step as DAPO does: rollout
# rounds (`dcpo rollout --round k`) sample further prompts until TARGET [BATCH] groups have
# mixed outcomes, or MAX_ROUNDS [4] rounds are done (then it trains on what it has, with a
# warning), and train-step trains on the first TARGET of them. TRAIN_ARGS [none]: more
# train-step flags, e.g. TRAIN_ARGS="--lora-rank 8 --lr 2e-3" trains a LoRA adapter.
# SERVER=1 starts one
# `dcpo serve` (hf engine, any free loopback port) before the loop, generates every rollout
# and evaluation through it (each step's checkpoint is loaded into it in place), and stops
# it at the end, on an error and on Ctrl-C: the same files, without an engine start per stage.
# LAG=K [0] overlaps generation with training at a fixed lag: step s trains checkpoint s on
# rollouts sampled by checkpoint s - K (the base model for the first K steps), so step s+K's
# rollout and score run in the background while train-step s runs (`--max-staleness K`; the
# stale steps are corrected by `--rollout-correction auto`, docs/design.md). The files do not
# depend on timing: the same as running that schedule one stage after another.
# Copy this file as the starting point of your own runs.
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
TARGET=${TARGET:-$BATCH}
MAX_ROUNDS=${MAX_ROUNDS:-4}
TRAIN_PROCS=${TRAIN_PROCS:-1}
DCPO=${DCPO:-dcpo}
SERVER=${SERVER:-0}
LAG=${LAG:-0}
[[ "$LAG" =~ ^[0-9]+$ ]] || { echo "error: LAG must be a number of steps >= 0 (got $LAG)" >&2
                             exit 2; }

score_flags=()
if [ -n "$REWARD" ]; then
  score_flags=(--reward "$REWARD")
elif [ "$ALGO" = dcpo ]; then
  score_flags=(--no-answer-reward -1)  # the official DCPO reward: 1 / 0 / -1
fi

tiny=$RUN/tiny
if [ ! -d "$tiny/model" ]; then
  $DCPO tiny init "$tiny" --seed "$SEED" --size "$TINY_SIZE"
fi

ahead='' server_pid=''
cleanup() {  # on any exit: the background sampling (LAG), then the server (SERVER=1)
  if [ -n "$ahead" ]; then
    pkill -P "$ahead" 2>/dev/null || true
    kill "$ahead" 2>/dev/null || true
    wait "$ahead" 2>/dev/null || true
  fi
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

engine_flags=(--engine hf)
if [ "$SERVER" = 1 ]; then
  # one resident engine for the whole loop; the trap stops it however the script ends
  url_file=$RUN/server.url
  rm -f "$url_file"
  $DCPO serve --model "$tiny/model" --engine hf --port 0 --url-file "$url_file" &
  server_pid=$!
  until [ -s "$url_file" ]; do
    kill -0 "$server_pid" 2>/dev/null || { echo "error: dcpo serve did not start" >&2; exit 2; }
    sleep 0.2
  done
  engine_flags=(--engine server --server-url "$(cat "$url_file")")
fi

evaluate() {  # evaluate MODEL LABEL
  $DCPO eval --model "$1" --benchmark "$tiny/test.parquet" --avg-at "$EVAL_AT" \
    --max-new-tokens "$MAX_NEW_TOKENS" --seed "$SEED" "${engine_flags[@]}" \
    --out "$RUN/eval/$2"
}

sample() {  # sample MODEL STEP ROUND ROLLOUTS SCORED: one rollout round, scored
  [ -f "$4" ] || $DCPO rollout --model "$1" --prompts "$tiny/train.parquet" \
    --step "$2" --round "$3" --batch-size "$BATCH" --n "$N" --temperature 1.0 \
    --max-new-tokens "$MAX_NEW_TOKENS" --seed "$SEED" "${engine_flags[@]}" --out "$4"
  [ -f "$5" ] || $DCPO score "$4" --out "$5" "${score_flags[@]}"
}

sample_step() {  # sample_step MODEL STEP: the step's rollouts, scored
  local dir=$RUN/steps/$(printf '%06d' "$2")
  mkdir -p "$dir"
  if [ "$ALGO" = dapo ]; then
    # DAPO's dynamic sampling: more rounds until TARGET groups are kept (mixed outcomes)
    local round kept=0
    for ((round = 0; round < MAX_ROUNDS && kept < TARGET; round++)); do
      sample "$1" "$2" "$round" "$dir/rollouts-r$round.parquet" "$dir/scored-r$round.parquet"
      kept=$((kept + $($DCPO inspect "$dir/scored-r$round.parquet" --metadata mixed_groups)))
    done
    if [ "$kept" -lt "$TARGET" ]; then
      echo "warning: step $2 kept $kept of $TARGET groups after $MAX_ROUNDS rounds;" \
        "training on those" >&2
    fi
  else
    sample "$1" "$2" 0 "$dir/rollouts.parquet" "$dir/scored.parquet"
  fi
}

checkpoint() {  # checkpoint STEP: the policy that trains step STEP
  if (($1 == 0)); then echo "$tiny/model"; else echo "$RUN/ckpt/step-$(printf '%06d' "$1")"; fi
}

evaluate "$tiny/model" step-000000

for ((step = 0; step < LAG && step < STEPS; step++)); do  # the first K steps: the base model's
  sample_step "$tiny/model" "$step"
done
for ((step = 0; step < STEPS; step++)); do
  model=$(checkpoint "$step")
  next=$(checkpoint $((step + 1)))
  dir=$RUN/steps/$(printf '%06d' "$step")
  if ((LAG == 0)); then
    sample_step "$model" "$step"
  elif ((step + LAG < STEPS)); then  # step s+K's rollouts from checkpoint s, while s trains
    sample_step "$model" $((step + LAG)) &
    ahead=$!
  fi
  train_flags=()
  if [ "$ALGO" = dapo ]; then
    scored=()
    for ((round = 0; round < MAX_ROUNDS; round++)); do
      [ -f "$dir/scored-r$round.parquet" ] || break
      scored+=("$dir/scored-r$round.parquet")
    done
    train_flags=(--target-prompts "$TARGET")
  else
    scored=("$dir/scored.parquet")
  fi
  ((LAG == 0)) || train_flags+=(--max-staleness "$LAG")
  # train-step is idempotent: with its checkpoint already written it only finishes the
  # state update (if a kill interrupted it) and returns.
  scored_flags=()
  for file in "${scored[@]}"; do scored_flags+=(--scored "$file"); done
  $DCPO train-step --model "$model" "${scored_flags[@]}" --state "$RUN/state.json" \
    --out "$next" --algo "$ALGO" --lr "$LR" --warmup-steps 0 --seed "$SEED" \
    --metrics-log "$RUN/metrics.jsonl" "${train_flags[@]}" ${TRAIN_ARGS:-} \
    $( ((TRAIN_PROCS > 1)) && echo --nproc-per-node "$TRAIN_PROCS")
  if [ -n "$ahead" ]; then  # set -e: a failed rollout or score stops the run here
    wait "$ahead"
    ahead=''
  fi
done

model=$(checkpoint "$STEPS")
evaluate "$model" "step-$(printf '%06d' "$STEPS")"
echo "final model: $model"
