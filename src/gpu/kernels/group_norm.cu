// Group normalisation over NCHW (any rank >= 2: [B, C, ...]), forward with the per-(n, group)
// statistics kept in f32 and backward from them, each optionally followed by SiLU (the resnet
// block's norm -> SiLU). src/gpu/mod.rs launches these; the CPU versions are group_norm_cpu /
// group_norm_backward_cpu in src/model/layers/group_norm.rs, whose arithmetic this follows.
//
// A group is contiguous in NCHW: cpg = C/G channels of hw values each, n = cpg * hw values.
// At batch 1 there are only 32 groups, so each group is split into `chunks` chunks of
// `chunk_len` values, one block per (group, chunk): grid = B*G*chunks blocks, blockIdx.x =
// group * chunks + chunk. The reductions are two-pass, not atomics: a first kernel writes one
// partial result per block to an f32 workspace, and every block of the second kernel combines
// its group's partials (at most 128, serially in thread 0) before its elementwise pass. This
// keeps the results deterministic (atomics in f32 add in a run-dependent order) and needs no
// zeroed workspace (no memset launch); the second read of x mostly hits L2.
//
//   stats:    per chunk, its mean m_i and M2_i = sum((x - m_i)^2) (two passes over the chunk);
//             combined (Chan et al.): mean = sum(n_i m_i)/n,
//             var = sum(M2_i + n_i (m_i - mean)^2)/n (biased, as torch), rstd = 1/sqrt(var+eps).
//   fwd:      y = x * scale + shift, scale = rstd * gamma[c], shift = beta[c] - mean * scale
//             (as group_norm_cpu); silu_fwd: y = a * sigmoid(a) of that a.
//             The blocks of chunk 0 write mean and rstd (f32, one per (n, group)).
//   bwd_sums: per chunk, sum(gs) and sum(gs * xhat), xhat = (x - mean) * rstd,
//             gs = dy * gamma[c]; with SiLU gs = dy * s (1 + a (1 - s)) * gamma[c],
//             a = xhat * gamma[c] + beta[c], s = sigmoid(a) (a recomputed, not kept).
//   bwd:      dx = rstd * (gs - sum(gs)/n - xhat * sum(gs * xhat)/n).
#include "common.cuh"

__device__ __forceinline__ float gn_sigmoid(float a) { return 1.0f / (1.0f + expf(-a)); }

// Sums two values over the block; every thread gets the totals. All threads must call it;
// blockDim.x is a multiple of 32, at most 1024.
__device__ __forceinline__ float2 block_sum2(float a, float b) {
    __shared__ float sa[32], sb[32];
    const uint32_t lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    a = warp_sum(a);
    b = warp_sum(b);
    __syncthreads();  // the shared arrays may still be read by an earlier call
    if (lane == 0) {
        sa[warp] = a;
        sb[warp] = b;
    }
    __syncthreads();
    const uint32_t warps = blockDim.x >> 5;
    a = lane < warps ? sa[lane] : 0.0f;
    b = lane < warps ? sb[lane] : 0.0f;
    return make_float2(warp_sum(a), warp_sum(b));
}

// This block's group, its chunk's range [start, end) within the group, and the group's
// offset in the tensor.
struct GnChunk {
    uint32_t grp, g, start, end;
    size_t base;
};

__device__ __forceinline__ GnChunk gn_chunk(uint32_t n, uint32_t chunk_len, uint32_t chunks,
                                            uint32_t groups) {
    GnChunk k;
    k.grp = blockIdx.x / chunks;
    k.g = k.grp % groups;
    k.start = (blockIdx.x % chunks) * chunk_len;
    k.end = min(k.start + chunk_len, n);
    k.base = (size_t)k.grp * n;
    return k;
}

// The values in chunk i of a group of n values.
__device__ __forceinline__ float gn_count(uint32_t i, uint32_t n, uint32_t chunk_len) {
    return (float)(min((i + 1) * chunk_len, n) - i * chunk_len);
}

