#!/usr/bin/env bash
# Runs every test of the workspace, offline. The demo-model tests run when
# models/SmolLM2-135M-Instruct.Q4_1.gguf is present (scripts/fetch-demo-model.sh) and skip
# otherwise, unless TANDEM_REQUIRE_DEMO=1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo test --workspace "$@"
