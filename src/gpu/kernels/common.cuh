// Shared by sdti's fused kernels: storage types (f32, f16, bf16) are read into f32, all
// arithmetic is f32, and results are rounded once to the storage type (round to nearest),
// as candle's composed ops do between their steps.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

template <typename T> __device__ __forceinline__ float load_f32(T v);
template <> __device__ __forceinline__ float load_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float load_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float load_f32<__nv_bfloat16>(__nv_bfloat16 v) {
    return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T store_f32(float v);
template <> __device__ __forceinline__ float store_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half store_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// Sum over the 32 lanes of a warp; every lane gets the total. All lanes must call it.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// One kernel entry point per storage type: NAME_f32, NAME_f16, NAME_bf16 (the names the Rust
// side launches: src/gpu/mod.rs).
#define SDTI_FOR_EACH_TYPE(M) \
    M(float, f32)             \
    M(__half, f16)            \
    M(__nv_bfloat16, bf16)
