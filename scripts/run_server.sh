#!/usr/bin/env bash
# One-command start of the OpenAI-compatible server on the embedded model (or any config):
#   scripts/run_server.sh [--config configs/default.yaml] [--port 8000] [--api-key KEY] [--model-name NAME]
set -euo pipefail
cd "$(dirname "$0")/.."
make venv >/dev/null
exec .venv/bin/python -m workbench.serve "$@"
