#!/usr/bin/env bash
# DCPO on Qwen2.5-Math-7B with the paper's settings (docs/design.md 1.6), for one GPU node.
# The same loop as examples/tiny_loop.sh, with the vLLM engine and Hub model and data:
# 512 prompts x 16 responses per step, temperature 1.0, top-p 1.0, ~3k-token responses,
# AdamW lr 1e-6 with 10 warm-up steps, weight decay 0.1, grad norm 1.0, no KL, 8 prompts
# (x 16 responses) per optimizer update as the official recipe on one node (64 updates per
# 512-prompt step); ALGO=dcpo scores 1 / 0 / -1 (right / boxed but wrong / no boxed answer,
# cut-off responses included), the official DCPO reward; AIME24/25, AMC23 and MATH-500
# evaluated every EVAL_EVERY steps (instruction as the system message, the official layout).
#
#   examples/qwen2.5-math-7b.sh RUN_DIR [STEPS]
#
# Needs `pip install 'dcpo-cli[vllm]'`, a GPU, and access to the Hub (MODEL is a Hub id,
# optionally id@revision, fetched into the Hugging Face cache; or local copies: set MODEL to
# a model directory, DATA to a prompts/JSONL/verl file, DCPO_DATA_DIR to a folder holding
# the benchmark files, and HF_HUB_OFFLINE=1). Rerun the same command after a crash: finished
# stages are skipped and train-step never absorbs a step twice.
#
# Every setting below comes from the environment. The test suite runs this file for 2 steps on
# the built-in tiny model, without a GPU or downloads:
#   ENGINE=hf MODEL=tiny/model DATA=tiny/train.parquet EVAL_BENCHMARKS=tiny/test.parquet \
#   BATCH=4 N=2 MAX_NEW_TOKENS=16 MINI_BATCH=2 EVAL_AT=2 EVAL_EVERY=2 \
#   examples/qwen2.5-math-7b.sh RUN_DIR 2
set -euo pipefail

RUN=${1:?usage: examples/qwen2.5-math-7b.sh RUN_DIR [STEPS]}
STEPS=${2:-${STEPS:-300}}
ENGINE=${ENGINE:-vllm}                         # vllm, hf (no GPU needed) or auto
MODEL=${MODEL:-Qwen/Qwen2.5-Math-7B}
DATA=${DATA:-BytedTsinghua-SIA/DAPO-Math-17k}  # the official DCPO training set (verl layout)
ALGO=${ALGO:-dcpo}                             # dcpo, grpo, dapo or gspo
SEED=${SEED:-0}
BATCH=${BATCH:-512}
N=${N:-16}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-3072}
MINI_BATCH=${MINI_BATCH:-8}                    # prompts per optimizer update (per node, as
                                               # the official recipe): 64 updates per step
MICRO_BATCH_TOKENS=${MICRO_BATCH_TOKENS:-32768}
LR=${LR:-1e-6}
WARMUP_STEPS=${WARMUP_STEPS:-10}
EVAL_EVERY=${EVAL_EVERY:-10}
EVAL_AT=${EVAL_AT:-32}
EVAL_BENCHMARKS=${EVAL_BENCHMARKS:-aime24 aime25 amc23 math500}  # names or files, by spaces
EVAL_LIMIT=${EVAL_LIMIT:-}                     # only the first N problems of each benchmark
DCPO=${DCPO:-dcpo}
# GPUs: each vLLM engine spans TP GPUs (tensor parallel; the official DCPO runs used 4), and
# DP engines run side by side, one process per group of TP GPUs, each generating its
# --shard i/DP of the step's prompts. DP x TP GPUs in all; e.g. TP=4 DP=2 on 8 GPUs.
TP=${TP:-1}
# train-step on TRAIN_PROCS GPUs of this node (FSDP2; see docs/scaling.md):
# 7B in fp32 with AdamW needs about 122 GB, so 2 or more on 80 GB GPUs. Only the newest
# checkpoint keeps its training state (fp32 master weights, moments: ~91 GB at 7B).
TRAIN_PROCS=${TRAIN_PROCS:-1}
KEEP_TRAINING_STATE=${KEEP_TRAINING_STATE:-1}
DP=${DP:-1}
# SERVER=1: start DP `dcpo serve` processes once (one per group of TP GPUs, vLLM freeing
# its KV cache between requests so train-step gets the GPUs), point rollout shard i and the
# evaluations at them, and stop them at the end, on an error or on Ctrl-C: no engine cold
# start per stage; each step's checkpoint is loaded into the servers in place.
SERVER=${SERVER:-0}
# LAG=K (with SERVER=1): overlap generation with training, as verl's one-step-off-policy
# recipe and prime-rl do, at a fixed lag (examples/tiny_loop.sh, docs/design.md): step s
# trains checkpoint s on rollouts sampled by checkpoint s - K, and step s+K's rollouts run on
# the servers while train-step s runs. Generation and training then need GPUs of their own:
# the servers keep GPUs 0 .. DP*TP-1 (and their KV cache: no --release-between-requests),
# train-step gets the next TRAIN_PROCS GPUs. On one 8-GPU node: TP=1 DP=4 TRAIN_PROCS=4,
# half the node to generation (about 70% of a synchronous step at this setting, so its
# share of the GPUs halves its time) and half to FSDP2 (7B's ~122 GB of fp32 weights and
# AdamW moments is ~31 GB per GPU on 4, room for the activations of 32k-token micro-batches).
LAG=${LAG:-0}
[[ "$LAG" =~ ^[0-9]+$ ]] || { echo "error: LAG must be a number of steps >= 0 (got $LAG)" >&2
                             exit 2; }
