# Shared by the scenario scripts (sourced, not run).
#
# Sets ROOT, TANDEM_BIN, LOADTEST_BIN, QUICK, OUT (from the first argument that is not
# --quick, default target/scenarios/<name>) and provides: start_server, stop_server,
# kill_server, sample_rss, scrape, summarize. Needs bash, curl or python3, jq.

set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TANDEM_BIN=${TANDEM_BIN:-$ROOT/target/release/tandem}
LOADTEST_BIN=${LOADTEST_BIN:-$ROOT/target/release/tandem-loadtest}
QUICK=${QUICK:-0}

# parse_args NAME "$@": --quick and an optional output directory.
parse_args() {
    local name=$1
    shift
    OUT=""
    for a in "$@"; do
        case "$a" in
            --quick) QUICK=1 ;;
            -h|--help) sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//' | head -n -1; exit 0 ;;
            -*) echo "unknown option $a" >&2; exit 2 ;;
            *) OUT=$a ;;
        esac
    done
    OUT=${OUT:-$ROOT/target/scenarios/$name}
    mkdir -p "$OUT"
    OUT=$(cd "$OUT" && pwd)
    for bin in "$TANDEM_BIN" "$LOADTEST_BIN"; do
        [ -x "$bin" ] || { echo "$bin not found: cargo build --release -p tandem-cli -p tandem-loadtest --bins (or set TANDEM_BIN / LOADTEST_BIN)" >&2; exit 1; }
    done
    command -v jq >/dev/null || { echo "jq is needed to summarize the reports" >&2; exit 1; }
}

log() { printf '==> %s\n' "$*" >&2; }

# demo_split: the demo model's split directory (SPLIT, default models/demo-split-k1), made
# from the GGUF with `tandem split` when missing.
demo_split() {
    local split=${SPLIT:-$ROOT/models/demo-split-k1}
    if [ ! -f "$split/cloud/manifest.json" ] || [ ! -f "$split/edge/manifest.json" ]; then
        local gguf=$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf
        [ -f "$gguf" ] || { echo "no split at $split and no $gguf: run scripts/fetch-demo-model.sh" >&2; exit 1; }
        log "splitting the demo model into $split"
        "$TANDEM_BIN" split --model "$gguf" --edge-layers 1 --out "$split" --force >&2
    fi
    echo "$split"
}

# tiny_split DIR: a tiny random model and its split under DIR (kept when present).
tiny_split() {
    local dir=$1
    if [ ! -f "$dir/cloud/manifest.json" ]; then
        "$LOADTEST_BIN" tiny-model --out "$dir" --force --context "${TINY_CONTEXT:-2048}" >&2
    fi
    echo "$dir"
}

SERVER_PID=""
# start_server NAME [serve flags...]: starts `tandem serve` on LISTEN (default
# 127.0.0.1:0) with its operator listener on ADMIN_LISTEN (default 127.0.0.1:0), logs to
# $OUT/NAME.server.{out,err}; sets SERVER_PID, WS_URL, HTTP_URL, ADMIN_URL, METRICS_URL
# (on the operator listener), SERVER_ADDR.
start_server() {
    local name=$1
    shift
    local out="$OUT/$name.server.out" err="$OUT/$name.server.err"
    # Every simulated device connects from 127.0.0.1: lift the per-address connection cap.
    "$TANDEM_BIN" serve --listen "${LISTEN:-127.0.0.1:0}" \
        --admin-listen "${ADMIN_LISTEN:-127.0.0.1:0}" --max-connections-per-ip 100000 \
        "$@" >"$out" 2>"$err" &
    SERVER_PID=$!
    WS_URL=""
    for _ in $(seq 1 1200); do
        WS_URL=$(sed -n 's/^listening on \(ws:\/\/[^ ]*\).*/\1/p' "$out" | head -n1)
        [ -n "$WS_URL" ] && break
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            tail -n 20 "$err" >&2
            echo "the server exited before listening" >&2
            exit 1
        fi
        sleep 0.1
    done
    [ -n "$WS_URL" ] || { tail -n 20 "$err" >&2; echo "the server did not start in 120 s" >&2; exit 1; }
    SERVER_ADDR=${WS_URL#ws://}
    SERVER_ADDR=${SERVER_ADDR%%/*}
    HTTP_URL="http://$SERVER_ADDR"
    # The server prints both lines at once: `admin on http://HOST:PORT` follows.
    ADMIN_URL=$(sed -n 's/^admin on \(http:\/\/[^ ]*\).*/\1/p' "$out" | head -n1)
    METRICS_URL="$ADMIN_URL/metrics"
    log "server $SERVER_PID: $WS_URL"
}

# stop_server: SIGINT (graceful), then wait.
stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -INT "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}

# kill_server: SIGKILL, no drain.
kill_server() {
    if [ -n "$SERVER_PID" ]; then
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}

RSS_PID=""
# sample_rss PID FILE: appends "seconds_since_start rss_kib" once a second while PID lives.
sample_rss() {
    local pid=$1 file=$2
    echo "t_s rss_kib" >"$file"
    (
        start=$(date +%s.%N)
        while kill -0 "$pid" 2>/dev/null; do
            rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
            [ -n "$rss" ] && awk -v a="$(date +%s.%N)" -v b="$start" -v r="$rss" \
                'BEGIN { printf "%.1f %s\n", a - b, r }' >>"$file"
            sleep 1
        done
    ) &
    RSS_PID=$!
}

stop_rss() {
    if [ -n "$RSS_PID" ]; then
        kill "$RSS_PID" 2>/dev/null || true
        wait "$RSS_PID" 2>/dev/null || true
    fi
    RSS_PID=""
}

# scrape FILE: the server's /metrics into FILE (best effort).
scrape() {
    curl -fsS "$METRICS_URL" -o "$1" 2>/dev/null || echo "# scrape failed" >"$1"
}

cleanup() {
    stop_rss
    stop_server
}
trap cleanup EXIT

# summarize LABEL REPORT.json: one line of the report's headline numbers.
summarize() {
    jq -r --arg name "$1" '
        def p(x): if x == null then "-" else (x | tostring) end;
        "\($name): devices \(.counts.devices), completed \(.counts.completed), failed \(.counts.failed), cut \(.counts.cut_by_deadline), "
        + "out \(.throughput.output_tokens_per_s) tok/s, TTFT p50 \(p(.latency_ms.ttft.p50)) p99 \(p(.latency_ms.ttft.p99)) ms, "
        + "TPOT p50 \(p(.latency_ms.tpot.p50)) p99 \(p(.latency_ms.tpot.p99)) ms, "
        + "reconnects \(.resume.reconnects), replays \(.resume.replays), lost \(.resume.lost), errors \(.errors | tojson)"
    ' "$2"
}