template <typename T>
__device__ __forceinline__ void gn_stats(const T *__restrict__ x, float *__restrict__ part,
                                         uint32_t n, uint32_t chunk_len, uint32_t chunks,
                                         uint32_t groups) {
    const GnChunk k = gn_chunk(n, chunk_len, chunks, groups);
    const T *xg = x + k.base;
    float s = 0.0f;
    for (uint32_t i = k.start + threadIdx.x; i < k.end; i += blockDim.x) s += load_f32(xg[i]);
    const float count = (float)(k.end - k.start);
    const float m = block_sum2(s, 0.0f).x / count;
    float v = 0.0f;
    for (uint32_t i = k.start + threadIdx.x; i < k.end; i += blockDim.x) {
        const float d = load_f32(xg[i]) - m;
        v += d * d;
    }
    const float m2 = block_sum2(v, 0.0f).x;
    if (threadIdx.x == 0) {
        part[2 * (size_t)blockIdx.x] = m;
        part[2 * (size_t)blockIdx.x + 1] = m2;
    }
}

template <typename T, bool SILU>
__device__ __forceinline__ void gn_fwd(const T *__restrict__ x, const T *__restrict__ gamma,
                                       const T *__restrict__ beta,
                                       const float *__restrict__ part, T *__restrict__ y,
                                       float *__restrict__ mean_out, float *__restrict__ rstd_out,
                                       uint32_t n, uint32_t chunk_len, uint32_t chunks,
                                       uint32_t hw, uint32_t cpg, uint32_t groups, float eps) {
    const GnChunk k = gn_chunk(n, chunk_len, chunks, groups);
    __shared__ float stat[2];
    if (threadIdx.x == 0) {
        const float *p = part + 2 * (size_t)k.grp * chunks;
        float mean = 0.0f;
        for (uint32_t i = 0; i < chunks; ++i) mean += gn_count(i, n, chunk_len) * p[2 * i];
        mean /= (float)n;
        float m2 = 0.0f;
        for (uint32_t i = 0; i < chunks; ++i) {
            const float d = p[2 * i] - mean;
            m2 += p[2 * i + 1] + gn_count(i, n, chunk_len) * d * d;
        }
        const float rstd = 1.0f / sqrtf(m2 / (float)n + eps);
        stat[0] = mean;
        stat[1] = rstd;
        if (k.start == 0) {
            mean_out[k.grp] = mean;
            rstd_out[k.grp] = rstd;
        }
    }
    __syncthreads();
    const float mean = stat[0], rstd = stat[1];
    const T *xg = x + k.base;
    T *yg = y + k.base;
    const uint32_t c0 = k.g * cpg;
    for (uint32_t i = k.start + threadIdx.x; i < k.end; i += blockDim.x) {
        const uint32_t c = c0 + i / hw;
        const float scale = rstd * load_f32(gamma[c]);
        const float shift = load_f32(beta[c]) - mean * scale;
        float a = load_f32(xg[i]) * scale + shift;
        if (SILU) a = a * gn_sigmoid(a);
        yg[i] = store_f32<T>(a);
    }
}

// gs of one value (see the header): the gradient reaching the normalised value, times gamma.
template <typename T, bool SILU>
__device__ __forceinline__ float gn_gs(float dy, float xhat, const T *__restrict__ gamma,
                                       const T *__restrict__ beta, uint32_t c) {
    const float w = load_f32(gamma[c]);
    if (SILU) {
        const float a = xhat * w + load_f32(beta[c]);
        const float s = gn_sigmoid(a);
        dy *= s * (1.0f + a * (1.0f - s));
    }
    return dy * w;
}

