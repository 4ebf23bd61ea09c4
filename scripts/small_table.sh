#!/usr/bin/env bash
# The main job on a fresh machine: install, prepare the data, run Table 2 (the ablation) at the small scale on
# SmolLM2-135M, 3 seeds per row, 4 jobs at a time per GPU (a 135M model leaves a large GPU mostly idle; on a 141 GB
# card each job's share still fits every Table 2 row at the 32 x 1 micro-batch results/small_seeds used; smaller cards
# get 16 x 2, a different run). BBH/MMLU are read from data/processed/{bbh,mmlu} or ../shared/data; prepare them with
# `python data/prepare.py bbh` / `mmlu` otherwise. Extra arguments go to tables/run_table.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/prepare_small_data.sh
GPUS=$(.venv/bin/python -c "import torch; print(torch.cuda.device_count())")
PARALLEL=$(( GPUS > 0 ? 4 * GPUS : 1 ))
PYTHON=.venv/bin/python exec bash tables/0_main_ablation.sh --scale small --parallel "$PARALLEL" "$@"
