#!/usr/bin/env bash
# The production topology on this machine, in one command: a Ray cluster of a head and two worker
# nodes, the tansu Kafka broker, moto S3 (an Object Lock bucket and a witness bucket), PostgreSQL
# for the vault and `mlflow server`; `serve deploy deployments/production.yaml`, traffic with a
# worker node removed mid-way, then compaction, lifecycle, verify, forget and replay as Ray jobs.
# Everything it starts, it stops. Needs root (or sudo) for apt on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
fi
EXTRAS="cluster" source scripts/_venv.sh
exec .venv/bin/python -m serve_journal.examples.cluster_demo "$@"
