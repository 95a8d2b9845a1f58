// Layer normalisation over the last dimension (c values per row), forward with the per-row
// statistics kept and backward from them (src/gpu/mod.rs launches these; the CPU versions are
// layer_norm_cpu / layer_norm_backward_cpu in src/model/layers/layer_norm.rs, whose arithmetic
// this follows). One warp per row, eight rows per block of 256 threads; the row is read from
// global memory once per pass (the later passes mostly hit L1/L2).
//   fwd:     mean = sum(x)/c, var = sum((x - mean)^2)/c (two passes, biased, as torch),
//            rstd = 1/sqrt(var + eps), y = (x - mean) * rstd * gamma + beta;
//            mean and rstd are written in f32, one per row.
//   bwd:     gs = g * gamma, xhat = (x - mean) * rstd,
//            dx = rstd * (gs - mean(gs) - xhat * mean(gs * xhat))
//   bwd_add: the same plus d_residual (the residual stream's gradient, added in the same pass).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void layer_norm_fwd(const T *__restrict__ x, const T *__restrict__ gamma,
                                               const T *__restrict__ beta, T *__restrict__ y,
                                               float *__restrict__ mean_out,
                                               float *__restrict__ rstd_out, uint32_t rows,
                                               uint32_t c, float eps) {
    const uint32_t lane = threadIdx.x & 31u;
    const uint32_t warps = blockDim.x >> 5;
    // The row index is the same for every lane of a warp, so the shuffles see full warps.
    for (uint32_t r = blockIdx.x * warps + (threadIdx.x >> 5); r < rows; r += gridDim.x * warps) {
        const T *xr = x + (size_t)r * c;
        float s = 0.0f;
        for (uint32_t j = lane; j < c; j += 32) s += load_f32(xr[j]);
        const float mean = warp_sum(s) / (float)c;
        float v = 0.0f;
        for (uint32_t j = lane; j < c; j += 32) {
            const float d = load_f32(xr[j]) - mean;
            v += d * d;
        }
        const float rstd = 1.0f / sqrtf(warp_sum(v) / (float)c + eps);
        T *yr = y + (size_t)r * c;
        for (uint32_t j = lane; j < c; j += 32) {
            yr[j] = store_f32<T>((load_f32(xr[j]) - mean) * rstd * load_f32(gamma[j]) + load_f32(beta[j]));
        }
        if (lane == 0) {
            mean_out[r] = mean;
            rstd_out[r] = rstd;
        }
    }
}

template <typename T, bool ADD>
__device__ __forceinline__ void layer_norm_bwd(const T *__restrict__ g, const T *__restrict__ x,
                                               const float *__restrict__ mean_in,
                                               const float *__restrict__ rstd_in,
                                               const T *__restrict__ gamma,
                                               const T *__restrict__ d_residual,
                                               T *__restrict__ dx, uint32_t rows, uint32_t c) {
    const uint32_t lane = threadIdx.x & 31u;
    const uint32_t warps = blockDim.x >> 5;
    for (uint32_t r = blockIdx.x * warps + (threadIdx.x >> 5); r < rows; r += gridDim.x * warps) {
        const size_t off = (size_t)r * c;
        const T *gr = g + off;
        const T *xr = x + off;
        const float mean = mean_in[r];
        const float rstd = rstd_in[r];
        float sum_g = 0.0f, sum_gx = 0.0f;
        for (uint32_t j = lane; j < c; j += 32) {
            const float gs = load_f32(gr[j]) * load_f32(gamma[j]);
            sum_g += gs;
            sum_gx += gs * ((load_f32(xr[j]) - mean) * rstd);
        }
        const float mean_g = warp_sum(sum_g) / (float)c;
        const float mean_gx = warp_sum(sum_gx) / (float)c;
        T *dr = dx + off;
        for (uint32_t j = lane; j < c; j += 32) {
            float d = rstd * (load_f32(gr[j]) * load_f32(gamma[j]) - mean_g -
                              (load_f32(xr[j]) - mean) * rstd * mean_gx);
            if (ADD) d += load_f32(d_residual[off + j]);
            dr[j] = store_f32<T>(d);
        }
    }
}

// The entry points, one per storage type (the names src/gpu/mod.rs launches).
extern "C" __global__ void layer_norm_fwd_f32(const float *x, const float *gamma, const float *beta, float *y, float *mean, float *rstd, uint32_t rows, uint32_t c, float eps) { layer_norm_fwd(x, gamma, beta, y, mean, rstd, rows, c, eps); }
extern "C" __global__ void layer_norm_fwd_f16(const __half *x, const __half *gamma, const __half *beta, __half *y, float *mean, float *rstd, uint32_t rows, uint32_t c, float eps) { layer_norm_fwd(x, gamma, beta, y, mean, rstd, rows, c, eps); }
extern "C" __global__ void layer_norm_fwd_bf16(const __nv_bfloat16 *x, const __nv_bfloat16 *gamma, const __nv_bfloat16 *beta, __nv_bfloat16 *y, float *mean, float *rstd, uint32_t rows, uint32_t c, float eps) { layer_norm_fwd(x, gamma, beta, y, mean, rstd, rows, c, eps); }

extern "C" __global__ void layer_norm_bwd_f32(const float *g, const float *x, const float *mean, const float *rstd, const float *gamma, float *dx, uint32_t rows, uint32_t c) { layer_norm_bwd<float, false>(g, x, mean, rstd, gamma, nullptr, dx, rows, c); }
extern "C" __global__ void layer_norm_bwd_f16(const __half *g, const __half *x, const float *mean, const float *rstd, const __half *gamma, __half *dx, uint32_t rows, uint32_t c) { layer_norm_bwd<__half, false>(g, x, mean, rstd, gamma, nullptr, dx, rows, c); }
extern "C" __global__ void layer_norm_bwd_bf16(const __nv_bfloat16 *g, const __nv_bfloat16 *x, const float *mean, const float *rstd, const __nv_bfloat16 *gamma, __nv_bfloat16 *dx, uint32_t rows, uint32_t c) { layer_norm_bwd<__nv_bfloat16, false>(g, x, mean, rstd, gamma, nullptr, dx, rows, c); }

extern "C" __global__ void layer_norm_bwd_add_f32(const float *g, const float *x, const float *mean, const float *rstd, const float *gamma, const float *d_residual, float *dx, uint32_t rows, uint32_t c) { layer_norm_bwd<float, true>(g, x, mean, rstd, gamma, d_residual, dx, rows, c); }
extern "C" __global__ void layer_norm_bwd_add_f16(const __half *g, const __half *x, const float *mean, const float *rstd, const __half *gamma, const __half *d_residual, __half *dx, uint32_t rows, uint32_t c) { layer_norm_bwd<__half, true>(g, x, mean, rstd, gamma, d_residual, dx, rows, c); }
extern "C" __global__ void layer_norm_bwd_add_bf16(const __nv_bfloat16 *g, const __nv_bfloat16 *x, const float *mean, const float *rstd, const __nv_bfloat16 *gamma, const __nv_bfloat16 *d_residual, __nv_bfloat16 *dx, uint32_t rows, uint32_t c) { layer_norm_bwd<__nv_bfloat16, true>(g, x, mean, rstd, gamma, d_residual, dx, rows, c); }
