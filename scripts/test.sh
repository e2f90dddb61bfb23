#!/usr/bin/env bash
# Set up .venv (idempotent) and run the test suite on the CPU: unit tests, the real vLLM
# engine with real training and weight sync, and whole runs through the CLI.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest "$@"