template <typename T, bool SILU>
__device__ __forceinline__ void gn_bwd_sums(const T *__restrict__ dy, const T *__restrict__ x,
                                            const float *__restrict__ mean_in,
                                            const float *__restrict__ rstd_in,
                                            const T *__restrict__ gamma,
                                            const T *__restrict__ beta, float *__restrict__ part,
                                            uint32_t n, uint32_t chunk_len, uint32_t chunks,
                                            uint32_t hw, uint32_t cpg, uint32_t groups) {
    const GnChunk k = gn_chunk(n, chunk_len, chunks, groups);
    const float mean = mean_in[k.grp], rstd = rstd_in[k.grp];
    const T *xg = x + k.base;
    const T *dg = dy + k.base;
    const uint32_t c0 = k.g * cpg;
    float s1 = 0.0f, s2 = 0.0f;
    for (uint32_t i = k.start + threadIdx.x; i < k.end; i += blockDim.x) {
        const float xhat = (load_f32(xg[i]) - mean) * rstd;
        const float gs = gn_gs<T, SILU>(load_f32(dg[i]), xhat, gamma, beta, c0 + i / hw);
        s1 += gs;
        s2 += gs * xhat;
    }
    const float2 s = block_sum2(s1, s2);
    if (threadIdx.x == 0) {
        part[2 * (size_t)blockIdx.x] = s.x;
        part[2 * (size_t)blockIdx.x + 1] = s.y;
    }
}

template <typename T, bool SILU>
__device__ __forceinline__ void gn_bwd(const T *__restrict__ dy, const T *__restrict__ x,
                                       const float *__restrict__ mean_in,
                                       const float *__restrict__ rstd_in,
                                       const T *__restrict__ gamma, const T *__restrict__ beta,
                                       const float *__restrict__ part, T *__restrict__ dx,
                                       uint32_t n, uint32_t chunk_len, uint32_t chunks,
                                       uint32_t hw, uint32_t cpg, uint32_t groups) {
    const GnChunk k = gn_chunk(n, chunk_len, chunks, groups);
    __shared__ float sums[2];
    if (threadIdx.x == 0) {
        const float *p = part + 2 * (size_t)k.grp * chunks;
        float s1 = 0.0f, s2 = 0.0f;
        for (uint32_t i = 0; i < chunks; ++i) {
            s1 += p[2 * i];
            s2 += p[2 * i + 1];
        }
        sums[0] = s1 / (float)n;
        sums[1] = s2 / (float)n;
    }
    __syncthreads();
    const float mean_g = sums[0], mean_gx = sums[1];
    const float mean = mean_in[k.grp], rstd = rstd_in[k.grp];
    const T *xg = x + k.base;
    const T *dg = dy + k.base;
    T *og = dx + k.base;
    const uint32_t c0 = k.g * cpg;
    for (uint32_t i = k.start + threadIdx.x; i < k.end; i += blockDim.x) {
        const float xhat = (load_f32(xg[i]) - mean) * rstd;
        const float gs = gn_gs<T, SILU>(load_f32(dg[i]), xhat, gamma, beta, c0 + i / hw);
        og[i] = store_f32<T>(rstd * (gs - mean_g - xhat * mean_gx));
    }
}

// The entry points, one per storage type (the names src/gpu/mod.rs launches).
extern "C" __global__ void group_norm_stats_f32(const float *x, float *part, uint32_t n, uint32_t chunk_len, uint32_t chunks, uint32_t groups) { gn_stats<float>(x, part, n, chunk_len, chunks, groups); }
extern "C" __global__ void group_norm_stats_f16(const __half *x, float *part, uint32_t n, uint32_t chunk_len, uint32_t chunks, uint32_t groups) { gn_stats<__half>(x, part, n, chunk_len, chunks, groups); }
extern "C" __global__ void group_norm_stats_bf16(const __nv_bfloat16 *x, float *part, uint32_t n, uint32_t chunk_len, uint32_t chunks, uint32_t groups) { gn_stats<__nv_bfloat16>(x, part, n, chunk_len, chunks, groups); }

extern "C" __global__ void group_norm_fwd_f32(const float *x, const float *gamma, const float *beta, const float *part, float *y, float *mean, float *rstd, uint32_t n, uint32_t chunk_len, uint32_t chunks, uint32_t hw, uint32_t cpg, uint32_t groups, float eps) { gn_fwd<float, false>(x, gamma, beta, part, y, mean, rstd, n, chunk_len, chunks, hw, cpg, groups, eps); }
extern "C" __global__ void group_norm_fwd_f16(const __half *x, const __half *gamma, const __half *beta, const float *part, __half *y, float *mean, float *rstd, uint32_t n, uint32_t chunk_len, uint32_t chunks, uint32_t hw, uint32_t cpg, uint32_t groups, float eps) { gn_fwd<__half, false>(x, gamma, beta, part, y, mean, rstd, n, chunk_len, chunks, hw, cpg, groups, eps); }
extern "C" __global__ void group_norm_fwd_bf16(const __nv_bfloat16 *x, const __nv_bfloat16 *gamma, const __nv_bfloat16 *beta, const float *part, __nv_bfloat16 *y, float *mean, float *rstd, uint32_t n, uint32_t chunk_len, uint32_t chunks, uint32_t hw, uint32_t cpg, uint32_t groups, float eps) { gn_fwd<__nv_bfloat16, false>(x, gamma, beta, part, y, mean, rstd, n, chunk_len, chunks, hw, cpg, groups, eps); }

