#!/usr/bin/env bash
# Table S7: HydraLoRA vs mtLoRA on LLaMA-2-13B (Dolly -> MMLU; paper scale only)
# Usage: bash tables/3_llama13b.sh [--scale small|paper] [--model_name_or_path PATH] [--num_gpus N] [--rows KEY ...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" tables/run_table.py --table llama13b "$@"
