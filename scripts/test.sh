#!/usr/bin/env bash
# Set up .venv (idempotent) and run the test suite on the CPU: unit tests, the real vLLM
# engine with real training and weight sync, and whole runs through the CLI.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# tests/test_report.py opens the report page in headless Chromium (Debian's `chromium`). As
# root with apt (CI) it is installed once here and those tests must run; otherwise they skip,
# saying so.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! command -v chromium >/dev/null; then
    echo "oaif test: installing chromium with apt (once, about a minute)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  fi
  export OAIF_REQUIRE_CHROMIUM=1
elif ! command -v chromium >/dev/null; then
  echo "oaif test: chromium not installed (as root: apt-get install chromium): the report page tests will skip"
fi
# Two workers (pytest-xdist) where there are two cores: each test goes to whichever is free,
# each worker keeps to one thread (tests/conftest.py). A module-scoped engine or server is then
# built by each worker that runs the module's tests; the models are built once for both.
# OAIF_TEST_WORKERS=0 runs the tests in this one process.
workers=${OAIF_TEST_WORKERS:-$(( $(nproc) >= 2 ? 2 : 0 ))}
.venv/bin/python -m pytest -n "$workers" "$@"
