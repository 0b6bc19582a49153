#!/usr/bin/env bash
# Set everything up, then run the whole test suite: lint, types, and all four test tiers
# (unit, simulation, shell, integration against real processes and the real Docker engine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; .venv/bin/mypy
echo "== pytest"
# Under CI, a docker-marked test must run: a missing engine fails the run instead of skipping.
if [ "${CI:-}" = "true" ]; then export P2PORCH_REQUIRE_DOCKER=1; fi
exec $PY -m pytest "$@"
