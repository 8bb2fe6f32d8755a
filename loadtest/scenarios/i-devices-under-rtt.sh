#!/usr/bin/env bash
# Many devices behind real round trips (issue 22, item 1): the load generator's devices
# spread over LINKS in-process delay proxies with round trips of RTT ± SPREAD ms and JITTER
# ms of jitter each way (`tandem-loadtest run --rtt-ms … --rtt-spread-ms … --jitter-ms …`),
# answers trickling in at different times.
#   1. DEVICES (64) devices at once on the demo model, one generation of PROMPT (64) and
#      OUTPUT (64) tokens each: aggregate output tok/s, TPOT p50/p99, the engine's busy share;
#   2. MANY (2,000) devices on the tiny model arriving poisson:RATE (100/s) for DURATION_S
#      (60) s, generations of 32 prompt and MANY_OUTPUT (16) tokens, 1 s think time: errors,
#      completed generations, the engine's busy share of the wall time.
# The load generator's devices do not draft (no speculation in the simulated devices).
#
# Usage: i-devices-under-rtt.sh [--quick] [OUT_DIR]   (default target/scenarios/i-devices-under-rtt)
# Env: SPLIT (the demo split), RTT (100), SPREAD (30), JITTER (10), LINKS (16), DEVICES, PROMPT,
#      OUTPUT, MANY, RATE, DURATION_S, MANY_OUTPUT, TANDEM_BIN, LOADTEST_BIN, QUICK=1 (8 and 200 devices).
# Writes: sixty-four.json/.png, many.json/.png, summary.txt.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_args i-devices-under-rtt "$@"
rtt=${RTT:-100}; spread=${SPREAD:-30}; jitter=${JITTER:-10}; links=${LINKS:-16}
devices=${DEVICES:-64}; prompt=${PROMPT:-64}; output=${OUTPUT:-64}
many=${MANY:-2000}; rate=${RATE:-100}; duration=${DURATION_S:-60}; many_output=${MANY_OUTPUT:-16}
if [ "$QUICK" = 1 ]; then
    devices=${DEVICES:-8}; output=${OUTPUT:-16}; many=${MANY:-200}; duration=${DURATION_S:-10}
fi
net=(--rtt-ms "$rtt" --rtt-spread-ms "$spread" --jitter-ms "$jitter" --links "$links")
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

split=${SPLIT:-$(demo_split)}
start_server sixty-four --cloud "$split/cloud" ${SERVE_FLAGS:-}
log "$devices devices on the demo model, rtt $rtt±$spread ms, jitter ±$jitter ms"
"$LOADTEST_BIN" run --server "$WS_URL" --edge "$split/edge" --devices "$devices" \
    --prompt-tokens "fixed:$prompt" --output-tokens "fixed:$output" --prompt-pool 4 --seed 1 \
    --duration-s 600 --metrics-url "$METRICS_URL" --quiet "${net[@]}" \
    --report "$OUT/sixty-four.json" --plot "$OUT/sixty-four.png"
stop_server

tiny=$(tiny_split "$OUT/tiny")
start_server many --cloud "$tiny/cloud" --max-sessions $((many + many / 4)) \
    --max-batch-seqs 256 --kv-cache-gib 1 ${SERVE_FLAGS:-}
log "$many devices on the tiny model, poisson:$rate, rtt $rtt±$spread ms, ${duration} s"
"$LOADTEST_BIN" run --server "$WS_URL" --edge "$tiny/edge" --devices "$many" \
    --arrival "poisson:$rate" --prompt-tokens fixed:32 --output-tokens "fixed:$many_output" \
    --think-ms 1000 --generations-per-device 200 --duration-s "$duration" --prompt-pool 64 \
    --metrics-url "$METRICS_URL" --quiet "${net[@]}" \
    --report "$OUT/many.json" --plot "$OUT/many.png"
stop_server

for r in sixty-four many; do
    jq -r --arg r "$r" '"\($r): \(.settings.devices) devices, \(.settings.network); completed \(.counts.completed), errors \(.errors | length) \(.errors), cut by the deadline \(.counts.cut_by_deadline); output \(.throughput.output_tokens_per_s | . * 10 | floor / 10) tok/s over \(.wall_s | floor) s; TPOT p50 \(.latency_ms.tpot.p50 | floor) ms, p99 \(.latency_ms.tpot.p99 | floor) ms; engine busy share \(((.server_metrics.overhead.forward_s // 0) / .wall_s) * 1000 | floor / 10)%, waiting for expected devices \(((.server_metrics.overhead.decode_wait_s // 0) / .wall_s) * 1000 | floor / 10)%"' "$OUT/$r.json"
done | tee "$OUT/summary.txt"
