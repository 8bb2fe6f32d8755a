#!/usr/bin/env bash
# Scenario (d): decoding load while the server is killed with SIGKILL mid-run and started
# again on the same port. With the in-memory session store the new process has lost every
# session: devices reconnect (backoff), meet `unknown_session`, open again and replay their
# prompt and the tokens they had; with REDIS_URL set, the session parameters survive and
# the resume is a protocol replay. Expected: zero lost generations, zero failures.
#
# Usage: d-kill-restart.sh [--quick] [OUT_DIR]   (default target/scenarios/d-kill-restart)
# Env: SPLIT (default the demo split), DEVICES (16), OUTPUT (128), PROMPT (64),
#      GENERATIONS (4), THINK_MS (200), STEP_DELAY_MS (0; slows the devices so a small
#      model is still mid-run at the kill), KILL_AFTER_S (8), DOWN_S (1), MAX_RECONNECTS (10),
#      REDIS_URL (optional: `tandem serve --redis`), TANDEM_BIN, LOADTEST_BIN,
#      QUICK=1 (4 devices, kill after 2 s).
# Writes: d.json, d.png, d-1.server.{out,err} and d-2.server.{out,err} (before and after
#      the kill), summary.txt.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_args d-kill-restart "$@"

split=${SPLIT:-$(demo_split)}
devices=${DEVICES:-16}
output=${OUTPUT:-128}
prompt=${PROMPT:-64}
generations=${GENERATIONS:-4}
think=${THINK_MS:-200}
kill_after=${KILL_AFTER_S:-8}
down=${DOWN_S:-1}
max_reconnects=${MAX_RECONNECTS:-10}
step_delay=${STEP_DELAY_MS:-0}
if [ "$QUICK" = 1 ]; then
    step_delay=${STEP_DELAY_MS:-20}
    devices=${DEVICES:-4}
    output=${OUTPUT:-64}
    prompt=${PROMPT:-16}
    generations=${GENERATIONS:-3}
    kill_after=${KILL_AFTER_S:-2}
    think=${THINK_MS:-300}
fi
serve_flags=(--cloud "$split/cloud")
[ -n "${REDIS_URL:-}" ] && serve_flags+=(--redis "$REDIS_URL")

start_server d-1 "${serve_flags[@]}"
log "$devices devices; SIGKILL after ${kill_after}s, restart ${down}s later on $SERVER_ADDR"
"$LOADTEST_BIN" run --server "$WS_URL" --edge "$split/edge" --devices "$devices" \
    --arrival all --prompt-tokens "fixed:$prompt" --output-tokens "fixed:$output" \
    --generations-per-device "$generations" --think-ms "$think" --prompt-pool "$devices" \
    --step-delay-ms "$step_delay" \
    --max-reconnects "$max_reconnects" --duration-s 600 \
    --report "$OUT/d.json" --plot "$OUT/d.png" 2>"$OUT/d.progress" &
load=$!
sleep "$kill_after"
kill_server
log "killed; restarting in ${down}s"
sleep "$down"
LISTEN=$SERVER_ADDR start_server d-2 "${serve_flags[@]}"
wait "$load"
stop_server

{
    summarize "d" "$OUT/d.json"
    jq -r '"resume: \(.resume | tojson)"' "$OUT/d.json"
    lost=$(jq '.resume.lost' "$OUT/d.json")
    failed=$(jq '.counts.failed' "$OUT/d.json")
    reconnects=$(jq '.resume.reconnects' "$OUT/d.json")
    if [ "$lost" = 0 ] && [ "$failed" = 0 ] && [ "$reconnects" -gt 0 ]; then
        echo "OK: the kill cost no generation ($reconnects reconnects)"
    else
        echo "FAIL: lost $lost, failed $failed, reconnects $reconnects"
    fi
} | tee "$OUT/summary.txt"
echo "report, PNG and summary in $OUT"
