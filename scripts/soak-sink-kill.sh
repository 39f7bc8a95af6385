#!/usr/bin/env bash
# Soak the Kafka sink's crash safety: run the sink SIGKILL scenario (tests/test_kafka_sink.py::
# test_sink_killed_mid_batch_and_restarted: `serve-journal sink` under load, killed with SIGKILL
# twice at whatever point of a chunk, restarted; then exactly once and `verify` clean) RUNS times
# (default 20, one pytest process, a fresh broker and journal per run), with BUSY processes
# spinning on the CPUs (default: one per core) so the kills land at the worst moments more
# often. Prints each run's outcome and "N/RUNS verify-clean"; exits non-zero unless every run
# was clean. The full pytest output is kept in $LOGS (default: a temporary folder).
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

started=$(date +%s)
log="$LOGS/soak.log"
SERVE_JOURNAL_SOAK_RUNS="$RUNS" timeout $((RUNS * 600)) "$PY" -m pytest -v -p no:cacheprovider \
    -o log_cli=false "tests/test_kafka_sink.py::test_sink_killed_mid_batch_and_restarted" \
    >"$log" 2>&1 || true
grep -E "test_sink_killed_mid_batch_and_restarted\[[0-9]+\] (PASSED|FAILED|ERROR)" "$log" \
  | sed -E 's/.*\[([0-9]+)\] (PASSED|FAILED|ERROR).*/run \1: \2/; s/PASSED/verify-clean/' || true
clean=$(grep -cE "test_sink_killed_mid_batch_and_restarted\[[0-9]+\] PASSED" "$log" || true)
echo "$clean/$RUNS verify-clean (busy processes: $BUSY, $(( $(date +%s) - started )) s; log: $log)"
[ "$clean" -eq "$RUNS" ]