extern "C" __global__ void group_norm_silu_fwd_f32(const float *x, const float *gamma, const float *beta, const float *part, float *y, float *mean, float *rstd, uint32_t n, uint32_t chunk_len, uint32_t chunks, uint32_t hw, uint32_t cpg, uint32_t groups, float eps) { gn_fwd<float, true>(x, gamma, beta, part, y, mean, rstd, n, chunk_len, chunks, hw, cpg, groups, eps); }
extern "C" __global__ void group_norm_silu_fwd_f16(const __half *x, const __half *gamma, const __half *beta, const float *part, __half *y, float *mean, float *rstd, uint32_t n, uint32_t chunk_len, uint32_t chunks, uint32_t hw, uint32_t cpg, uint32_t groups, float eps) { gn_fwd<__half, true>(x, gamma, beta, part, y, mean, rstd, n, chunk_len, chunks, hw, cpg, groups, eps); }
extern "C" __global__ void group_norm_silu_fwd_bf16(const __nv_bfloat16 *x, const __nv_bfloat16 *gamma, const __nv_bfloat16 *beta, const float *part, __nv_bfloat16 *y, float *mean, float *rstd, uint32_t n, uint32_t chunk_len, uint32_t chunks, uint32_t hw, uint32_t cpg, uint32_t groups, float eps) { gn_fwd<__nv_bfloat16, true>(x, gamma, beta, part, y, mean, rstd, n, chunk_len, chunks, hw, cpg, groups, eps); }

extern "C" __global__ void group_norm_bwd_sums_f32(const float *dy, const float *x, const float *mean, const float *rstd, const float *gamma, const float *beta, float *part, uint32_t n, uint32_t chunk_len, uint32_t chunks, uint32_t hw, uint32_t cpg, uint32_t groups) { gn_bwd_sums<float, false>(dy, x, mean, rstd, gamma, beta, part, n, chunk_len, chunks, hw, cpg, groups); }
extern "C" __global__ void group_norm_bwd_sums_f16(const __half *dy, const __half *x, const float *mean, const float *rstd, const __half *gamma, const __half *beta, float *part, uint32_t n, uint32_t chunk_len, uint32_t chunks, uint32_t hw, uint32_t cpg, uint32_t groups) { gn_bwd_sums<__half, false>(dy, x, mean, rstd, gamma, beta, part, n, chunk_len, chunks, hw, cpg, groups); }
extern "C" __global__ void group_norm_bwd_sums_bf16(const __nv_bfloat16 *dy, const __nv_bfloat16 *x, const float *mean, const float *rstd, const __nv_bfloat16 *gamma, const __nv_bfloat16 *beta, float *part, uint32_t n, uint32_t chunk_len, uint32_t chunks, uint32_t hw, uint32_t cpg, uint32_t groups) { gn_bwd_sums<__nv_bfloat16, false>(dy, x, mean, rstd, gamma, beta, part, n, chunk_len, chunks, hw, cpg, groups); }

