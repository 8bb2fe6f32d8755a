#!/usr/bin/env bash
# Builds the GPU path (`--features cuda`) on a machine without a GPU, as CI does, and lints it:
#   scripts/build-cuda.sh              # → target/gpu/tandem.gz, ready for scripts/gpu-check.sh
#   scripts/build-cuda.sh --lint-only  # clippy only (type-checks, runs the nvcc build scripts;
#                                      # no code generation): what CI runs, about half the time
# The stripped binary is about 70 MB (candle's CUDA kernels are in it), more than the 64 MiB a
# device call carries; gzipped it is about 20 MB, and gpu-check.sh unpacks it.
# The toolkit comes from PyPI (scripts/install-cuda.sh). CUDA_COMPUTE_CAP (default 90) picks
# the GPU generation candle's kernels and ours are compiled for. The build and clippy share
# the release profile, so candle's CUDA kernels (most of the time here) compile once.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/install-cuda.sh
# shellcheck source=/dev/null
source target/cuda-venv/env.sh
# The crates with CUDA code of their own (the engine's GPU KV cache, the server's device
# option) and the binary; clippy lints the packages named, and the feature reaches the rest.
lint_packages=(-p tandem-cli -p tandem-serve -p tandem-engine -p tandem-kvcache -p tandem-model)
if [[ "${1:-}" == --lint-only ]]; then
    t0=$(date +%s)
    cargo clippy --release --locked "${lint_packages[@]}" --features tandem-cli/cuda -- -D warnings
    echo "build-cuda: clippy --features cuda clean in $(($(date +%s) - t0))s (CUDA $(nvcc --version | grep -oE 'release [0-9.]+'), sm_${CUDA_COMPUTE_CAP})"
    exit 0
fi
t0=$(date +%s)
cargo build --release --locked -p tandem-cli --features cuda
t1=$(date +%s)
cargo clippy --release --locked "${lint_packages[@]}" --features tandem-cli/cuda -- -D warnings
t2=$(date +%s)
rm -rf target/gpu && mkdir -p target/gpu
strip -o target/gpu-tandem target/release/tandem
gzip -c target/gpu-tandem >target/gpu/tandem.gz
echo "build-cuda: build $((t1 - t0))s, clippy $((t2 - t1))s; stripped $(du -h target/gpu-tandem | cut -f1), target/gpu/tandem.gz $(du -h target/gpu/tandem.gz | cut -f1) (CUDA $(nvcc --version | grep -oE 'release [0-9.]+'), sm_${CUDA_COMPUTE_CAP})"
ldd target/gpu-tandem | grep -E 'libcu|libnvrtc' || true
rm -f target/gpu-tandem
