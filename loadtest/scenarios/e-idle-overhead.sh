#!/usr/bin/env bash
# Scenario (b) on the demo model: what 2,000 live sessions cost the sessions that decode.
# DECODERS (64) devices decode alone; then the same DECODERS decode while IDLE (1,936) more
# devices hold sessions open (a 1-token prompt, then one step every IDLE_STEP_MS, 10 min:
# live but idle). Alternated PAIRS (2) times. Per run: the decoders' output tok/s and the
# server's CPU seconds per output token (utime + stime from /proc), so the overhead of the
# idle sessions (scheduler, transport, the store) shows as a ratio against the run without
# them, on the same server; and, within each run, the serving overhead the server reports
# itself (the load generator's `server_metrics.overhead`: engine bookkeeping + I/O threads'
# CPU against the engine's forward time; ms of bookkeeping per step). PERF=1 also records
# the server with `perf` during each run with idle sessions (perf-N.data; `perf report
# --sort dso,symbol`).
#
# The server's KV pool is sized to hold every session at its longest (KV_BLOCKS, default
# IDLE + DECODERS x blocks(16 + OUTPUT) + 64, block size 16): a session waiting for its
# device keeps its blocks, and the scheduler only preempts sessions admitted after the one
# asking (or finished ones), so with the server's default 1 GiB (1,506 blocks on the demo
# model) the first 1,506 idle sessions would fill the pool and the rest, and the decoders
# admitted after them, would never get a block.
#
# Usage: e-idle-overhead.sh [--quick] [OUT_DIR]   (default target/scenarios/e-idle-overhead)
# Env: SPLIT (default models/demo-split-k1), DECODERS, IDLE, OUTPUT (64), PAIRS,
#      IDLE_STEP_MS, KV_BLOCKS, TANDEM_BIN, LOADTEST_BIN, QUICK=1 (tiny counts: a smoke
#      test).
# Writes: alone-N.json, with-idle-N.json, idle-N.json, summary.tsv, summary.txt.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_args e-idle-overhead "$@"

split=$(demo_split)
decoders=${DECODERS:-64}
idle=${IDLE:-1936}
output=${OUTPUT:-64}
pairs=${PAIRS:-2}
idle_step=${IDLE_STEP_MS:-600000}
if [ "$QUICK" = 1 ]; then
    decoders=${DECODERS:-4}
    idle=${IDLE:-50}
    output=${OUTPUT:-8}
    pairs=${PAIRS:-1}
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# blocks N: KV blocks of 16 positions for N positions.
blocks() { echo $(( ($1 + 15) / 16 )); }
kv_blocks=${KV_BLOCKS:-$(( idle * $(blocks 4) + decoders * $(blocks $((16 + output))) + 64 ))}

start_server e --cloud "$split/cloud" --max-sessions $((idle + decoders + 64)) \
    --kv-blocks "$kv_blocks" ${SERVE_FLAGS:-}

# cpu_s: the server's user + system CPU seconds so far.
cpu_s() {
    awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f\n", ($14 + $15) / hz }' "/proc/$SERVER_PID/stat"
}

# metric NAME: the sum of the server's samples of NAME (0 when the scrape fails).
metric() {
    curl -fsS "$METRICS_URL" 2>/dev/null | awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { print s + 0 }'
}

# active: the server's live sessions.
active() { metric tandem_sessions_active; }

