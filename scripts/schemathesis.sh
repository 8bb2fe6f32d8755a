#!/usr/bin/env bash
# Runs Schemathesis (PyPI, pinned) against a live `tandem serve`'s /openapi.json: every
# operation with generated valid and invalid requests under each route's own credentials
# (admin key, a partner key, a device token), a fixed seed and a bounded number of examples.
# Fails on any 5xx and on any response that does not match the spec (status, content type,
# body schema, headers).
#
# Needs: the demo model (scripts/fetch-demo-model.sh), python3 with venv, PyPI. Without the
# model or python it skips with a message, unless TANDEM_REQUIRE_SCHEMATHESIS=1.
# Environment: TANDEM_SCHEMATHESIS_EXAMPLES (default 25), TANDEM_SCHEMATHESIS_SEED (default 1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
version=4.32.5
examples="${TANDEM_SCHEMATHESIS_EXAMPLES:-25}"
seed="${TANDEM_SCHEMATHESIS_SEED:-1}"
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
work=target/schemathesis
venv=target/schemathesis-venv

skip() {
    if [ "${TANDEM_REQUIRE_SCHEMATHESIS:-0}" = 1 ]; then
        echo "schemathesis: $1 (TANDEM_REQUIRE_SCHEMATHESIS=1)" >&2
        exit 1
    fi
    printf '\n*** SKIPPED: schemathesis did not run: %s ***\n\n' "$1" >&2
    exit 0
}

[ -f "$model" ] || skip "the demo model is missing (scripts/fetch-demo-model.sh)"
command -v python3 >/dev/null || skip "python3 is missing"
if ! "$venv/bin/st" --version 2>/dev/null | grep -q "$version"; then
    echo "schemathesis: installing schemathesis==$version into $venv" >&2
    python3 -m venv "$venv" || skip "python3 -m venv failed"
    "$venv/bin/pip" install -q "schemathesis==$version" >&2
fi

# The same build as the test run (`cargo test --workspace` unifies features across the
# workspace's dev-dependencies; a plain `cargo build -p tandem-serve` would not, and would
# compile candle and the rest a second time).
echo "schemathesis: building tandem (the test build)" >&2
cargo test -q --workspace --no-run >/dev/null 2>&1 || cargo test -q --workspace --no-run
tandem=target/debug/tandem
mkdir -p "$work"
if [ ! -f "$work/split/cloud/manifest.json" ]; then
    "$tandem" split --model "$model" --edge-layers 1 --out "$work/split" --force >/dev/null
fi

admin_key="schemathesis-admin-key-$(date +%s%N)"
log="$work/serve.log"
TANDEM_ADMIN_KEY="$admin_key" "$tandem" serve --cloud "$work/split/cloud" --listen 127.0.0.1:0 \
    --admin-listen 127.0.0.1:0 --kv-cache-gib 0.05 \
    --device-token-key "schemathesis-device-token-key-0123456789" \
    --partner-requests-per-minute 1000000 --device-requests-per-minute 1000000 \
    >"$log" 2>"$log.err" &
server=$!
trap 'kill -INT $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
addr=""
for _ in $(seq 1 600); do
    addr=$(sed -n 's/^listening on ws:\/\/\([^/]*\)\/.*/\1/p' "$log" | head -n1)
    [ -n "$addr" ] && break
    kill -0 "$server" 2>/dev/null || { cat "$log.err" >&2; echo "schemathesis: the server exited" >&2; exit 1; }
    sleep 0.1
done
[ -n "$addr" ] || { echo "schemathesis: the server did not start" >&2; exit 1; }
base="http://$addr"
ops=$(sed -n 's/^admin on \(http:\/\/[^ ]*\).*/\1/p' "$log" | head -n1)
[ -n "$ops" ] || { echo "schemathesis: the server named no operator listener" >&2; exit 1; }
echo "schemathesis: server at $base" >&2

# Credentials for each security scheme, made through `tandem admin` (which this also tests).
admin() { TANDEM_ADMIN_KEY="$admin_key" "$tandem" admin --admin-url "$ops" "$@"; }
json_field() { python3 -c "import json,sys; print(json.load(sys.stdin)[sys.argv[1]])" "$1"; }
tenant=$(admin tenant create "Schemathesis $(date +%s%N)" --prompts-per-minute 100000 \
    --tokens-per-day 1000000000000 --max-audience 1000 | json_field id)
partner_key=$(admin key issue "$tenant" | json_field key)
device_token=$(admin device-token issue st-user | json_field token)

cat >"$work/schemathesis.toml" <<TOML
[auth.openapi.admin_key]
bearer = "\${TANDEM_ST_ADMIN}"
[auth.openapi.partner_key]
bearer = "\${TANDEM_ST_PARTNER}"
[auth.openapi.device_token]
bearer = "\${TANDEM_ST_DEVICE}"
TOML

echo "schemathesis: $examples examples per operation, seed $seed" >&2
TANDEM_ST_ADMIN="$admin_key" TANDEM_ST_PARTNER="$partner_key" TANDEM_ST_DEVICE="$device_token" \
"$venv/bin/st" --config-file "$work/schemathesis.toml" run "$base/openapi.json" \
    --seed "$seed" \
    --max-examples "$examples" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
    --request-timeout 30 \
    --no-color
echo "schemathesis: passed" >&2
