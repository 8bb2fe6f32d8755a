#!/usr/bin/env bash
# Speculation across the split under real round trips (issue 22): one real `tandem-edge run`
# at a time against `tandem serve`, through `tandem-loadtest proxy` adding RTT (and JITTER)
# milliseconds of round trip, with speculation on (--max-draft-tokens DRAFTS) and off (0),
# alternating, on two prompts: an extraction prompt (examples/extraction-prompt.txt: the answer
# repeats spans of the prompt) and open generation (examples/gift-prompt-short.txt).
#
# For each run: output tokens, TTFT, TPOT = (total - TTFT) / (tokens - 1), decode round trips,
# drafts sent and confirmed, from `tandem-edge run --json`. The outputs with and without
# speculation are compared (greedy: they must be identical; a difference fails the script).
#
# Usage: g-speculation-rtt.sh [--quick] [OUT_DIR]   (default target/scenarios/g-speculation-rtt)
# Env: SPLIT (the demo split), RTTS ("0 20 50 100 200"), JITTER (0), REPS (2), TOKENS (64),
#      DRAFTS (8), EDGE_BIN (target/release/tandem-edge), SERVE_FLAGS, TANDEM_BIN, LOADTEST_BIN,
#      QUICK=1 (RTTs 0 and 100, one repetition, 24 tokens).
# Writes: runs.tsv (one line per run), summary.tsv (medians per RTT, prompt and mode),
#         summary.txt, and each run's JSON.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_args g-speculation-rtt "$@"
EDGE_BIN=${EDGE_BIN:-$ROOT/target/release/tandem-edge}
[ -x "$EDGE_BIN" ] || { echo "$EDGE_BIN not found: cargo build --release -p tandem-edge" >&2; exit 1; }

split=${SPLIT:-$(demo_split)}
rtts=${RTTS:-"0 20 50 100 200"}
jitter=${JITTER:-0}
reps=${REPS:-2}
tokens=${TOKENS:-64}
drafts=${DRAFTS:-8}
if [ "$QUICK" = 1 ]; then
    rtts=${RTTS:-"0 100"}
    reps=${REPS:-1}
    tokens=${TOKENS:-24}
fi

start_server spec --cloud "$split/cloud" ${SERVE_FLAGS:-}
PROXY_PID=""
cleanup() {
    [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null || true
    stop_server
}
trap cleanup EXIT

# start_proxy RTT: sets PROXY_URL.
start_proxy() {
    [ -n "$PROXY_PID" ] && { kill "$PROXY_PID" 2>/dev/null || true; wait "$PROXY_PID" 2>/dev/null || true; }
    "$LOADTEST_BIN" proxy --listen 127.0.0.1:0 --upstream "$SERVER_ADDR" \
        --rtt-ms "$1" --jitter-ms "$jitter" >"$OUT/proxy.out" 2>"$OUT/proxy.err" &
    PROXY_PID=$!
    local addr=""
    for _ in $(seq 1 100); do
        addr=$(sed -n 's/^proxy listening on \([^ ]*\) .*/\1/p' "$OUT/proxy.out" | head -n1)
        [ -n "$addr" ] && break
        sleep 0.1
    done
    [ -n "$addr" ] || { cat "$OUT/proxy.err" >&2; echo "the proxy did not start" >&2; exit 1; }
    PROXY_URL="ws://$addr/v1/edge/ws"
}

printf 'rtt_ms\tprompt\tdrafts\trep\ttokens\tttft_ms\ttpot_ms\trounds\tdrafted\taccepted\n' >"$OUT/runs.tsv"
for rtt in $rtts; do
    start_proxy "$rtt"
    for rep in $(seq 1 "$reps"); do
        for prompt in extraction open; do
            case $prompt in
                extraction) file=$ROOT/examples/extraction-prompt.txt; extra=() ;;
                open) file=$ROOT/examples/gift-prompt-short.txt
                      extra=(--profile "$ROOT/examples/profile.json") ;;
            esac
            for d in 0 "$drafts"; do
                json=$OUT/run-$rtt-$prompt-$d-$rep.json
                "$EDGE_BIN" run --edge "$split/edge" --server "$PROXY_URL" --prompt-file "$file" \
                    "${extra[@]}" --max-tokens "$tokens" --max-draft-tokens "$d" --json \
                    >"$json" 2>"$OUT/run-$rtt-$prompt-$d-$rep.err"
                jq -r --arg rtt "$rtt" --arg p "$prompt" --arg d "$d" --arg rep "$rep" '
                    (.usage.output_tokens) as $n
                    | [$rtt, $p, $d, $rep, $n,
                       (.timings.time_to_first_token_s * 1000 | floor),
                       (if $n > 1 then ((.timings.total_s - .timings.time_to_first_token_s)
                          / ($n - 1) * 1000 * 10 | floor / 10) else 0 end),
                       .wire.decode_rounds, .wire.drafted_tokens, .wire.accepted_drafts]
                    | @tsv' "$json" >>"$OUT/runs.tsv"
                log "rtt $rtt $prompt drafts $d rep $rep: $(tail -n1 "$OUT/runs.tsv" | cut -f5-)"
            done
            off=$(jq -r .output "$OUT/run-$rtt-$prompt-0-$rep.json")
            on=$(jq -r .output "$OUT/run-$rtt-$prompt-$drafts-$rep.json")
            if [ "$off" != "$on" ]; then
                echo "outputs differ with and without speculation (rtt $rtt, $prompt, rep $rep)" >&2
                exit 1
            fi
        done
    done
done

# Medians per (rtt, prompt, drafts), and the ratio of TPOT with speculation to without.
python3 - "$OUT" "$drafts" <<'PY'
import csv, statistics, sys
out, drafts = sys.argv[1], sys.argv[2]
rows = list(csv.DictReader(open(f"{out}/runs.tsv"), delimiter="\t"))
groups = {}
for r in rows:
    groups.setdefault((int(r["rtt_ms"]), r["prompt"], r["drafts"]), []).append(r)
med = lambda rs, k: statistics.median(float(r[k]) for r in rs)
lines = ["rtt_ms\tprompt\ttpot_off_ms\ttpot_on_ms\ton/off\ttokens_per_round_trip_on\taccepted/drafted\tttft_off_ms\tttft_on_ms"]
for (rtt, prompt, d) in sorted(groups):
    if d != "0":
        continue
    off, on = groups[(rtt, prompt, "0")], groups.get((rtt, prompt, drafts), [])
    if not on:
        continue
    t_off, t_on = med(off, "tpot_ms"), med(on, "tpot_ms")
    per_rt = sum(float(r["tokens"]) - 1 for r in on) / max(1.0, sum(float(r["rounds"]) for r in on))
    acc = sum(float(r["accepted"]) for r in on) / max(1.0, sum(float(r["drafted"]) for r in on))
    lines.append(f"{rtt}\t{prompt}\t{t_off:.1f}\t{t_on:.1f}\t{t_on / t_off:.2f}\t{per_rt:.2f}\t{acc:.2f}\t{med(off, 'ttft_ms'):.0f}\t{med(on, 'ttft_ms'):.0f}")
open(f"{out}/summary.tsv", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
cp "$OUT/summary.tsv" "$OUT/summary.txt"
log "wrote $OUT/summary.tsv"
