#!/usr/bin/env bash
# The small preset's training data: a 25-task instruction set from the BIG-bench sdist on PyPI
# (358 MB, read straight from the tarball; the 23 tasks BBH was built from are excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=data/processed/bigbench25
[ -f "$out/train.jsonl" ] && [ -f "$out/eval.jsonl" ] && exit 0
mkdir -p data/downloads
sdist=data/downloads/bigbench-1.0.0.tar.gz
[ -f "$sdist" ] || "$PY" -m pip download -q --no-deps bigbench==1.0.0 -d data/downloads
"$PY" data/prepare.py bigbench --sdist "$sdist" --num_tasks 25 --max_per_task 200 --eval_per_task 40 --seed 42 \
  --output_dir "$out"
