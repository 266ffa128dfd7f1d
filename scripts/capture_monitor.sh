#!/usr/bin/env bash
# Capture the live dashboard under a shifting load: the server runs in a detached tmux session (a
# real terminal, so the dashboard is on), scripts/bench.py drives it from outside, and
# `tmux capture-pane -p` saves a screen every few seconds to $OUT/NN.txt. Everything started here
# is stopped at the end.
#
#   scripts/capture_monitor.sh [OUT_DIR]      (default /tmp/dopd-captures)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/dopd-captures}
PORT=${PORT:-18731}
SESSION=dopd-capture-$$
EVERY=${EVERY:-3}
SERVER="python dopd.py --model tiny --engine mock --gpus 4 --mode dopd --pd-ratio 2:2 --policy-interval 2 \
--port $PORT --log-file /tmp/dopd-tmux.log"
LOAD="constant:rate=6,duration=16,in=64,out=400;constant:rate=20,duration=16,in=3000,out=8;\
constant:rate=6,duration=16,in=64,out=400"
mkdir -p "$OUT"
rm -f "$OUT"/*.txt
bench_pid=
cleanup() {
    [[ -n $bench_pid ]] && kill "$bench_pid" 2>/dev/null || true
    tmux send-keys -t "$SESSION" C-c 2>/dev/null || true  # SIGINT: the server shuts down cleanly
    for _ in $(seq 50); do tmux has-session -t "$SESSION" 2>/dev/null || break; sleep 0.2; done
    tmux kill-session -t "$SESSION" 2>/dev/null || true
}
trap cleanup EXIT
tmux new -d -s "$SESSION" -x 100 -y 30 "$SERVER"
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.5; done
echo "$SERVER" > "$OUT/command"
echo "python scripts/bench.py --url http://127.0.0.1:$PORT --synthetic \"$LOAD\" --quiet" >> "$OUT/command"
python scripts/bench.py --url "http://127.0.0.1:$PORT" --synthetic "$LOAD" --quiet --json "$OUT/bench.json" \
    > "$OUT/bench.txt" 2>&1 &
bench_pid=$!
i=0
while kill -0 "$bench_pid" 2>/dev/null; do
    sleep "$EVERY"
    i=$((i + 1))
    { printf '# t=%ss\n' "$((i * EVERY))"; tmux capture-pane -p -t "$SESSION"; } > "$OUT/$(printf %02d $i).txt"
done
wait "$bench_pid" || true
bench_pid=
curl -sf "http://127.0.0.1:$PORT/v1/cluster" > "$OUT/cluster.json" || true
{ printf '# t=%ss (load done)\n' "$(((i + 1) * EVERY))"; tmux capture-pane -p -t "$SESSION"; } > "$OUT/$(printf %02d $((i + 1))).txt"
echo "captured $((i + 1)) screens in $OUT"
