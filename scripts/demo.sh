#!/usr/bin/env bash
# The main job end to end on embedded defaults: fetch the demo model (SmolLM2-135M-Instruct),
# split it after layer 1, start `tandem serve` (in-memory session store) on a free loopback
# port, run `tandem-edge run` with the sample profile and the gift-recommendation prompt over
# a real WebSocket (gift-prompt-short.txt: the 135M demo model follows a short prompt best;
# gift-prompt.txt is the full template, with redactions), print the recommendations and the transparency record, stop the server.
#
# Environment: TANDEM_DEMO_EDGE_LAYERS (default 1), TANDEM_DEMO_MAX_TOKENS (default 160),
# TANDEM_DEMO_DTYPE (wire dtype, default f16).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
k="${TANDEM_DEMO_EDGE_LAYERS:-1}"
max_tokens="${TANDEM_DEMO_MAX_TOKENS:-160}"
dtype="${TANDEM_DEMO_DTYPE:-f16}"
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
split="models/demo-split-k${k}"

step() { printf '\n==> %s\n' "$*" >&2; }

step "1/5 demo model"
scripts/fetch-demo-model.sh

step "2/5 building tandem and tandem-edge (release; the first build takes several minutes)"
# Swagger UI's assets are built into the server for its /docs page (npm registry, pinned);
# without npm the server still builds and /docs says how to add them.
scripts/fetch-swagger-ui.sh || echo "demo: continuing without Swagger UI (/docs answers 503)" >&2
cargo build --release -q -p tandem-cli -p tandem-edge --bins

if [ ! -f "$split/cloud/manifest.json" ] || [ ! -f "$split/edge/manifest.json" ]; then
    step "3/5 splitting the model after layer $k into $split/"
    target/release/tandem split --model "$model" --edge-layers "$k" --out "$split" --force
else
    step "3/5 using the split in $split/"
fi

step "4/5 starting tandem serve (in-memory session store)"
log=$(mktemp)
# --dtype auto: bf16 weights and KV on the AMX / AVX512-BF16 kernels where the CPU has them.
target/release/tandem serve --cloud "$split/cloud" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --dtype auto >"$log" 2>"$log.err" &
server=$!
cleanup() {
    kill -INT "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    rm -f "$log" "$log.err"
}
trap cleanup EXIT
url=""
for _ in $(seq 1 600); do
    url=$(sed -n 's/^listening on \(ws:\/\/[^ ]*\).*/\1/p' "$log" | head -n1)
    [ -n "$url" ] && break
    if ! kill -0 "$server" 2>/dev/null; then
        cat "$log.err" >&2
        echo "demo: the server exited before listening" >&2
        exit 1
    fi
    sleep 0.1
done
[ -n "$url" ] || { cat "$log.err" >&2; echo "demo: the server did not start in 60 s" >&2; exit 1; }
echo "server: $url" >&2

step "5/5 tandem-edge run: examples/profile.json + examples/gift-prompt-short.txt"
target/release/tandem-edge run \
    --edge "$split/edge" \
    --server "$url" \
    --profile examples/profile.json \
    --prompt-file examples/gift-prompt-short.txt \
    --system "$(cat examples/system-prompt.txt)" \
    --max-tokens "$max_tokens" \
    --dtype "$dtype" \
    --show-transparency
