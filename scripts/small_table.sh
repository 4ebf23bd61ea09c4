#!/usr/bin/env bash
# The main job on a fresh machine: install, prepare the data, run Table 2 (the ablation) at the small
# scale on SmolLM2-135M. BBH/MMLU are read from data/processed/{bbh,mmlu} or ../shared/data; prepare them
# with `python data/prepare.py bbh` / `mmlu` otherwise. Extra arguments go to tables/run_table.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/prepare_small_data.sh
PYTHON=.venv/bin/python exec bash tables/0_main_ablation.sh --scale small "$@"
