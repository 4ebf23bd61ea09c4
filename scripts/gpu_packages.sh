#!/usr/bin/env bash
# Wheels for a GPU machine with no network whose Python 3.12 (x86-64) already has torch, transformers and
# accelerate but not DeepSpeed: DeepSpeed itself, built here with no compiled ops (a pure-Python wheel that
# compiles nothing unless a config asks for one of its own optimizers, which configs/ds_*.json do not), and
# the packages it imports that such an image lacks (pydantic 2 with its compiled core, hjson; typing_extensions
# new enough for pydantic). On the GPU machine, from the repository root:
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# Usage: bash scripts/gpu_packages.sh [FOLDER]   (default: .whl in the repository root, ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.whl}
python=${PYTHON:-.venv/bin/python}  # needs torch installed (scripts/setup.sh makes .venv)
mkdir -p "$out"
if [ ! -f "$out/deepspeed-0.19.8-py3-none-any.whl" ]; then
    # Built from the source release against the local torch (a CPU build is fine: no op is compiled).
    DS_BUILD_OPS=0 "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$out" deepspeed==0.19.8
fi
# DeepSpeed 0.19.8 also imports einops, msgpack, ninja, numpy, packaging, psutil, py-cpuinfo and tqdm,
# which a PyTorch image has; these it lacks:
for spec in hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
            typing_extensions==4.16.0; do
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$out" "$spec"
done
ls -l "$out"
