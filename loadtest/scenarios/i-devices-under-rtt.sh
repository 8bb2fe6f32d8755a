#!/usr/bin/env bash
# Many devices behind real round trips (issue 22): the load generator's devices spread over
# LINKS in-process delay proxies with round trips of RTT ± SPREAD ms and JITTER ms of jitter
# each way (`tandem-loadtest run --rtt-ms … --rtt-spread-ms … --jitter-ms …`), answers
# trickling in at different times.
#   1. DEVICES (64) devices at once on the demo model, one generation of PROMPT (64) and
#      OUTPUT (64) tokens each, replayed edge compute (no drafting): aggregate output tok/s,
#      TPOT p50/p99, the engine's busy share;
#   2. speculation (DRAFTS, default 8; 0 skips this part): DEVICES devices at once with real
#      edge compute (each device runs its own edge layer, on this machine's CPU), one
#      generation of OUTPUT tokens on the extraction prompt (examples/extraction-prompt.txt)
#      and on open generation (examples/gift-prompt-short.txt with examples/profile.json),
#      `--max-draft-tokens 0` and `DRAFTS` alternating, PAIRS (2) pairs per workload:
#      aggregate output tok/s with and without, tokens per round trip, drafts confirmed;
#   3. MID (512) devices at once on the demo model, one generation of PROMPT and MID_OUTPUT
#      (32) tokens, replayed compute (no drafting): errors, output tok/s, busy share;
#   4. MANY (2,000) devices on the tiny model arriving poisson:RATE (100/s) for DURATION_S
#      (60) s, generations of 32 prompt and MANY_OUTPUT (16) tokens, 1 s think time: errors,
#      completed generations, the engine's busy share of the wall time.
# Parts 1, 3 and 4 replay the edge compute, so their devices do not draft (replayed devices
# never do: `tandem-loadtest run --help`); part 2 is the one with speculation.
#
# Usage: i-devices-under-rtt.sh [--quick] [OUT_DIR]   (default target/scenarios/i-devices-under-rtt)
# Env: SPLIT (the demo split), RTT (100), SPREAD (30), JITTER (10), LINKS (16), DEVICES, PROMPT,
#      OUTPUT, DRAFTS, PAIRS, MID, MID_OUTPUT, MANY, RATE, DURATION_S, MANY_OUTPUT,
#      PARTS ("1 2 3 4": which parts to run), TANDEM_BIN, LOADTEST_BIN,
#      QUICK=1 (8, 64 and 200 devices, one pair).
# Writes: sixty-four.json/.png, spec-WORKLOAD-DRAFTS-PAIR.json, spec.tsv, five-twelve.json/.png,
#         many.json/.png, summary.txt.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_args i-devices-under-rtt "$@"
rtt=${RTT:-100}; spread=${SPREAD:-30}; jitter=${JITTER:-10}; links=${LINKS:-16}
devices=${DEVICES:-64}; prompt=${PROMPT:-64}; output=${OUTPUT:-64}
drafts=${DRAFTS:-8}; pairs=${PAIRS:-2}; mid=${MID:-512}; mid_output=${MID_OUTPUT:-32}
many=${MANY:-2000}; rate=${RATE:-100}; duration=${DURATION_S:-60}; many_output=${MANY_OUTPUT:-16}
parts=${PARTS:-"1 2 3 4"}
if [ "$QUICK" = 1 ]; then
    devices=${DEVICES:-8}; output=${OUTPUT:-16}; pairs=${PAIRS:-1}; mid=${MID:-64}
    many=${MANY:-200}; duration=${DURATION_S:-10}
