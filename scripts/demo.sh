#!/usr/bin/env bash
# The main job on the embedded default: set up .venv (idempotent), build the tiny local
# policy once, then run a few rounds of the OAIF loop under the "concise" constitution.
#   bash scripts/demo.sh [key=value ...]      e.g. rounds=20 annotate.backend=vllm
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -f models/tiny/config.json ] || .venv/bin/oaif init-tiny models/tiny
.venv/bin/oaif run configs/tiny_cpu.yaml "$@"
