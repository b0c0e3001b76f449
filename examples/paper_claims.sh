#!/usr/bin/env bash
# The paper's comparison, on the built-in tiny model: DCPO against GRPO and DAPO, SEEDS seeds
# each, STEPS steps of 32 prompts x 8 responses (60 steps: over 3 passes over the 620 training
# prompts, 19 steps each, so SAS's cumulative statistics act), evaluated every EVAL_EVERY
# steps on the tiny test set (avg@1 greedy, avg@8), then `dcpo report` over the study:
# curves per algorithm (mean over seeds, min-max band), and the table of final avg@1 and
# avg@8, mean RUR, mean TCR, groups sampled per group trained and wall time, each against
# GRPO (report.png, report.csv and a rich table).
#
#   examples/paper_claims.sh [STUDY_DIR]      (default runs/paper_claims; rerun to resume)
#
# Every run starts from the same model (the prebuilt tiny model, built once into
# STUDY_DIR/tiny) and is evaluated on the same test set: a seed changes the prompt order,
# the sampling and the mini-batches, not the starting point. JOBS [2] runs at once (the
# machine's cores shared out among them); STEPS [60], SEEDS [3], EVAL_EVERY [10] and DCPO
# (the command, default .venv/bin/dcpo) come from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

STUDY=${1:-runs/paper_claims}
STEPS=${STEPS:-60}
SEEDS=${SEEDS:-3}
JOBS=${JOBS:-2}
EVAL_EVERY=${EVAL_EVERY:-10}
DCPO=${DCPO:-.venv/bin/dcpo}
started=$(date +%s)

[ -d "$STUDY/tiny/model" ] || $DCPO tiny init "$STUDY/tiny" > /dev/null
$DCPO study "$STUDY" --algo dcpo --algo grpo --algo dapo --seeds "$SEEDS" --steps "$STEPS" \
    --jobs "$JOBS" --eval-every "$EVAL_EVERY" --model "$STUDY/tiny/model" \
    --prompts "$STUDY/tiny/train.parquet" --benchmark "$STUDY/tiny/test.parquet"
$DCPO report "$STUDY" --baseline grpo
echo "study: $STUDY (one dcpo run directory per algorithm and seed, logs/)"
echo "paper_claims took $(( $(date +%s) - started )) s"
