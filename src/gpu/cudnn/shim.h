/* sdti's C shim over the cuDNN frontend (v1 graph API), compiled by build.rs with the `cuda`
 * feature only. libcudnn.so.9 is opened at run time (dlopen), so nothing cuDNN is needed to
 * link. Every function catches every C++ exception and returns a status; on failure a
 * message is written into `err` (NUL-terminated, truncated to `err_len`).
 * Threads: `sdti_dnn_probe` is [thread-safe]; a handle is used by one thread at a time
 * (src/gpu/cudnn/mod.rs holds it behind a mutex).
 * Tensors are given by device pointer and element strides of their 4-D logical view:
 * attention in BHSD order (batch, head, sequence, head dim), convolutions in NCHW order
 * (weights KCRS). Layout: no padding between fields (all int64_t, then the int32_t fields). */
#ifndef SDTI_CUDNN_SHIM_H
#define SDTI_CUDNN_SHIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Statuses. */
#define SDTI_DNN_OK 0
/* cuDNN failed; `err` says why. */
#define SDTI_DNN_ERROR 1
/* The workspace given is smaller than the plan needs: `*ws_needed` bytes; call again. */
#define SDTI_DNN_NEED_WORKSPACE 2
/* cuDNN has no engine for this shape (remembered per shape key; use another path). */
#define SDTI_DNN_UNSUPPORTED 3

/* Storage types. */
#define SDTI_DNN_F16 1
#define SDTI_DNN_BF16 2

typedef struct sdti_dnn sdti_dnn;

/* One attention call: q [b, h, s_q, d], k and v [b, h, s_kv, d], o [b, h, s_q, d] (same
 * dtype), stats [b, h, s_q, 1] f32 (contiguous: the row log-sum-exp of the scaled scores).
 * The backward pass also reads `dout` (strides `do_stride`) and writes dq, dk, dv. */
typedef struct sdti_dnn_sdpa {
    int64_t b, h, s_q, s_kv, d;
    int64_t q_stride[4], k_stride[4], v_stride[4], o_stride[4];
    int64_t do_stride[4], dq_stride[4], dk_stride[4], dv_stride[4];
    int32_t dtype;
    int32_t causal; /* 1: query i sees keys 0..=i */
    float scale;
    int32_t reserved; /* 0 */
} sdti_dnn_sdpa;

/* One 2-D convolution (groups 1, dilation 1): x [n, c, h, w], weight [k, c, r, s],
 * y [n, k, out_h, out_w], bias [k] (optional, contiguous). */
typedef struct sdti_dnn_conv {
    int64_t n, c, h, w, k, r, s, out_h, out_w;
    int64_t pad_h, pad_w, stride_h, stride_w;
    int64_t x_stride[4], w_stride[4], y_stride[4];
    int32_t dtype;
    int32_t has_bias;
} sdti_dnn_conv;

/* Opens `lib` (NULL: "libcudnn.so.9") once per process and reports cuDNN's version
 * (e.g. 91900). Returns SDTI_DNN_OK, or SDTI_DNN_ERROR with the reason. [thread-safe] */
int sdti_dnn_probe(const char *lib, size_t *version, char *err, size_t err_len);

/* A cuDNN handle bound to `stream` (a CUstream of the current context), with its graph
 * caches. Only after a successful probe. */
int sdti_dnn_create(void *stream, sdti_dnn **out, char *err, size_t err_len);
/* Frees a handle; NULL is a no-op. */
void sdti_dnn_destroy(sdti_dnn *h);

/* Attention forward: writes o and stats. Workspace: `ws` of `ws_len` bytes; when too small,
 * returns SDTI_DNN_NEED_WORKSPACE with `*ws_needed` set and runs nothing. */
int sdti_dnn_sdpa_fwd(sdti_dnn *h, const sdti_dnn_sdpa *desc, const void *q, const void *k,
                      const void *v, void *o, float *stats, void *ws, size_t ws_len,
                      size_t *ws_needed, char *err, size_t err_len);
/* Attention backward from o, dout and stats: writes dq, dk and dv. */
int sdti_dnn_sdpa_bwd(sdti_dnn *h, const sdti_dnn_sdpa *desc, const void *q, const void *k,
                      const void *v, const void *o, const void *dout, const float *stats,
                      void *dq, void *dk, void *dv, void *ws, size_t ws_len, size_t *ws_needed,
                      char *err, size_t err_len);

/* Convolution forward, y = conv(x, w) (+ bias[k] per output channel, added in f32). */
int sdti_dnn_conv_fwd(sdti_dnn *h, const sdti_dnn_conv *desc, const void *x, const void *w,
                      const void *bias, void *y, void *ws, size_t ws_len, size_t *ws_needed,
                      char *err, size_t err_len);
/* Convolution data gradient: dx [n, c, h, w] (strides x_stride) from dy [n, k, out_h,
 * out_w] (strides y_stride). `has_bias` is ignored. */
int sdti_dnn_conv_dgrad(sdti_dnn *h, const sdti_dnn_conv *desc, const void *dy, const void *w,
                        void *dx, void *ws, size_t ws_len, size_t *ws_needed, char *err,
                        size_t err_len);

#ifdef __cplusplus
}
#endif

#endif
