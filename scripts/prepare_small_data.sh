#!/usr/bin/env bash
# The small preset's training data: every BIG-bench task of the PyPI sdist with at least 100 usable examples
# (64 tasks; the 23 tasks BBH was built from are excluded), up to 250 training and 40 held-out examples each:
# 13,646 training records, 427 optimiser steps at batch 32. The sdist (358 MB) is read straight from the tarball.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=data/processed/bigbench
[ -f "$out/train.jsonl" ] && [ -f "$out/eval.jsonl" ] && exit 0
mkdir -p data/downloads
sdist=data/downloads/bigbench-1.0.0.tar.gz
[ -f "$sdist" ] || "$PY" -m pip download -q --no-deps bigbench==1.0.0 -d data/downloads
"$PY" data/prepare.py bigbench --sdist "$sdist" --num_tasks 64 --max_per_task 250 --eval_per_task 40 --seed 42 \
  --output_dir "$out"
