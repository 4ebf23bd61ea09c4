#!/usr/bin/env bash
# Small-scale reproduction on one GPU: Table 2, Table 3 and task-count scaling run side by side (a
# 135M model leaves the GPU mostly idle; runs shared between tables are trained once, under a lock),
# then the figure scripts on the resulting checkpoints.
# Usage: bash scripts/run_small_tables.sh [--model_name_or_path DIR] [--bbh_dir DIR] [--mmlu_dir DIR]
# Environment: RESULTS_DIR (default results), PYTHON (default python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # three tables share one GPU
RESULTS=${RESULTS_DIR:-results}
mkdir -p "$RESULTS/logs"
pids=()
for table in main_ablation routing_granularity task_scaling; do
  "$PY" tables/run_table.py --table "$table" --scale small --results_dir "$RESULTS" "$@" \
    > "$RESULTS/logs/$table.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ "$status" -eq 0 ] || { tail -n 40 "$RESULTS"/logs/*.log; exit 1; }
"$PY" analysis/run_figures.py --results_dir "$RESULTS/small" "$@"
