#!/usr/bin/env bash
# Table 4: where the adapter sits
# Usage: bash tables/2_block_level.sh [--scale small|paper] [--model_name_or_path PATH] [--num_gpus N] [--rows KEY ...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" tables/run_table.py --table block_level "$@"
