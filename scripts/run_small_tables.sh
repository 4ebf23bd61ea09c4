#!/usr/bin/env bash
# The small-scale tables on the GPUs at hand, then the figures: Table 2 (3 seeds), Table 3 (the paper's and the
# reference script's form), Table 4, the task-count scaling and the main results, full evaluations. A 135M model
# leaves a large GPU mostly idle, so their jobs run as one pool, several at once, each on one GPU.
# Usage: bash scripts/run_small_tables.sh [tables/run_table.py flags]
# Environment: TABLES (default: all of the above), PARALLEL (default: 3 per GPU, the share at which a 141 GB card
# trains every row, Table 3's g = 32 included, at the 32 x 1 micro-batch of results/small_seeds), RESULTS_DIR (default outputs/tables), PYTHON
# (default python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RESULTS=${RESULTS_DIR:-outputs/tables}
TABLES=${TABLES:-"main_ablation routing_granularity routing_granularity_block block_level task_scaling main_results"}
GPUS=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))")
PARALLEL=${PARALLEL:-$((3 * GPUS))}
read -ra tables <<< "$TABLES"
"$PY" tables/run_table.py --table "${tables[@]}" --scale small --results_dir "$RESULTS" --parallel "$PARALLEL" "$@"
"$PY" -m analysis.run_figures --results_dir "$RESULTS/small" "$@"
