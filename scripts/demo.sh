#!/usr/bin/env bash
# Set everything up, then run the main job: a local cluster running the demo app.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m p2porch.cli.main demo "$@"
