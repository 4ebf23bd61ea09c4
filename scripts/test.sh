#!/usr/bin/env bash
# Install (if needed) and run the test suite on the CPU, over PYTEST_WORKERS processes (default 2: most of the time goes
# to starting Python processes, which two cores overlap well). Extra arguments go to pytest (`-n 0`: one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" "$@"