ENGINE_FLAGS=(--engine "$ENGINE")
SCORE_FLAGS=()
[ "$ALGO" != dcpo ] || SCORE_FLAGS=(--no-answer-reward -1)  # the official DCPO reward
[ "$ENGINE" = hf ] || ENGINE_FLAGS+=(--tensor-parallel-size "$TP")

# ONE_COMMAND=1: the same run as one job, `dcpo run --nproc-per-node 8` (docs/scaling.md):
# FSDP2 on the 8 GPUs, one vLLM engine per group of TP GPUs in the ranks' own processes,
# asleep while the policy trains; the same files. Per GPU (computed,
# not measured): 15.2 GB of sharded fp32 state + 3.1 GB gathered bf16 while training
# (18.4 GB; the engine's weights sleep in host memory), and while generating those 15.2 GB
# + the engine's bf16 weights (15.2 GB / TP) + its KV cache: GPU_MEMORY_UTILIZATION 0.35 of
# 80 GB leaves ~12 GB of KV cache at TP=1. The vLLM colocated path has not been run yet.
if [ "${ONE_COMMAND:-0}" = 1 ]; then
  run_flags=(--engine "$ENGINE")
  [ "$ENGINE" = hf ] || run_flags+=(--set "engine.tensor_parallel_size=$TP"
                                    --set "engine.gpu_memory_utilization=${GPU_MEMORY_UTILIZATION:-0.35}")
  [ -f "$RUN/train.parquet" ] || $DCPO prepare "$DATA" --out "$RUN/train.parquet"
  exec $DCPO run "$RUN" --steps "$STEPS" --model "$MODEL" --prompts "$RUN/train.parquet" \
    --algo "$ALGO" --batch-size "$BATCH" --n "$N" --max-new-tokens "$MAX_NEW_TOKENS" \
    --lr "$LR" --warmup-steps "$WARMUP_STEPS" --seed "$SEED" --eval-at "$EVAL_AT" \
    --eval-every "$EVAL_EVERY" $(for b in $EVAL_BENCHMARKS; do echo --benchmark "$b"; done) \
    --set train.weight_decay=0.1 --set train.max_grad_norm=1.0 \
    --set "train.mini_batch_size=$MINI_BATCH" --set "train.micro_batch_tokens=$MICRO_BATCH_TOKENS" \
    --set train.gradient_checkpointing=true \
    --set "train.keep_training_state=$KEEP_TRAINING_STATE" "${run_flags[@]}" \
    --nproc-per-node "${NPROC:-8}"
fi

mkdir -p "$RUN"
prompts=$RUN/train.parquet
[ -f "$prompts" ] || $DCPO prepare "$DATA" --out "$prompts"

