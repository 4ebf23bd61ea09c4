#!/usr/bin/env bash
# Table 3 in the reference script's form: full mtLoRA at the block level, g groups
# Usage: bash tables/6_routing_granularity_block.sh [--scale small|paper] [--model_name_or_path PATH] [--num_gpus N] [--rows KEY ...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" tables/run_table.py --table routing_granularity_block "$@"
