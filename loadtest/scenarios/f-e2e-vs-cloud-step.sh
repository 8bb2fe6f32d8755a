#!/usr/bin/env bash
# End to end against the cloud step, in one sitting: issue 7's "64 devices through real
# sockets reach at least 90% of the cloud step alone".
#
# PAIRS (2) times, alternately:
#   1. the cloud step alone: `tandem bench --sessions DEVICES --decode-wait-ms 200` (every
#      decode step carries every session; the simulated devices run in the bench's driver
#      thread), its decode tok/s;
#   2. end to end: `tandem serve` plus `tandem-loadtest` with DEVICES devices at once over
#      real WebSockets (PROMPT-token prompts, OUTPUT tokens, POOL distinct prompts so that the
#      load generator, which shares the CPU with the server, computes few edge rows), its
#      steady decode rate: the output tokens received between the moment every device has
#      its first token (the run's TTFT max) and the first completed generation, over that
#      time, read off the report's once-a-second timeline.
# The ratio of each pair (end to end / cloud step) and their median go to summary.txt.
#
# Usage: f-e2e-vs-cloud-step.sh [--quick] [OUT_DIR]   (default target/scenarios/f-e2e-vs-cloud-step)
# Env: SPLIT (default the demo split), DEVICES (64), PROMPT (64), OUTPUT (128), POOL (4),
#      PAIRS (2), SERVE_FLAGS, TANDEM_BIN, LOADTEST_BIN, QUICK=1 (4 devices, short outputs).
# Writes: bench-N.json, e2e-N.json, e2e-N.png, summary.tsv, summary.txt.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_args f-e2e-vs-cloud-step "$@"

split=${SPLIT:-$(demo_split)}
devices=${DEVICES:-64}
prompt=${PROMPT:-64}
output=${OUTPUT:-128}
pool=${POOL:-4}
pairs=${PAIRS:-2}
if [ "$QUICK" = 1 ]; then
    devices=${DEVICES:-4}
    prompt=${PROMPT:-16}
    output=${OUTPUT:-24}
    pairs=${PAIRS:-1}
fi

# steady REPORT: tok/s between the last first token and the first completion ("" if the
# window holds fewer than two timeline samples).
steady() {
    jq -r '(.latency_ms.ttft.max // 0) / 1000 as $t0
        | [.timeline[] | select(.t_s >= $t0 and .completed == 0)] as $w
        | if ($w | length) >= 2 and ($w[-1].t_s > $w[0].t_s)
          then (($w[-1].output_tokens - $w[0].output_tokens) / ($w[-1].t_s - $w[0].t_s))
          else "" end' "$1"
}

printf 'pair\tcloud_step_tok_s\te2e_steady_tok_s\tratio\te2e_whole_run_tok_s\ttpot_p50_ms\ttpot_p99_ms\n' >"$OUT/summary.tsv"
for i in $(seq 1 "$pairs"); do
    log "pair $i: the cloud step alone, $devices sessions"
    "$TANDEM_BIN" bench --model "$split" --sessions "$devices" --prompt-tokens "$prompt" \
        --gen-tokens "$output" --decode-wait-ms 200 --mixed-decoders 0 --prefix-sessions 0 \
        >"$OUT/bench-$i.json" 2>"$OUT/bench-$i.err"
    cloud=$(jq -r --argjson n "$devices" '.decode[] | select(.sessions == $n) | .decode_tokens_per_s' "$OUT/bench-$i.json")

    log "pair $i: $devices devices through real sockets"
    # shellcheck disable=SC2086
    start_server "e2e-$i" --cloud "$split/cloud" ${SERVE_FLAGS:-}
    "$LOADTEST_BIN" run --server "$WS_URL" --edge "$split/edge" --devices "$devices" \
        --arrival all --prompt-tokens "fixed:$prompt" --output-tokens "fixed:$output" \
        --prompt-pool "$pool" --duration-s 600 --metrics-url "$METRICS_URL" --quiet \
        --report "$OUT/e2e-$i.json" --plot "$OUT/e2e-$i.png"
    stop_server
    e2e=$(steady "$OUT/e2e-$i.json")
    [ -n "$e2e" ] || { echo "pair $i: the run has no steady decode window" >&2; exit 1; }
    jq -r --arg i "$i" --arg cloud "$cloud" --arg e2e "$e2e" '
        [$i, $cloud, $e2e, (($e2e | tonumber) / ($cloud | tonumber)),
         .throughput.output_tokens_per_s, .latency_ms.tpot.p50, .latency_ms.tpot.p99] | @tsv' \
        "$OUT/e2e-$i.json" >>"$OUT/summary.tsv"
done

{
    column -t "$OUT/summary.tsv"
    tail -n +2 "$OUT/summary.tsv" | cut -f4 | sort -g | awk '{ r[++n] = $1 } END {
        m = (n % 2) ? r[(n + 1) / 2] : (r[n / 2] + r[n / 2 + 1]) / 2
        printf "end to end / cloud step, median of %d pairs: %.3f\n", n, m }'
} | tee "$OUT/summary.txt"
echo "reports and summary in $OUT"
