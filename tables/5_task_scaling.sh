#!/usr/bin/env bash
# Task-count scaling: average held-out accuracy over the trained tasks
# Usage: bash tables/5_task_scaling.sh [--scale small|paper] [--model_name_or_path PATH] [--num_gpus N] [--rows KEY ...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" tables/run_table.py --table task_scaling "$@"
