// Paged attention on a CUDA GPU for the cloud's engine step (kvcache/src/cuda.rs).
//
// One launch of `write_kv_*` stores the step's new keys and values into their cache slots;
// one launch of `paged_attention_*` then computes causal attention for every query row of
// the varlen batch (prefill chunks and decode rows alike), reading K/V straight from the
// blocks named by each sequence's block table. Nothing is gathered per sequence.
//
// Layout (the same as the CPU cache, kvcache/src/storage.rs): per layer, K and V are
// `[num_blocks * block_size, kv_heads * head_dim]`; slot `block * block_size + pos % block_size`
// holds position `pos`. Query row r of the batch belongs to sequence `row_seq[r]` and sits at
// position `row_pos[r]`: it sees keys 0..=row_pos[r] (its own chunk's earlier rows included,
// written by write_kv before this launch).
//
// Grid (rows, kv_heads); one warp per query head of the kv head's group (GQA), so the K/V rows
// a group shares are read once per block from L1. Per warp: an online softmax over the keys in
// order, in f32, with each lane holding head_dim / 32 elements of q and of the accumulator.
// Correctness first: the reference is the CPU engine (scripts/gpu-check.sh compares them).
#include <cuda_bf16.h>
#include <stdint.h>

#define MAX_PER_LANE 8 // head_dim up to 256

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename T>
__device__ void write_kv(const T* __restrict__ k_new, const T* __restrict__ v_new,
                         const int64_t* __restrict__ slots, T* __restrict__ k_cache,
                         T* __restrict__ v_cache, int row_elems) {
    const int r = blockIdx.x;
    const int64_t dst = slots[r] * row_elems;
    const int64_t src = (int64_t)r * row_elems;
    for (int i = threadIdx.x; i < row_elems; i += blockDim.x) {
        k_cache[dst + i] = k_new[src + i];
        v_cache[dst + i] = v_new[src + i];
    }
}

template <typename T>
__device__ void paged_attention(T* __restrict__ out, const T* __restrict__ q,
                                const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                const int* __restrict__ row_seq, const int* __restrict__ row_pos,
                                const int* __restrict__ tables, int max_blocks, int block_size,
                                int heads, int kv_heads, int head_dim, float scale) {
    const int r = blockIdx.x;
    const int g = blockIdx.y;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int group = heads / kv_heads;
    if (warp >= group) return;
    const int h = g * group + warp;
    const int row_elems = kv_heads * head_dim;

    const T* qrow = q + ((int64_t)r * heads + h) * head_dim;
    float qv[MAX_PER_LANE], acc[MAX_PER_LANE];
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; ++i) {
        const int d = lane + 32 * i;
        qv[i] = d < head_dim ? to_f32(qrow[d]) * scale : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -INFINITY;
    float l = 0.0f;
    const int pos = row_pos[r];
    const int* table = tables + (int64_t)row_seq[r] * max_blocks;
    for (int j = 0; j <= pos; ++j) {
        const int64_t slot = (int64_t)table[j / block_size] * block_size + j % block_size;
        const T* krow = k_cache + slot * row_elems + (int64_t)g * head_dim;
        const T* vrow = v_cache + slot * row_elems + (int64_t)g * head_dim;
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; ++i) {
            const int d = lane + 32 * i;
            if (d < head_dim) s += qv[i] * to_f32(krow[d]);
        }
        s = warp_sum(s);
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new); // 0 for the first key (m = -inf)
        const float p = expf(s - m_new);
        l = l * corr + p;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; ++i) {
            const int d = lane + 32 * i;
            if (d < head_dim) acc[i] = acc[i] * corr + p * to_f32(vrow[d]);
        }
        m = m_new;
    }
    T* orow = out + ((int64_t)r * heads + h) * head_dim;
    const float inv = 1.0f / l;
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; ++i) {
        const int d = lane + 32 * i;
        if (d < head_dim) orow[d] = from_f32<T>(acc[i] * inv);
    }
}

#define INSTANTIATE(T, SUFFIX)                                                                 \
    extern "C" __global__ void write_kv_##SUFFIX(const T* k_new, const T* v_new,               \
                                                 const int64_t* slots, T* k_cache, T* v_cache, \
                                                 int row_elems) {                              \
        write_kv<T>(k_new, v_new, slots, k_cache, v_cache, row_elems);                         \
    }                                                                                          \
    extern "C" __global__ void paged_attention_##SUFFIX(                                       \
        T* out, const T* q, const T* k_cache, const T* v_cache, const int* row_seq,            \
        const int* row_pos, const int* tables, int max_blocks, int block_size, int heads,      \
        int kv_heads, int head_dim, float scale) {                                             \
        paged_attention<T>(out, q, k_cache, v_cache, row_seq, row_pos, tables, max_blocks,     \
                           block_size, heads, kv_heads, head_dim, scale);                      \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
