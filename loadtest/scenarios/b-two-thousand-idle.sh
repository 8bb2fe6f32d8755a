#!/usr/bin/env bash
# Scenario (b): 2,000 devices with live sessions on a tiny model for 2 minutes, mostly idle.
# Devices arrive as a Poisson process; each runs long generations at a slow pace (a pause
# of STEP_DELAY_MS before each decode step's hidden state, so a session stays open and
# idle between its tokens) with think time between generations. Expected: no errors, and
# server memory flat once everyone has arrived.
#
# Usage: b-two-thousand-idle.sh [--quick] [OUT_DIR]   (default target/scenarios/b-two-thousand-idle)
# Env: SPLIT (a split dir; default: a tiny model written by `tandem-loadtest tiny-model`
#      under OUT_DIR/tiny), DEVICES (2000), DURATION_S (120), RATE (arrivals/s, 100),
#      STEP_DELAY_MS (1000), THINK_MS (3000), OUTPUT (64), PROMPT (32), SERVE_FLAGS,
#      TANDEM_BIN, LOADTEST_BIN, QUICK=1 (200 devices for 8 s: a smoke test).
# Writes: b.json, b.png, rss.txt (server VmRSS in KiB once a second), metrics-{before,
#      after}.txt (/metrics), b.server.{out,err}, summary.txt.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_args b-two-thousand-idle "$@"

devices=${DEVICES:-2000}
duration=${DURATION_S:-120}
rate=${RATE:-100}
step_delay=${STEP_DELAY_MS:-1000}
think=${THINK_MS:-3000}
output=${OUTPUT:-64}
prompt=${PROMPT:-32}
if [ "$QUICK" = 1 ]; then
    devices=${DEVICES:-200}
    duration=${DURATION_S:-8}
    rate=${RATE:-100}
    step_delay=${STEP_DELAY_MS:-200}
    think=${THINK_MS:-500}
    output=${OUTPUT:-8}
fi
split=${SPLIT:-$(tiny_split "$OUT/tiny")}
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# shellcheck disable=SC2086
start_server b --cloud "$split/cloud" --max-sessions $((devices + devices / 4)) \
    --max-batch-seqs 256 --kv-cache-gib 1 ${SERVE_FLAGS:-}
sample_rss "$SERVER_PID" "$OUT/rss.txt"
scrape "$OUT/metrics-before.txt"
log "$devices devices, poisson:$rate arrivals, ${step_delay} ms per step, ${think} ms think, ${duration} s"
"$LOADTEST_BIN" run --server "$WS_URL" --edge "$split/edge" --devices "$devices" \
    --arrival "poisson:$rate" --prompt-tokens "fixed:$prompt" --output-tokens "fixed:$output" \
    --step-delay-ms "$step_delay" --think-ms "$think" --generations-per-device 200 \
    --duration-s "$duration" --prompt-pool 64 --metrics-url "$METRICS_URL" --quiet \
    --report "$OUT/b.json" --plot "$OUT/b.png"
scrape "$OUT/metrics-after.txt"
# The server's user + system CPU seconds over its life: per output token, an upper bound on
# what the transport and scheduler cost per session step (the tiny model's compute is in it).
server_cpu=$(awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f\n", ($14 + $15) / hz }' "/proc/$SERVER_PID/stat")
stop_rss
stop_server

{
    summarize "b" "$OUT/b.json"
    jq -r '"peak generations in progress: \([.timeline[].active] | max), completed \(.counts.completed), cut by the deadline \(.counts.cut_by_deadline) (expected: the run ends on the clock)"' "$OUT/b.json"
    awk 'NR > 1 { if (min == "" || $2 < min) min = $2; if ($2 > max) max = $2; last = $2 }
         END { printf "server RSS: min %.1f MiB, max %.1f MiB, last %.1f MiB (%d samples)\n", min / 1024, max / 1024, last / 1024, NR - 1 }' "$OUT/rss.txt"
    grep -E '^tandem_(kv_blocks_(used|free)|sessions_active)' "$OUT/metrics-after.txt" || true
    jq -r --arg cpu "$server_cpu" '"server CPU: \($cpu) s for \(.throughput.output_tokens) output tokens = \(($cpu | tonumber) * 1000 / .throughput.output_tokens | . * 1000 | round / 1000) ms per token"' "$OUT/b.json"
    errors=$(jq '.counts.failed' "$OUT/b.json")
    [ "$errors" = 0 ] && echo "OK: no errors" || echo "FAIL: $errors failed generations"
} | tee "$OUT/summary.txt"
echo "report, PNG, RSS and metrics in $OUT"