extern "C" __global__ void group_norm_silu_bwd_sums_f32(const float *dy, const float *x, const float *mean, const float *rstd, const float *gamma, const float *beta, float *part, uint32_t n, uint32_t chunk_len, uint32_t chunks, uint32_t hw, uint32_t cpg, uint32_t groups) { gn_bwd_sums<float, true>(dy, x, mean, rstd, gamma, beta, part, n, chunk_len, chunks, hw, cpg, groups); }
extern "C" __global__ void group_norm_silu_bwd_sums_f16(const __half *dy, const __half *x, const float *mean, const float *rstd, const __half *gamma, const __half *beta, float *part, uint32_t n, uint32_t chunk_len, uint32_t chunks, uint32_t hw, uint32_t cpg, uint32_t groups) { gn_bwd_sums<__half, true>(dy, x, mean, rstd, gamma, beta, part, n, chunk_len, chunks, hw, cpg, groups); }
extern "C" __global__ void group_norm_silu_bwd_sums_bf16(const __nv_bfloat16 *dy, const __nv_bfloat16 *x, const float *mean, const float *rstd, const __nv_bfloat16 *gamma, const __nv_bfloat16 *beta, float *part, uint32_t n, uint32_t chunk_len, uint32_t chunks, uint32_t hw, uint32_t cpg, uint32_t groups) { gn_bwd_sums<__nv_bfloat16, true>(dy, x, mean, rstd, gamma, beta, part, n, chunk_len, chunks, hw, cpg, groups); }

extern "C" __global__ void group_norm_bwd_f32(const float *dy, const float *x, const float *mean, const float *rstd, const float *gamma, const float *beta, const float *part, float *dx, uint32_t n, uint32_t chunk_len, uint32_t chunks, uint32_t hw, uint32_t cpg, uint32_t groups) { gn_bwd<float, false>(dy, x, mean, rstd, gamma, beta, part, dx, n, chunk_len, chunks, hw, cpg, groups); }
extern "C" __global__ void group_norm_bwd_f16(const __half *dy, const __half *x, const float *mean, const float *rstd, const __half *gamma, const __half *beta, const float *part, __half *dx, uint32_t n, uint32_t chunk_len, uint32_t chunks, uint32_t hw, uint32_t cpg, uint32_t groups) { gn_bwd<__half, false>(dy, x, mean, rstd, gamma, beta, part, dx, n, chunk_len, chunks, hw, cpg, groups); }
extern "C" __global__ void group_norm_bwd_bf16(const __nv_bfloat16 *dy, const __nv_bfloat16 *x, const float *mean, const float *rstd, const __nv_bfloat16 *gamma, const __nv_bfloat16 *beta, const float *part, __nv_bfloat16 *dx, uint32_t n, uint32_t chunk_len, uint32_t chunks, uint32_t hw, uint32_t cpg, uint32_t groups) { gn_bwd<__nv_bfloat16, false>(dy, x, mean, rstd, gamma, beta, part, dx, n, chunk_len, chunks, hw, cpg, groups); }

extern "C" __global__ void group_norm_silu_bwd_f32(const float *dy, const float *x, const float *mean, const float *rstd, const float *gamma, const float *beta, const float *part, float *dx, uint32_t n, uint32_t chunk_len, uint32_t chunks, uint32_t hw, uint32_t cpg, uint32_t groups) { gn_bwd<float, true>(dy, x, mean, rstd, gamma, beta, part, dx, n, chunk_len, chunks, hw, cpg, groups); }
extern "C" __global__ void group_norm_silu_bwd_f16(const __half *dy, const __half *x, const float *mean, const float *rstd, const __half *gamma, const __half *beta, const float *part, __half *dx, uint32_t n, uint32_t chunk_len, uint32_t chunks, uint32_t hw, uint32_t cpg, uint32_t groups) { gn_bwd<__half, true>(dy, x, mean, rstd, gamma, beta, part, dx, n, chunk_len, chunks, hw, cpg, groups); }
extern "C" __global__ void group_norm_silu_bwd_bf16(const __nv_bfloat16 *dy, const __nv_bfloat16 *x, const float *mean, const float *rstd, const __nv_bfloat16 *gamma, const __nv_bfloat16 *beta, const float *part, __nv_bfloat16 *dx, uint32_t n, uint32_t chunk_len, uint32_t chunks, uint32_t hw, uint32_t cpg, uint32_t groups) { gn_bwd<__nv_bfloat16, true>(dy, x, mean, rstd, gamma, beta, part, dx, n, chunk_len, chunks, hw, cpg, groups); }
