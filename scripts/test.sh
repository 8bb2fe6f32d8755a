#!/usr/bin/env bash
# Runs every test of the workspace, offline.
# - The Redis tests start their own redis-server on free ports; this script installs the
#   package when it is missing (scripts/install-deps.sh). Without it they skip with a loud
#   message, unless TANDEM_REQUIRE_REDIS=1.
# - The demo-model tests run when models/SmolLM2-135M-Instruct.Q4_1.gguf is present
#   (scripts/fetch-demo-model.sh) and skip otherwise, unless TANDEM_REQUIRE_DEMO=1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/install-deps.sh || echo "test.sh: continuing without redis-server (its tests will skip)" >&2
cargo test --workspace "$@"
