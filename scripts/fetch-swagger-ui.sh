#!/usr/bin/env bash
# Fetches Swagger UI's distribution (the npm package swagger-ui-dist, pinned, integrity
# checked) into openapi/swagger-ui/, where the build of tandem-serve picks it up to serve the
# interactive API page at /docs from inside the binary. Without it, /docs answers 503 and
# says to run this script. Nothing is fetched at build or run time. Safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
version=5.35.0
integrity="sha512-U06rpMtW9V3XPGOBeamTUSr0Z09jMX4IJuANpE/EZbAhw0G8CgwrzU4YmXkn/h0wCDNsXdGarTNNHC3sU8yVUQ=="
dest=openapi/swagger-ui
files=(swagger-ui-bundle.js swagger-ui.css LICENSE)
if [ -f "$dest/VERSION" ] && [ "$(cat "$dest/VERSION")" = "$version" ]; then
    exit 0
fi
command -v npm >/dev/null || { echo "fetch-swagger-ui: npm is needed (apt-get install npm)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetch-swagger-ui: swagger-ui-dist@$version from the npm registry" >&2
(cd "$tmp" && npm pack --silent "swagger-ui-dist@$version" >/dev/null 2>&1)
tgz="$tmp/swagger-ui-dist-$version.tgz"
[ -f "$tgz" ] || { echo "fetch-swagger-ui: npm pack did not produce $tgz" >&2; exit 1; }
got="sha512-$(openssl dgst -sha512 -binary "$tgz" | base64 -w0)"
if [ "$got" != "$integrity" ]; then
    echo "fetch-swagger-ui: integrity mismatch: $got" >&2
    exit 1
fi
tar -xzf "$tgz" -C "$tmp"
mkdir -p "$dest"
for f in "${files[@]}"; do
    cp "$tmp/package/$f" "$dest/$f"
done
echo "$version" >"$dest/VERSION"
echo "fetch-swagger-ui: $(du -sh "$dest" | cut -f1) in $dest" >&2
