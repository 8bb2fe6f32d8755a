#!/usr/bin/env bash
# Installs the official `openai` Python package (PyPI, pinned) into target/openai-venv for
# the tests that drive tandem-edge's OpenAI-compatible endpoint with it
# (edge-client/tests/openai_sdk.rs finds the venv there, or takes TANDEM_OPENAI_PYTHON).
#
# Needs python3 with venv and PyPI. Without them it says so and exits 0 (the tests then
# skip loudly), unless TANDEM_REQUIRE_OPENAI=1: then it fails, as the tests do.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
version=3.51.0
venv=target/openai-venv

skip() {
    if [ "${TANDEM_REQUIRE_OPENAI:-0}" = 1 ]; then
        echo "openai-sdk: $1 (TANDEM_REQUIRE_OPENAI=1)" >&2
        exit 1
    fi
    printf '\n*** openai-sdk: not installed: %s; the OpenAI SDK tests will skip ***\n\n' "$1" >&2
    exit 0
}

if "$venv/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$version')" 2>/dev/null; then
    exit 0
fi
command -v python3 >/dev/null || skip "python3 is missing"
echo "openai-sdk: installing openai==$version into $venv" >&2
python3 -m venv "$venv" || skip "python3 -m venv failed"
"$venv/bin/pip" install -q --disable-pip-version-check "openai==$version" >&2 \
    || skip "pip install openai==$version failed"
"$venv/bin/python" -c "import openai; print('openai-sdk: openai', openai.__version__)" >&2
