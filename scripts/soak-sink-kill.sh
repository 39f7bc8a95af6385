#!/usr/bin/env bash
# Soak the Kafka sink's crash safety: run the sink SIGKILL scenario (tests/test_kafka_sink.py::
# test_sink_killed_mid_batch_and_restarted: `serve-journal sink` under load, killed with SIGKILL
# twice at whatever point of a chunk, restarted; then exactly once and `verify` clean) RUNS times
# (default 20), with BUSY processes spinning on the CPUs (default: one per core) so the kills
# land at the worst moments more often. Prints "N/RUNS verify-clean" and exits non-zero unless
# every run was clean. Each failing run's log is kept in $LOGS (default: a temporary folder).
#
#   bash scripts/soak-sink-kill.sh            # 20 runs, CPUs busy
#   RUNS=5 BUSY=0 bash scripts/soak-sink-kill.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-20}"
BUSY="${BUSY:-$(nproc)}"
LOGS="${LOGS:-$(mktemp -d -t soak-sink-kill.XXXXXX)}"
PY=.venv/bin/python
[ -x "$PY" ] || { echo "no .venv: run scripts/test.sh once (it installs the test extra)" >&2; exit 2; }
export RAY_USAGE_STATS_ENABLED=0

busy_pids=()
stop_busy() {
  for pid in "${busy_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${busy_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_busy EXIT
for _ in $(seq 1 "$BUSY"); do
  "$PY" -c "while True: pass" &
  busy_pids+=("$!")
done

clean=0
started=$(date +%s)
for run in $(seq 1 "$RUNS"); do
  log="$LOGS/run-$run.log"
  t0=$(date +%s)
  if timeout 900 "$PY" -m pytest -q -p no:cacheprovider \
      "tests/test_kafka_sink.py::test_sink_killed_mid_batch_and_restarted" >"$log" 2>&1; then
    clean=$((clean + 1))
    rm -f "$log"
    echo "run $run/$RUNS: verify-clean ($(( $(date +%s) - t0 )) s)"
  else
    echo "run $run/$RUNS: FAILED ($(( $(date +%s) - t0 )) s), log: $log"
  fi
done
echo "$clean/$RUNS verify-clean (busy processes: $BUSY, $(( $(date +%s) - started )) s)"
[ "$clean" -eq "$RUNS" ]
