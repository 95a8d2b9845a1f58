// Fused activations and their input gradients (src/gpu/mod.rs launches them; the CPU versions
// and the composed candle ops they replace are in src/model/layers/activation.rs).
//   geglu_fwd:      out[r, j] = a * gelu(b),  a = h[r, j], b = h[r, n + j]   (h: [rows, 2n])
//   geglu_bwd:      dh[r, j] = g * gelu(b),  dh[r, n + j] = g * a * gelu'(b)
//   gelu_erf_bwd:   dx = g * (Phi(x) + x phi(x))
//   silu_bwd:       dx = g * s (1 + x (1 - s)),  s = sigmoid(x)
//   quick_gelu_fwd: y = x sigmoid(1.702 x)
//   quick_gelu_bwd: dx = g * (s + 1.702 x s (1 - s)),  s = sigmoid(1.702 x)
// gelu is the exact one, x Phi(x), with Phi from normcdff as candle's own CUDA gelu_erf.
#include "common.cuh"

#define QUICK_GELU_ALPHA 1.702f

__device__ __forceinline__ float gelu_erf(float x) { return x * normcdff(x); }

__device__ __forceinline__ float gelu_erf_grad(float x) {
    const float inv_sqrt_2pi = 0.3989422804014327f;
    return normcdff(x) + x * (inv_sqrt_2pi * expf(-0.5f * x * x));
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float silu_grad(float x) {
    const float s = sigmoid(x);
    return s * (1.0f + x * (1.0f - s));
}

__device__ __forceinline__ float quick_gelu(float x) {
    return x / (1.0f + expf(-QUICK_GELU_ALPHA * x));
}

__device__ __forceinline__ float quick_gelu_grad(float x) {
    const float s = sigmoid(QUICK_GELU_ALPHA * x);
    return s + QUICK_GELU_ALPHA * x * s * (1.0f - s);
}

// A block walks rows (grid-stride), its threads the columns of a row.
template <typename T>
__device__ __forceinline__ void geglu_fwd(const T *__restrict__ h, T *__restrict__ out,
                                          uint32_t rows, uint32_t n) {
    for (uint32_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *a = h + (size_t)r * 2 * n;
        const T *b = a + n;
        T *o = out + (size_t)r * n;
        for (uint32_t j = threadIdx.x; j < n; j += blockDim.x) {
            o[j] = store_f32<T>(load_f32(a[j]) * gelu_erf(load_f32(b[j])));
        }
    }
}

template <typename T>
__device__ __forceinline__ void geglu_bwd(const T *__restrict__ g, const T *__restrict__ h,
                                          T *__restrict__ dh, uint32_t rows, uint32_t n) {
    for (uint32_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *a = h + (size_t)r * 2 * n;
        const T *b = a + n;
        const T *gr = g + (size_t)r * n;
        T *da = dh + (size_t)r * 2 * n;
        T *db = da + n;
        for (uint32_t j = threadIdx.x; j < n; j += blockDim.x) {
            const float gv = load_f32(gr[j]);
            const float bv = load_f32(b[j]);
            da[j] = store_f32<T>(gv * gelu_erf(bv));
            db[j] = store_f32<T>(gv * load_f32(a[j]) * gelu_erf_grad(bv));
        }
    }
}

// dx = g * f'(x), elementwise over n values (grid-stride).
template <typename T, float (*F)(float)>
__device__ __forceinline__ void grad_map(const T *__restrict__ g, const T *__restrict__ x,
                                         T *__restrict__ dx, uint64_t n) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        dx[i] = store_f32<T>(load_f32(g[i]) * F(load_f32(x[i])));
    }
}

// y = f(x), elementwise over n values (grid-stride).
template <typename T, float (*F)(float)>
__device__ __forceinline__ void map(const T *__restrict__ x, T *__restrict__ y, uint64_t n) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = store_f32<T>(F(load_f32(x[i])));
    }
}

// The entry points, one per storage type (the names src/gpu/mod.rs launches).
extern "C" __global__ void geglu_fwd_f32(const float *h, float *out, uint32_t rows, uint32_t n) { geglu_fwd(h, out, rows, n); }
extern "C" __global__ void geglu_fwd_f16(const __half *h, __half *out, uint32_t rows, uint32_t n) { geglu_fwd(h, out, rows, n); }
extern "C" __global__ void geglu_fwd_bf16(const __nv_bfloat16 *h, __nv_bfloat16 *out, uint32_t rows, uint32_t n) { geglu_fwd(h, out, rows, n); }

extern "C" __global__ void geglu_bwd_f32(const float *g, const float *h, float *dh, uint32_t rows, uint32_t n) { geglu_bwd(g, h, dh, rows, n); }
extern "C" __global__ void geglu_bwd_f16(const __half *g, const __half *h, __half *dh, uint32_t rows, uint32_t n) { geglu_bwd(g, h, dh, rows, n); }
extern "C" __global__ void geglu_bwd_bf16(const __nv_bfloat16 *g, const __nv_bfloat16 *h, __nv_bfloat16 *dh, uint32_t rows, uint32_t n) { geglu_bwd(g, h, dh, rows, n); }

extern "C" __global__ void gelu_erf_bwd_f32(const float *g, const float *x, float *dx, uint64_t n) { grad_map<float, gelu_erf_grad>(g, x, dx, n); }
extern "C" __global__ void gelu_erf_bwd_f16(const __half *g, const __half *x, __half *dx, uint64_t n) { grad_map<__half, gelu_erf_grad>(g, x, dx, n); }
extern "C" __global__ void gelu_erf_bwd_bf16(const __nv_bfloat16 *g, const __nv_bfloat16 *x, __nv_bfloat16 *dx, uint64_t n) { grad_map<__nv_bfloat16, gelu_erf_grad>(g, x, dx, n); }

extern "C" __global__ void silu_bwd_f32(const float *g, const float *x, float *dx, uint64_t n) { grad_map<float, silu_grad>(g, x, dx, n); }
extern "C" __global__ void silu_bwd_f16(const __half *g, const __half *x, __half *dx, uint64_t n) { grad_map<__half, silu_grad>(g, x, dx, n); }
extern "C" __global__ void silu_bwd_bf16(const __nv_bfloat16 *g, const __nv_bfloat16 *x, __nv_bfloat16 *dx, uint64_t n) { grad_map<__nv_bfloat16, silu_grad>(g, x, dx, n); }

extern "C" __global__ void quick_gelu_fwd_f32(const float *x, float *y, uint64_t n) { map<float, quick_gelu>(x, y, n); }
extern "C" __global__ void quick_gelu_fwd_f16(const __half *x, __half *y, uint64_t n) { map<__half, quick_gelu>(x, y, n); }
extern "C" __global__ void quick_gelu_fwd_bf16(const __nv_bfloat16 *x, __nv_bfloat16 *y, uint64_t n) { map<__nv_bfloat16, quick_gelu>(x, y, n); }

extern "C" __global__ void quick_gelu_bwd_f32(const float *g, const float *x, float *dx, uint64_t n) { grad_map<float, quick_gelu_grad>(g, x, dx, n); }
extern "C" __global__ void quick_gelu_bwd_f16(const __half *g, const __half *x, __half *dx, uint64_t n) { grad_map<__half, quick_gelu_grad>(g, x, dx, n); }
extern "C" __global__ void quick_gelu_bwd_bf16(const __nv_bfloat16 *g, const __nv_bfloat16 *x, __nv_bfloat16 *dx, uint64_t n) { grad_map<__nv_bfloat16, quick_gelu_grad>(g, x, dx, n); }
