#!/usr/bin/env bash
# Scenario (a): 1, 4, 16 and 64 devices decoding at once on the demo model; aggregate output
# tokens per second and latencies per device count.
#
# Usage: a-decoding-devices.sh [--quick] [OUT_DIR]   (default target/scenarios/a-decoding-devices)
# Env: SPLIT (split dir with edge/ and cloud/, default models/demo-split-k1, made from the
#      demo GGUF when missing), COUNTS ("1 4 16 64"), PROMPT (64), OUTPUT (128),
#      GENERATIONS (3 per device), DTYPE (f32), SERVE_FLAGS (extra `tandem serve` flags),
#      POOL (distinct prompts, default one per device; fewer means the load generator
#      computes fewer edge rows itself, since equal prompts replay one greedy continuation),
#      TANDEM_BIN, LOADTEST_BIN, QUICK=1 (2 counts, short outputs: a smoke test).
# Writes: a-N.json and a-N.png per count, a.server.{out,err}, summary.txt, summary.tsv.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_args a-decoding-devices "$@"

split=$(demo_split)
counts=${COUNTS:-1 4 16 64}
prompt=${PROMPT:-64}
output=${OUTPUT:-128}
generations=${GENERATIONS:-3}
duration=600
if [ "$QUICK" = 1 ]; then
    counts=${COUNTS:-1 4}
    prompt=${PROMPT:-16}
    output=${OUTPUT:-8}
    generations=${GENERATIONS:-1}
    duration=60
fi

# shellcheck disable=SC2086
start_server a --cloud "$split/cloud" ${SERVE_FLAGS:-}
printf 'devices\tcompleted\tfailed\toutput_tok_s\tttft_p50_ms\tttft_p99_ms\ttpot_p50_ms\ttpot_p99_ms\te2e_p50_ms\n' >"$OUT/summary.tsv"
: >"$OUT/summary.txt"
for n in $counts; do
    log "$n decoding devices"
    "$LOADTEST_BIN" run --server "$WS_URL" --edge "$split/edge" --devices "$n" \
        --arrival all --prompt-tokens "fixed:$prompt" --output-tokens "fixed:$output" \
        --generations-per-device "$generations" --prompt-pool "${POOL:-$n}" --dtype "${DTYPE:-f32}" \
        --duration-s "$duration" --metrics-url "$METRICS_URL" --quiet \
        --report "$OUT/a-$n.json" --plot "$OUT/a-$n.png"
    summarize "a $n devices" "$OUT/a-$n.json" | tee -a "$OUT/summary.txt"
    jq -r '[.counts.devices, .counts.completed, .counts.failed, .throughput.output_tokens_per_s,
            .latency_ms.ttft.p50, .latency_ms.ttft.p99, .latency_ms.tpot.p50, .latency_ms.tpot.p99,
            .latency_ms.e2e.p50] | @tsv' "$OUT/a-$n.json" >>"$OUT/summary.tsv"
done
stop_server
column -t "$OUT/summary.tsv" | tee -a "$OUT/summary.txt"
echo "reports, PNGs and summary in $OUT"
