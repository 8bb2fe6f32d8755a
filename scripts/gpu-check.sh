#!/usr/bin/env bash
# The GPU path checked and measured on a lent GPU machine, in one command, offline.
#
# Here (no GPU needed):
#   scripts/install-cuda.sh && source target/cuda-venv/env.sh
#   cargo build --release -p tandem-cli --features cuda
#   (or all three: scripts/build-cuda.sh, which leaves target/gpu/tandem.gz)
# There (the device tool carries target/gpu; the machine has CUDA 13 and its libraries in
# Python's site-packages, no Rust and no network):
#   scripts/gpu-check.sh                # writes $OUT/gpu-check.json and $OUT/gpu-check.log
#
# Steps, sized to finish in under 8 minutes on one H200:
#   1. the machine: nvidia-smi, and (when PyTorch is there) the measured device-to-device
#      copy bandwidth and bf16 matrix-product peak, the ceilings for step 4;
#   2. a tiny random model, and `tandem device-check` on it: the GPU against the CPU in f32
#      (logits within the tolerance, every greedy token identical over 32 steps, batched
#      equals solo, the engine end to end) and in bf16 (agreement reported);
#   3. an 8B-shaped random bf16 checkpoint (`tandem random-model --shape llama-3.1-8b`);
#   4. `tandem bench --device cuda` on it at 1, 16, 64 and 256 sessions, with a 2,048-token
#      prefill; figures against the ceilings of step 1.
# GPU_CHECK_PROFILE=1 skips the tiny-model checks and the plain bench and shows where an 8B
# step's time goes instead (profile-*.log and .json in $OUT).
# TANDEM_BIN names the binary (default target/gpu/tandem, or target/gpu/tandem.gz unpacked);
# GPU_CHECK_SKIP_8B=1 stops after
# step 2; WORK is where the models go (default a temporary directory); GPU_CHECK_DEVICE=cpu
# runs the same steps on the CPU (a dry run of this script where there is no GPU).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out=${OUT:-target/gpu-check}
mkdir -p "$out"
log="$out/gpu-check.log"
json="$out/gpu-check.json"
device=${GPU_CHECK_DEVICE:-cuda}
work=${WORK:-$(mktemp -d)}
bin=${TANDEM_BIN:-target/gpu/tandem}
if [[ -z "${TANDEM_BIN:-}" && ! -x "$bin" && -f target/gpu/tandem.gz ]]; then
    bin="$work/tandem"
    gunzip -c target/gpu/tandem.gz >"$bin" && chmod +x "$bin"
fi
exec > >(tee -a "$log") 2>&1
started=$(date +%s)
say() { echo "== [$(($(date +%s) - started))s] $*"; }

[[ -x "$bin" ]] || { echo "gpu-check: no binary at $bin (build it with --features cuda, see the top of this script)"; exit 2; }

# CUDA's libraries (cuBLAS, cuRAND, NVRTC, the runtime) live in Python's site-packages there.
libs=$(python3 - <<'EOF' 2>/dev/null
import glob, os, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()] + sys.path)
dirs = sorted({d for r in roots if r and os.path.isdir(r) for d in glob.glob(os.path.join(r, "nvidia", "*", "lib"))})
print(":".join(dirs))
EOF
)
# The driver's own library (libcuda.so.1) sits under /usr/local/nvidia there, a read-only mount.
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
    [[ -d $d ]] && libs="${libs:+$libs:}$d"
done
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

say "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
nproc; grep -m1 'model name' /proc/cpuinfo || true
# The devices' edge layers run on this machine's CPU in bf16 during the bench; without
# AVX512-BF16 or AMX their portable loop is slow, so the bench then stops at 64 sessions.
sessions=1,16,64,256
if ! grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo; then
    echo "gpu-check: no AVX512-BF16/AMX on this CPU: bench sessions 1,16,64 only"
    sessions=1,16,64
fi
missing=$(ldd "$bin" | grep 'not found' || true)
if [[ -n "$missing" ]]; then
    echo "gpu-check: the binary misses libraries:"; echo "$missing"; exit 3
fi

say "ceilings (PyTorch: device-to-device copy, bf16 8192^3 matrix product)"
ceilings=$(python3 - <<'EOF' 2>/dev/null || echo '{}'
import json, torch
d = torch.device("cuda")
n = 1 << 30  # 1 GiB each way
a = torch.empty(n, dtype=torch.uint8, device=d); b = torch.empty_like(a)
for _ in range(3): b.copy_(a)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
torch.cuda.synchronize(); s.record()
for _ in range(20): b.copy_(a)
e.record(); torch.cuda.synchronize()
copy_gbs = 2 * n * 20 / (s.elapsed_time(e) / 1e3) / 1e9  # bytes read + written
m = 8192
x = torch.randn(m, m, dtype=torch.bfloat16, device=d); y = torch.randn_like(x)
for _ in range(3): x @ y
torch.cuda.synchronize(); s.record()
for _ in range(10): x @ y
e.record(); torch.cuda.synchronize()
tflops = 2 * m**3 * 10 / (s.elapsed_time(e) / 1e3) / 1e12
print(json.dumps({"copy_gb_per_s": copy_gbs, "bf16_matmul_tflops": tflops, "gpu": torch.cuda.get_device_name(0)}))
EOF
)
echo "$ceilings"