SERVER_PIDS='' ahead=''
cleanup() {  # on any exit: the background sampling (LAG), then the servers (SERVER=1)
  if [ -n "$ahead" ]; then
    pkill -P "$ahead" 2>/dev/null || true
    kill "$ahead" 2>/dev/null || true
    wait "$ahead" 2>/dev/null || true
  fi
  if [ -n "$SERVER_PIDS" ]; then
    kill $SERVER_PIDS 2>/dev/null || true
    wait $SERVER_PIDS 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

benchmark_args=()
for benchmark in $EVAL_BENCHMARKS; do benchmark_args+=(--benchmark "$benchmark"); done

# The engine flags of shard i (the first shard's serve the evaluations too).
shard_flags() { if [ "$SERVER" = 1 ]; then echo --engine server --server-url "${URLS[$1]}";
                else echo "${ENGINE_FLAGS[@]}"; fi; }

evaluate() {  # evaluate MODEL LABEL (a re-run reuses finished benchmarks)
  $DCPO eval --model "$1" "${benchmark_args[@]}" --avg-at "$EVAL_AT" \
    --max-new-tokens "$MAX_NEW_TOKENS" --seed "$SEED" $(shard_flags 0) \
    ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"} --out "$RUN/eval/$2"
}

start_servers() {  # start_servers MODEL: DP servers, each on its own TP GPUs and free port
  local pids=() release=()
  [ "$ENGINE" = hf ] || ((LAG > 0)) || release=(--release-between-requests)
  URLS=()
  for ((i = 0; i < DP; i++)); do
    rm -f "$RUN/server-$i.url"
    CUDA_VISIBLE_DEVICES=$(seq -s, $((i * TP)) $((i * TP + TP - 1))) \
      $DCPO serve --model "$1" "${ENGINE_FLAGS[@]}" "${release[@]}" --port 0 \
      --url-file "$RUN/server-$i.url" &
    pids+=($!)
  done
  SERVER_PIDS="${pids[*]}"
  for ((i = 0; i < DP; i++)); do
    until [ -s "$RUN/server-$i.url" ]; do
      kill -0 "${pids[$i]}" 2>/dev/null || { echo "error: dcpo serve $i did not start" >&2
                                             exit 2; }
      sleep 1
    done
    URLS+=("$(cat "$RUN/server-$i.url")")
  done
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
      --seed "$SEED" --shard "$i/$DP" $(shard_flags "$i") --out "$out" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done  # set -e: a failed shard stops the run
  ROLLOUTS=("${shards[@]}")
}

sample_step() {  # sample_step MODEL STEP: the step's rollout shards, scored
  local dir=$RUN/steps/$(printf '%06d' "$2")
  mkdir -p "$dir"
  [ ! -f "$dir/scored.parquet" ] || return 0
  rollout "$1" "$2" "$dir"
  $DCPO score "${ROLLOUTS[@]}" --out "$dir/scored.parquet" "${SCORE_FLAGS[@]}"
}

checkpoint() {  # checkpoint STEP: the policy that trains step STEP
  if (($1 <= 0)); then echo "$MODEL"; else echo "$RUN/ckpt/step-$(printf '%06d' "$1")"; fi
}

# With LAG, train-step runs on the GPUs after the generation ones (see LAG above).
train_env=()
((LAG == 0)) || train_env=(env CUDA_VISIBLE_DEVICES="$(seq -s, $((DP * TP)) \
                                                       $((DP * TP + TRAIN_PROCS - 1)))")

# Resume: redo the newest train-step (it only syncs the SAS state if a kill came between its
# checkpoint and the state update) and go on from there.
start=0
last=$(ls -d "$RUN"/ckpt/step-* 2>/dev/null | sort | tail -n 1 || true)
[ -z "$last" ] || start=$((10#${last##*step-} - 1))
model=$(checkpoint "$start")
[ "$SERVER" != 1 ] || start_servers "$model"
[ -n "$last" ] || evaluate "$model" step-000000

for ((step = start; step < STEPS; step++)); do
  model=$(checkpoint "$step")
  next=$(checkpoint $((step + 1)))
  scored=$RUN/steps/$(printf '%06d' "$step")/scored.parquet
  sample_step "$(checkpoint $((step - LAG)))" "$step"  # LAG: done ahead, but after a resume
  if ((LAG > 0 && step + LAG < STEPS)); then  # step s+K's rollouts from checkpoint s
    sample_step "$model" $((step + LAG)) &
    ahead=$!
  fi
  "${train_env[@]}" $DCPO train-step --model "$model" --scored "$scored" \
    --state "$RUN/state.json" \
    --out "$next" --algo "$ALGO" --lr "$LR" --warmup-steps "$WARMUP_STEPS" --weight-decay 0.1 \
    --max-grad-norm 1.0 --mini-batch-size "$MINI_BATCH" \
    --micro-batch-tokens "$MICRO_BATCH_TOKENS" \
    --gradient-checkpointing --seed "$SEED" --metrics-log "$RUN/metrics.jsonl" \
    --keep-training-state "$KEEP_TRAINING_STATE" --max-staleness "$LAG" \
    $( ((TRAIN_PROCS > 1)) && echo --nproc-per-node "$TRAIN_PROCS")
  if [ -n "$ahead" ]; then  # set -e: a failed shard or score stops the run here
    wait "$ahead"
    ahead=''
  fi
  if (((step + 1) % EVAL_EVERY == 0)); then
    evaluate "$next" "step-$(printf '%06d' $((step + 1)))"
  fi
done

$DCPO report "$RUN"
