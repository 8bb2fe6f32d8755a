#!/usr/bin/env bash
# The prompt's upload against TTFT (issue 22, item 3): one real `tandem-edge run` at a time
# through `tandem-loadtest proxy` with an uplink cap (UPLINKS Mbit/s) and RTT milliseconds of
# round trip, for each wire dtype, on a prompt of about PROMPT tokens (the extraction prompt
# repeated), CHUNK tokens per hidden-state message (the cloud computes a chunk as soon as it
# has arrived, while the next one uploads).
#
# For each run: prompt tokens, prompt bytes on the wire, TTFT, and the upload time the bytes
# alone need at the cap (bytes × 8 / rate), from `tandem-edge run --json`.
#
# Usage: h-uplink-ttft.sh [--quick] [OUT_DIR]   (default target/scenarios/h-uplink-ttft)
# Env: SPLIT (the demo split), UPLINKS ("1 5 50"), RTT (100), PROMPT (512), CHUNK (128),
#      DTYPES ("f32 f16 bf16 int8 int4"), EDGE_BIN, TANDEM_BIN, LOADTEST_BIN, QUICK=1 (5 Mbit/s, f16, int8, int4).
# Writes: runs.tsv and each run's JSON.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_args h-uplink-ttft "$@"
EDGE_BIN=${EDGE_BIN:-$ROOT/target/release/tandem-edge}
[ -x "$EDGE_BIN" ] || { echo "$EDGE_BIN not found: cargo build --release -p tandem-edge" >&2; exit 1; }

split=${SPLIT:-$(demo_split)}
uplinks=${UPLINKS:-"1 5 50"}
rtt=${RTT:-100}
chunk=${CHUNK:-128}
dtypes=${DTYPES:-"f32 f16 bf16 int8 int4"}
if [ "$QUICK" = 1 ]; then
    uplinks=${UPLINKS:-5}
    dtypes=${DTYPES:-"f16 int8 int4"}
fi
# About PROMPT tokens: the extraction prompt (~130 tokens) repeated.
prompt_file=$OUT/prompt.txt
reps=$(( (${PROMPT:-512} + 129) / 130 ))
: >"$prompt_file"
for _ in $(seq 1 "$reps"); do cat "$ROOT/examples/extraction-prompt.txt" >>"$prompt_file"; done

start_server uplink --cloud "$split/cloud" ${SERVE_FLAGS:-}
PROXY_PID=""
cleanup() {
    [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null || true
    stop_server
}
trap cleanup EXIT

printf 'uplink_mbit\tdtype\tprompt_tokens\tprompt_bytes\tupload_s\tttft_s\n' >"$OUT/runs.tsv"
for up in $uplinks; do
    [ -n "$PROXY_PID" ] && { kill "$PROXY_PID" 2>/dev/null || true; wait "$PROXY_PID" 2>/dev/null || true; }
    "$LOADTEST_BIN" proxy --listen 127.0.0.1:0 --upstream "$SERVER_ADDR" --rtt-ms "$rtt" \
        --uplink-mbit "$up" >"$OUT/proxy.out" 2>"$OUT/proxy.err" &
    PROXY_PID=$!
    addr=""
    for _ in $(seq 1 100); do
        addr=$(sed -n 's/^proxy listening on \([^ ]*\) .*/\1/p' "$OUT/proxy.out" | head -n1)
        [ -n "$addr" ] && break
        sleep 0.1
    done
    [ -n "$addr" ] || { cat "$OUT/proxy.err" >&2; exit 1; }
    for dtype in $dtypes; do
        json=$OUT/run-$up-$dtype.json
        "$EDGE_BIN" run --edge "$split/edge" --server "ws://$addr/v1/edge/ws" \
            --prompt-file "$prompt_file" --max-tokens 4 --dtype "$dtype" \
            --chunk-tokens "$chunk" --json >"$json" 2>"$OUT/run-$up-$dtype.err"
        jq -r --arg up "$up" --arg d "$dtype" '
            [$up, $d, .usage.prompt_tokens, .wire.prompt_bytes,
             (.wire.prompt_bytes * 8 / ($up | tonumber) / 1e6 * 1000 | floor / 1000),
             (.timings.time_to_first_token_s * 1000 | floor / 1000)] | @tsv' "$json" >>"$OUT/runs.tsv"
        log "uplink $up Mbit/s $dtype: $(tail -n1 "$OUT/runs.tsv" | cut -f3-)"
    done
done
column -t "$OUT/runs.tsv" >&2