profile=${GPU_CHECK_PROFILE:-0}
check_f32='{}' check_bf16='{}' rc_f32=0 rc_bf16=0
if [[ $profile != 1 ]]; then
    say "tiny model: GPU against CPU"
    "$bin" random-model --shape tiny --out "$work/tiny" --force
    check_f32=$("$bin" device-check --model "$work/tiny" --edge-layers 1 --device "$device" --dtype f32 --sessions 8 --steps 32)
    rc_f32=$?
    echo "$check_f32"
    check_bf16=$("$bin" device-check --model "$work/tiny" --edge-layers 1 --device "$device" --dtype bf16 --sessions 8 --steps 32)
    rc_bf16=$?
    echo "$check_bf16"
fi

bench='{}'
if [[ "${GPU_CHECK_SKIP_8B:-0}" != 1 && $rc_f32 -le 1 ]]; then
    say "8B-shaped bf16 checkpoint"
    "$bin" random-model --shape llama-3.1-8b --out "$work/8b" --force
fi
if [[ "${GPU_CHECK_SKIP_8B:-0}" != 1 && $rc_f32 -le 1 && $profile != 1 ]]; then
    say "tandem bench --device cuda on the 8B shape"
    bench=$("$bin" bench --model "$work/8b" --edge-layers 1 --device "$device" --dtype bf16 \
        --sessions "$sessions" --prompt-tokens 64 --gen-tokens 32 --prefill-tokens 2048 \
        --kv-cache-gib 24 --mixed-decoders 0 --prefix-sessions 0 --decode-wait-ms 0) || bench='{}'
    echo "$bench"
fi

if [[ $profile == 1 && -d "$work/8b" ]]; then
    # Where a step's time goes: per step, the layers (synchronised), the LM head and the
    # logits' copy to the host, sampling and delivery (RUST_LOG=...=debug); at trace level
    # also the attention calls alone (each synchronised, so that run is slower overall).
    # Then the same bench with 2,048-token batches (chunked prefill in larger chunks).
    prof=(bench --model "$work/8b" --edge-layers 1 --device "$device" --dtype bf16 \
        --prompt-tokens 64 --gen-tokens 32 --kv-cache-gib 24 --mixed-decoders 0 \
        --prefix-sessions 0 --decode-wait-ms 0)
    say "profile: step phases at 1, 64 and 256 sessions"
    RUST_LOG=tandem_engine=debug "$bin" "${prof[@]}" --sessions 1,64,256 \
        --prefill-tokens 2048 >"$out/profile-phases.json" 2>"$out/profile-phases.log"
    grep 'engine step phases' "$out/profile-phases.log" | awk 'NR % 8 == 1' | cut -c1-400 | tail -40
    say "profile: attention alone at 64 sessions"
    RUST_LOG=tandem_engine=trace "$bin" "${prof[@]}" --sessions 64 \
        --prefill-tokens 256 >"$out/profile-attention.json" 2>"$out/profile-attention.log"
    grep 'engine step phases' "$out/profile-attention.log" | tail -5 | cut -c1-400
    say "profile: --max-batch-tokens 2048"
    "$bin" "${prof[@]}" --sessions 1,64,256 --prefill-tokens 2048 --max-batch-tokens 2048 \
        >"$out/profile-batch2048.json" 2>"$out/profile-batch2048.log"
    grep -E 'prefill:|sessions:' "$out/profile-batch2048.log"
fi

say "summary"
python3 - "$json" <<EOF
import json, sys
def load(s):
    try: return json.loads(s)
    except Exception: return None
ceil = load('''$ceilings''') or {}
bench = load('''$bench''') or {}
report = {
    "ceilings": ceil,
    "device_check_f32": load('''$check_f32'''),
    "device_check_bf16": load('''$check_bf16'''),
    "bench_8b": bench,
}
# Decode at 1 session reads every weight once per token: its roofline is the measured copy
# rate (bytes read + written per second) over the weights' bytes.
wb, bw, peak = bench.get("cloud_weight_bytes"), ceil.get("copy_gb_per_s"), ceil.get("bf16_matmul_tflops")
params = bench.get("matmul_params_per_row")
rows = []
for d in bench.get("decode", []):
    row = {"sessions": d["sessions"], "decode_tokens_per_s": d["decode_tokens_per_s"]}
    if wb and bw and d["sessions"] == 1:
        roof = bw * 1e9 / wb
        row["roofline_tokens_per_s"] = roof
        row["fraction_of_hbm_roofline"] = d["decode_tokens_per_s"] / roof
    if params and peak:
        row["mfu"] = 2 * params * d["decode_tokens_per_s"] / (peak * 1e12)
    rows.append(row)
report["decode_8b"] = rows
pf = bench.get("prefill")
if pf and params and peak:
    report["prefill_8b"] = dict(pf, fraction_of_bf16_peak=2 * params * pf["prefill_tokens_per_s"] / (peak * 1e12))
print(json.dumps(report, indent=2))
json.dump(report, open(sys.argv[1], "w"), indent=2)
EOF
say "done"
[[ $rc_f32 -eq 0 ]]
