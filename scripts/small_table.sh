#!/usr/bin/env bash
# The main job on a fresh machine: install, prepare the data, run Table 2 (the ablation) at the small scale on
# SmolLM2-135M, 3 seeds per row, 2 jobs at a time per GPU (a 135M model leaves a large GPU mostly idle; with more, a
# 141 GB card's share would no longer fit HydraLoRA's 32 x 1 micro-batch, the split results/small_seeds used; smaller
# cards train it at 16 x 2). BBH/MMLU are read from data/processed/{bbh,mmlu} or ../shared/data; prepare them with
# `python data/prepare.py bbh` / `mmlu` otherwise. Extra arguments go to tables/run_table.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/prepare_small_data.sh
GPUS=$(.venv/bin/python -c "import torch; print(torch.cuda.device_count())")
PARALLEL=$(( GPUS > 0 ? 2 * GPUS : 1 ))
PYTHON=.venv/bin/python exec bash tables/0_main_ablation.sh --scale small --parallel "$PARALLEL" "$@"
