#!/usr/bin/env bash
# Table 2: ablation of block-level adaptation, spectral regularisation and fine-grained routing
# Usage: bash tables/0_main_ablation.sh [--scale small|paper] [--model_name_or_path PATH] [--num_gpus N] [--rows KEY ...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" tables/run_table.py --table main_ablation "$@"
