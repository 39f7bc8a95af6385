#!/usr/bin/env bash
# Install the project and run the end-to-end demo (local Ray, sqlite MLflow, local Parquet journal).
set -euo pipefail
EXTRAS="" source "$(dirname "$0")/_venv.sh"
exec .venv/bin/python -m serve_journal.examples.demo --workdir "${DEMO_DIR:-./demo-output}" "$@"
