#!/usr/bin/env bash
# Small-scale reproduction on one GPU: Table 2, Table 3 and the task-count scaling, then the figures.
# A 135M model leaves an H100 mostly idle, so groups of rows train side by side (a run shared by two
# tables, e.g. full mtLoRA = Table 3's G = 2 row, is trained once, under a lock); a second pass then
# assembles each full table from the finished runs.
# Usage: bash scripts/run_small_tables.sh [--model_name_or_path DIR] [--bbh_dir DIR] [--mmlu_dir DIR]
# Environment: RESULTS_DIR (default outputs/tables), PYTHON (default python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
RESULTS=${RESULTS_DIR:-outputs/tables}
mkdir -p "$RESULTS/logs"
run_table() { "$PY" tables/run_table.py --scale small --results_dir "$RESULTS" "$@"; }

groups=("main_ablation --rows baseline block" "main_ablation --rows block_spectral block_fgr mtlora"
        "routing_granularity --rows mtlora_g1 mtlora_g8" "routing_granularity --rows mtlora_g16 mtlora_g32"
        "task_scaling")
pids=()
for index in "${!groups[@]}"; do
  read -ra group <<< "${groups[$index]}"
  run_table --table "${group[@]}" "$@" > "$RESULTS/logs/group$index.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ "$status" -eq 0 ] || { tail -n 40 "$RESULTS"/logs/group*.log; exit 1; }
for table in main_ablation routing_granularity task_scaling; do
  run_table --table "$table" "$@" > "$RESULTS/logs/$table.log" 2>&1
done
"$PY" analysis/run_figures.py --results_dir "$RESULTS/small" "$@" > "$RESULTS/logs/figures.log" 2>&1
cat "$RESULTS"/small/*.md
