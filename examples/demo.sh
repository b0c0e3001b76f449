#!/usr/bin/env bash
# `make demo`: a full DCPO run on the built-in tiny model, on a laptop CPU, in minutes.
# Writes the tiny model and arithmetic task (the prebuilt copy), evaluates it, trains STEPS
# DCPO steps with the shell loop, evaluates again, writes report.png, and prints where
# everything is.
#
#   examples/demo.sh [RUN_DIR]          (default runs/demo; rerun to resume)
#
# DCPO (the command, default .venv/bin/dcpo) and PYTHON (default .venv/bin/python) may be
# set to run it from another environment.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=${1:-runs/demo}
export STEPS=${STEPS:-24}
export DCPO=${DCPO:-.venv/bin/dcpo}
PYTHON=${PYTHON:-.venv/bin/python}
started=$(date +%s)

bash examples/tiny_loop.sh "$RUN" "$STEPS"
$DCPO report "$RUN"

final=$RUN/eval/step-$(printf '%06d' "$STEPS")/summary.json
$PYTHON - "$RUN/eval/step-000000/summary.json" "$final" <<'EOF'
import json, sys
before, after = (json.load(open(path)) for path in sys.argv[1:])
for bench in after:
    if bench == "average" and len(after) == 2:
        continue  # one benchmark: its average is itself
    for key in after[bench]:
        if key.startswith("avg@"):
            b, a = before[bench][key], after[bench][key]
            print(f"{bench} {key}: {b:.1f}% -> {a:.1f}% ({a - b:+.1f} points)")
EOF
echo "run directory: $RUN (metrics.jsonl, ckpt/, steps/, eval/, state.json)"
echo "report: $RUN/report.png"
echo "demo took $(( $(date +%s) - started )) s"
