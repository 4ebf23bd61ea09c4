#!/usr/bin/env bash
# Table 5 (and Table 6): mtLoRA against multi-task LoRA, merge and MoLE baselines
# Usage: bash tables/4_main_results.sh [--scale small|paper] [--model_name_or_path PATH] [--num_gpus N] [--rows KEY ...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" tables/run_table.py --table main_results "$@"
