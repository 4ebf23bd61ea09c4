#!/usr/bin/env bash
# Table 3: routing granularity at the component level (q_proj, v_proj), g groups (the paper's form)
# Usage: bash tables/1_routing_granularity.sh [--scale small|paper] [--model_name_or_path PATH] [--num_gpus N] [--rows KEY ...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" tables/run_table.py --table routing_granularity "$@"