fi
net=(--rtt-ms "$rtt" --rtt-spread-ms "$spread" --jitter-ms "$jitter" --links "$links")
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
part() { case " $parts " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
reports=()

split=${SPLIT:-$(demo_split)}
if part 1; then
    start_server sixty-four --cloud "$split/cloud" ${SERVE_FLAGS:-}
    log "$devices devices on the demo model, rtt $rtt±$spread ms, jitter ±$jitter ms"
    "$LOADTEST_BIN" run --server "$WS_URL" --edge "$split/edge" --devices "$devices" \
        --prompt-tokens "fixed:$prompt" --output-tokens "fixed:$output" --prompt-pool 4 --seed 1 \
        --duration-s 600 --metrics-url "$METRICS_URL" --quiet "${net[@]}" \
        --report "$OUT/sixty-four.json" --plot "$OUT/sixty-four.png"
    stop_server
    reports+=(sixty-four)
fi

if part 2 && [ "$drafts" -gt 0 ]; then
    # One server for every run of this part: both sides of each pair see the same engine.
    start_server spec --cloud "$split/cloud" ${SERVE_FLAGS:-}
    printf 'workload\tdrafts\tpair\terrors\tcompleted\ttok_per_s\ttpot_p50_ms\ttokens_per_round_trip\tdrafted\taccepted\tbusy_share\n' >"$OUT/spec.tsv"
    for pair in $(seq 1 "$pairs"); do
        for workload in extraction open; do
            case $workload in
                extraction) wl=(--prompt-file "$ROOT/examples/extraction-prompt.txt") ;;
                open) wl=(--prompt-file "$ROOT/examples/gift-prompt-short.txt"
                          --profile "$ROOT/examples/profile.json") ;;
            esac
            for d in 0 "$drafts"; do
                json=$OUT/spec-$workload-$d-$pair.json
                log "speculation: $devices devices, $workload, --max-draft-tokens $d, pair $pair"
                "$LOADTEST_BIN" run --server "$WS_URL" --edge "$split/edge" --devices "$devices" \
                    "${wl[@]}" --output-tokens "fixed:$output" --seed 1 --device-compute real \
                    --max-draft-tokens "$d" --duration-s 600 --metrics-url "$METRICS_URL" \
                    --quiet "${net[@]}" --report "$json"
                jq -r --arg w "$workload" --arg d "$d" --arg p "$pair" '
                    [$w, $d, $p, (.errors | length), .counts.completed,
                     .throughput.output_tokens_per_s, (.latency_ms.tpot.p50 | floor),
                     .speculation.tokens_per_round_trip, .speculation.drafted_tokens,
                     .speculation.accepted_drafts,
                     (((.server_metrics.overhead.forward_s // 0) / .wall_s) * 1000 | floor / 1000)]
                    | @tsv' "$json" >>"$OUT/spec.tsv"
            done
        done
    done
    stop_server
    # Per workload: the median tok/s with and without, and their ratio.
    python3 - "$OUT" "$drafts" >"$OUT/spec-summary.txt" <<'PY'
import csv, statistics, sys
out, drafts = sys.argv[1], sys.argv[2]
rows = list(csv.DictReader(open(f"{out}/spec.tsv"), delimiter="\t"))
for w in ("extraction", "open"):
    off = [float(r["tok_per_s"]) for r in rows if r["workload"] == w and r["drafts"] == "0"]
    on = [float(r["tok_per_s"]) for r in rows if r["workload"] == w and r["drafts"] == drafts]
    tpr = [float(r["tokens_per_round_trip"]) for r in rows if r["workload"] == w and r["drafts"] == drafts]
    if off and on:
        pairs = " ".join(f"{b / a:.2f}" for a, b in zip(off, on))
        print(f"speculation {w}: {statistics.median(off):.1f} -> {statistics.median(on):.1f} tok/s "
              f"(median; on/off {statistics.median(on) / statistics.median(off):.2f}, per pair {pairs}); "
              f"{statistics.median(tpr):.2f} tokens per round trip with drafts")
PY
fi

if part 3; then
    start_server five-twelve --cloud "$split/cloud" --max-sessions $((mid + mid / 4)) \
        ${SERVE_FLAGS:-}
    log "$mid devices on the demo model, rtt $rtt±$spread ms"
    "$LOADTEST_BIN" run --server "$WS_URL" --edge "$split/edge" --devices "$mid" \
        --prompt-tokens "fixed:$prompt" --output-tokens "fixed:$mid_output" --prompt-pool 4 \
        --seed 1 --duration-s 900 --metrics-url "$METRICS_URL" --quiet "${net[@]}" \
        --report "$OUT/five-twelve.json" --plot "$OUT/five-twelve.png"
    stop_server
    reports+=(five-twelve)
fi

if part 4; then
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
    reports+=(many)
fi

for r in ${reports[@]+"${reports[@]}"}; do
    jq -r --arg r "$r" '"\($r): \(.settings.devices) devices, \(.settings.network); completed \(.counts.completed), errors \(.errors | length) \(.errors), cut by the deadline \(.counts.cut_by_deadline); output \(.throughput.output_tokens_per_s | . * 10 | floor / 10) tok/s over \(.wall_s | floor) s; TPOT p50 \(.latency_ms.tpot.p50 | floor) ms, p99 \(.latency_ms.tpot.p99 | floor) ms; engine busy share \(((.server_metrics.overhead.forward_s // 0) / .wall_s) * 1000 | floor / 10)%, waiting for expected devices \(((.server_metrics.overhead.decode_wait_s // 0) / .wall_s) * 1000 | floor / 10)%"' "$OUT/$r.json"
done >"$OUT/summary.txt"
[ -f "$OUT/spec-summary.txt" ] && cat "$OUT/spec-summary.txt" >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
