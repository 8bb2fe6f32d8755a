#!/usr/bin/env bash
# Scenario (c): long prompts arriving while many devices decode, once under each batching
# policy: `decode-first` (stall-free: the prompt chunk next to decodes is capped by
# --prefill-slack, default 0.5, or SLACK), `decode-first-uncapped` (`--prefill-slack inf`: chunks
# as large as --max-batch-tokens), and `prefill-first`. DECODERS
# devices decode short-prompt generations back to back; meanwhile PREFILLERS devices arrive
# as a Poisson process and send one LONG-token prompt each. The figure to read is the
# decoders' TPOT p99 under each policy, against their TPOT p50 with no long prompts (the
# baseline run); the price is the long prompts' TTFT, also summarized.
#
# Usage: c-mixed-prompts.sh [--quick] [OUT_DIR]   (default target/scenarios/c-mixed-prompts)
# Env: SPLIT (default the demo split; a tiny model's split works for smoke tests),
#      DECODERS (32), PREFILLERS (24), LONG (512), LONG_RATE (arrivals/s, 1), SHORT (32),
#      OUTPUT (64), DURATION_S (60), RUNS (the policies, default all three), TANDEM_BIN, LOADTEST_BIN, QUICK=1 (4 + 3 devices, ~10 s).
# Writes: baseline.json/png (decoders alone), then per policy P: P-decode.json/png (the
#      decoders), P-prefill.json/png (the long prompts), P.server.{out,err}; summary.txt.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_args c-mixed-prompts "$@"

split=${SPLIT:-$(demo_split)}
decoders=${DECODERS:-32}
prefillers=${PREFILLERS:-24}
long=${LONG:-512}
long_rate=${LONG_RATE:-1}
short=${SHORT:-32}
output=${OUTPUT:-64}
duration=${DURATION_S:-60}
if [ "$QUICK" = 1 ]; then
    decoders=${DECODERS:-4}
    prefillers=${PREFILLERS:-3}
    long=${LONG:-300}
    long_rate=${LONG_RATE:-2}
    output=${OUTPUT:-16}
    duration=${DURATION_S:-6}
fi

# decoders LABEL: the decoding devices, generations back to back until the clock stops.
decoders() {
    "$LOADTEST_BIN" run --server "$WS_URL" --edge "$split/edge" --devices "$decoders" \
        --arrival all --prompt-tokens "fixed:$short" --output-tokens "fixed:$output" \
        --generations-per-device 1000 --duration-s "$duration" --prompt-pool "$decoders" \
        --seed 1 --quiet --report "$OUT/$1.json" --plot "$OUT/$1.png"
}

: >"$OUT/summary.txt"
start_server baseline --cloud "$split/cloud" --policy decode-first
log "baseline: $decoders decoders alone"
decoders baseline
summarize "baseline (decode only)" "$OUT/baseline.json" | tee -a "$OUT/summary.txt"
stop_server

# flags LABEL: the server flags of each run.
flags() {
    case "$1" in
        decode-first) echo "--policy decode-first ${SLACK:+--prefill-slack $SLACK}" ;;
        decode-first-uncapped) echo "--policy decode-first --prefill-slack inf" ;;
        prefill-first) echo "--policy prefill-first" ;;
    esac
}
runs=${RUNS:-decode-first decode-first-uncapped prefill-first}
for policy in $runs; do
    # shellcheck disable=SC2046
    start_server "$policy" --cloud "$split/cloud" $(flags "$policy")
    log "$policy: $decoders decoders + $prefillers long prompts of $long tokens"
    decoders "$policy-decode" &
    dec=$!
    "$LOADTEST_BIN" run --server "$WS_URL" --edge "$split/edge" --devices "$prefillers" \
        --arrival "poisson:$long_rate" --prompt-tokens "fixed:$long" --output-tokens fixed:1 \
        --duration-s "$duration" --prompt-pool "$prefillers" --seed 2 --quiet \
        --metrics-url "$METRICS_URL" --report "$OUT/$policy-prefill.json" --plot "$OUT/$policy-prefill.png"
    wait "$dec"
    stop_server
    summarize "$policy decoders" "$OUT/$policy-decode.json" | tee -a "$OUT/summary.txt"
    summarize "$policy long prompts" "$OUT/$policy-prefill.json" | tee -a "$OUT/summary.txt"
done

base=$(jq '.latency_ms.tpot.p50' "$OUT/baseline.json")
for policy in $runs; do
    jq -r --arg p "$policy" --argjson base "$base" \
        '"\($p): decoders TPOT p99 \(.latency_ms.tpot.p99) ms = \((.latency_ms.tpot.p99 / $base * 100 | round) / 100)x decode-only TPOT p50 (\($base) ms), p50 \(.latency_ms.tpot.p50) ms, \(.throughput.output_tokens_per_s | round) tok/s"' \
        "$OUT/$policy-decode.json" | tee -a "$OUT/summary.txt"
    jq -r --arg p "$policy" \
        '"\($p): long prompts completed \(.counts.completed), TTFT p50 \(.latency_ms.ttft.p50) ms, p99 \(.latency_ms.ttft.p99) ms"' \
        "$OUT/$policy-prefill.json" | tee -a "$OUT/summary.txt"
done
echo "reports, PNGs and summary in $OUT"
