#!/usr/bin/env bash
# Line coverage of oaif/ over the test suite, every process the tests start included (CLI runs,
# vLLM's engine processes, servers, accelerate's ranks: coverage's `patch = subprocess`). Its
# per-module table is what docs/tests.md quotes.
#   bash scripts/coverage.sh [pytest args]        # e.g. -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
data=$(mktemp -d)   # not in the checkout: the suite fails if a test wrote there
export COVERAGE_FILE="$data/.coverage"
workers=${OAIF_TEST_WORKERS:-$(( $(nproc) >= 2 ? 2 : 0 ))}   # as scripts/test.sh
.venv/bin/python -m coverage run -m pytest -n "$workers" "$@" || echo "oaif coverage: the suite failed; the table covers what ran"
.venv/bin/python -m coverage combine --quiet "$data"
.venv/bin/python -m coverage report --format=markdown --sort=cover
rm -rf "$data"
