#!/usr/bin/env bash
# Runs every test of the workspace, then the checks against a live server and the deployment
# files. Offline except for the package registries (apt, npm, PyPI) that the set-up steps use.
# - The Redis tests start their own redis-server on free ports; this script installs the
#   package when it is missing (scripts/install-deps.sh). Without it they skip with a loud
#   message, unless TANDEM_REQUIRE_REDIS=1.
# - The demo-model tests run when models/SmolLM2-135M-Instruct.Q4_1.gguf is present
#   (scripts/fetch-demo-model.sh) and skip otherwise, unless TANDEM_REQUIRE_DEMO=1.
# - Swagger UI's assets (scripts/fetch-swagger-ui.sh, from npm) are built into the server
#   for /docs; without them /docs answers 503 and its test checks that, unless
#   TANDEM_REQUIRE_SWAGGER_UI=1.
# - The OpenAI SDK test (edge-client/tests/openai_sdk.rs) drives tandem-edge's OpenAI endpoint
#   with the official `openai` Python package, which scripts/openai-sdk.sh installs (PyPI,
#   pinned) into target/openai-venv; without it (or the demo model) the test skips loudly,
#   unless TANDEM_REQUIRE_OPENAI=1.
# - scripts/schemathesis.sh fuzzes the live REST API against its OpenAPI document (needs the
#   demo model and PyPI; skips otherwise unless TANDEM_REQUIRE_SCHEMATHESIS=1).
# - The bf16 model tests run once more per other bf16 kernel (TANDEM_BF16_KERNEL=avx512bf16,
#   avx2, portable, each where the CPU has it); TANDEM_REQUIRE_AMX=1 makes the kernel tests fail when AMX or AVX512-BF16 is
#   missing.
# - scripts/validate-deploy.sh validates deploy/ (Kubernetes schemas, compose, Dockerfiles,
#   the Grafana dashboard's metric names) with validators from PyPI.
# Arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/install-deps.sh || echo "test.sh: continuing without redis-server (its tests will skip)" >&2
scripts/fetch-swagger-ui.sh || echo "test.sh: continuing without Swagger UI (/docs answers 503)" >&2
scripts/openai-sdk.sh
cargo test --workspace "$@"
# The bf16 model tests again on each other bf16 kernel this CPU has (the first run used the
# best one): TANDEM_BF16_KERNEL forces a kernel, and refuses one the CPU lacks.
for kernel in avx512bf16 avx2 portable; do
    if [[ "$kernel" == portable ]] || grep -qw "${kernel/avx512bf16/avx512_bf16}" /proc/cpuinfo 2>/dev/null; then
        echo "== bf16 model tests on the $kernel kernel" >&2
        TANDEM_BF16_KERNEL=$kernel cargo test --workspace --test split_equals_whole -- bf16
    fi
done
echo "== schemathesis against a live server" >&2
scripts/schemathesis.sh
echo "== deployment files" >&2
scripts/validate-deploy.sh