# decode NAME: the decoders' run; appends a line to summary.tsv.
decode() {
    local name=$1 before after tokens
    before=$(cpu_s)
    "$LOADTEST_BIN" run --server "$WS_URL" --edge "$split/edge" --devices "$decoders" \
        --arrival all --prompt-tokens fixed:16 --output-tokens "fixed:$output" \
        --prompt-pool "$decoders" --duration-s 600 --metrics-url "$METRICS_URL" --quiet \
        --report "$OUT/$name.json"
    after=$(cpu_s)
    tokens=$(jq '.throughput.output_tokens' "$OUT/$name.json")
    jq -r --arg name "$name" --arg cpu "$(awk -v a="$after" -v b="$before" 'BEGIN { print a - b }')" \
        --arg live "$(active)" '
        [$name, .counts.completed, .counts.failed, .throughput.output_tokens_per_s,
         .latency_ms.tpot.p50, .latency_ms.tpot.p99, $cpu,
         (($cpu | tonumber) * 1000 / .throughput.output_tokens), $live,
         ((.server_metrics.overhead.overhead_share // 0) * 100),
         (.server_metrics.overhead.bookkeeping_ms_per_step // 0),
         (.server_metrics.overhead.cpu_s.io // 0),
         (.server_metrics.overhead.forward_s // 0)] | @tsv' \
        "$OUT/$name.json" >>"$OUT/summary.tsv"
    [ "$tokens" != 0 ] || { echo "$name: no tokens" >&2; exit 1; }
}

printf 'run\tcompleted\tfailed\tout_tok_s\ttpot_p50_ms\ttpot_p99_ms\tserver_cpu_s\tcpu_ms_per_token\tlive_sessions_after\toverhead_pct\tbookkeeping_ms_per_step\tio_cpu_s\tforward_s\n' >"$OUT/summary.tsv"
for i in $(seq 1 "$pairs"); do
    log "pair $i: $decoders decoding devices alone"
    decode "alone-$i"

    log "pair $i: $idle idle devices connecting"
    "$LOADTEST_BIN" run --server "$WS_URL" --edge "$split/edge" --devices "$idle" \
        --arrival poisson:250 --prompt-tokens fixed:1 --output-tokens fixed:3 \
        --step-delay-ms "$idle_step" --prompt-pool 16 --duration-s 600 --quiet \
        --report "$OUT/idle-$i.json" &
    idle_pid=$!
    for _ in $(seq 1 240); do
        [ "$(active)" -ge "$idle" ] && break
        sleep 0.5
    done
    log "pair $i: $(active) live sessions, KV blocks $(metric tandem_kv_blocks_used) used, $(metric tandem_kv_blocks_free) free; $decoders decoding devices with them"
    perf_pid=""
    if [ "${PERF:-0}" = 1 ]; then
        perf record -g -p "$SERVER_PID" -o "$OUT/perf-$i.data" 2>/dev/null &
        perf_pid=$!
    fi
    decode "with-idle-$i"
    [ -z "$perf_pid" ] || { kill -INT "$perf_pid"; wait "$perf_pid" || true; }
    kill -INT "$idle_pid" 2>/dev/null || true
    wait "$idle_pid" || true
    # Their sessions end when their sockets close; wait until the server has let them go.
    for _ in $(seq 1 120); do
        [ "$(active)" -le 0 ] && break
        sleep 0.5
    done
done
stop_server

{
    column -t "$OUT/summary.tsv"
    awk -F'\t' 'NR > 1 && $1 ~ /^alone/ { a += $4; ca += $8; oa += $10; ba += $11; n++ }
                NR > 1 && $1 ~ /^with-idle/ { w += $4; cw += $8; ow += $10; bw += $11; m++ }
                END { if (n && m) {
                    printf "mean out tok/s: alone %.1f, with idle sessions %.1f (ratio %.3f); CPU ms per token: alone %.2f, with idle %.2f (ratio %.3f)\n", a / n, w / m, (w / m) / (a / n), ca / n, cw / m, (cw / m) / (ca / n)
                    printf "serving overhead (engine bookkeeping + io CPU) / forward: alone %.2f%%, with idle sessions %.2f%%; bookkeeping per step: alone %.3f ms, with idle %.3f ms\n", oa / n, ow / m, ba / n, bw / m } }' "$OUT/summary.tsv"
} | tee "$OUT/summary.txt"
echo "reports and summary in $OUT"
