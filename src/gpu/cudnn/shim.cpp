// sdti's shim over the cuDNN frontend's graph API (shim.h says what each function does).
// Built by build.rs with NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING: the frontend then calls
// cuDNN through `cudnn_frontend::cudnn_dlhandle` (set by sdti_dnn_probe) and the CUDA
// runtime/driver through its own dlopen, so the binary links nothing cuDNN.
// One graph per shape key per handle, built once (operation graph, heuristics A with the
// fallback list, the first plan that builds): building is the slow part (milliseconds), the
// execution a single call. Nothing here throws across the C boundary.

#ifndef NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING
#define NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING
#endif

#include <dlfcn.h>

#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <cudnn_frontend.h>

#include "shim.h"

namespace fe = cudnn_frontend;

// The frontend's dynamic-loading mode reads cuDNN's symbols through this handle.
namespace cudnn_frontend {
void *cudnn_dlhandle = nullptr;
}

namespace {

void set_err(char *err, size_t len, const std::string &msg) {
    if (err == nullptr || len == 0) {
        return;
    }
    size_t n = msg.size() < len - 1 ? msg.size() : len - 1;
    std::memcpy(err, msg.data(), n);
    err[n] = '\0';
}

// The probe's answer, decided once per process.
std::mutex probe_mutex;
bool probed = false;
bool probe_ok = false;
size_t probe_version = 0;
std::string probe_message;

void probe_once(const char *lib) {
    probed = true;
    const char *name = lib != nullptr ? lib : "libcudnn.so.9";
    dlerror();
    void *handle = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
        const char *e = dlerror();
        probe_message = std::string("cannot open ") + name + ": " + (e != nullptr ? e : "unknown error");
        return;
    }
    using GetVersion = size_t (*)();
    auto get_version = reinterpret_cast<GetVersion>(dlsym(handle, "cudnnGetVersion"));
    if (get_version == nullptr) {
        probe_message = std::string(name) + " has no cudnnGetVersion";
        dlclose(handle);
        return;
    }
    size_t version = get_version();
    if (version < 90000) {
        probe_message = std::string(name) + " is cuDNN " + fe::detail::convert_version_to_str(version) +
                        "; sdti needs cuDNN 9";
        dlclose(handle);
        return;
    }
    fe::cudnn_dlhandle = handle;
    // The frontend opens the CUDA runtime itself (for its memsets); fail here, not mid-step.
    (void)fe::detail::get_cuda_symbol(fe::detail::CudaLibrary::CUDART, "cudaGetLastError");
    probe_version = version;
    probe_ok = true;
}

// One cached graph (or the reason there is none) per shape key.
struct Entry {
    std::shared_ptr<fe::graph::Graph> graph;
    int64_t workspace = 0;
    std::string unsupported;
};

using Key = std::vector<int64_t>;

enum Uid : int64_t {
    UID_Q = 1,
    UID_K,
    UID_V,
    UID_O,
    UID_STATS,
    UID_DO,
    UID_DQ,
    UID_DK,
    UID_DV,
    UID_X = 11,
    UID_W,
    UID_BIAS,
    UID_Y,
};

enum OpKind : int64_t { SDPA_FWD = 1, SDPA_BWD, CONV_FWD, CONV_DGRAD };

std::vector<int64_t> v4(const int64_t s[4]) { return {s[0], s[1], s[2], s[3]}; }

fe::DataType_t io_type(int32_t dtype) {
    return dtype == SDTI_DNN_BF16 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::HALF;
}

std::string step_error(fe::error_t r, const char *step) {
    return r.is_good() ? std::string() : std::string(step) + ": " + r.get_message();
}

// Validates, builds and plans `g`; the empty string, or why cuDNN cannot run it.
std::string finish(fe::graph::Graph &g, cudnnHandle_t handle, int64_t &workspace) {
    std::string m;
    if (!(m = step_error(g.validate(), "validate")).empty()) return m;
    if (!(m = step_error(g.build_operation_graph(handle), "build_operation_graph")).empty()) return m;
    if (!(m = step_error(g.create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK}),
                         "create_execution_plans"))
             .empty())
        return m;
    if (!(m = step_error(g.check_support(handle), "check_support")).empty()) return m;
    if (!(m = step_error(g.build_plans(handle), "build_plans")).empty()) return m;
    return step_error(g.get_workspace_size(workspace), "get_workspace_size");
}

std::shared_ptr<fe::graph::Graph> new_graph(int32_t dtype) {
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(io_type(dtype))
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    return g;
}

std::shared_ptr<fe::graph::Tensor_attributes> input(fe::graph::Graph &g, const char *name, int64_t uid,
                                                   std::vector<int64_t> dim, std::vector<int64_t> stride) {
    return g.tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim(dim).set_stride(stride));
}

void output(std::shared_ptr<fe::graph::Tensor_attributes> t, int64_t uid, std::vector<int64_t> dim,
            std::vector<int64_t> stride) {
    t->set_output(true).set_uid(uid).set_dim(dim).set_stride(stride);
}

Key sdpa_key(OpKind kind, const sdti_dnn_sdpa &d) {
    Key k = {kind, d.b, d.h, d.s_q, d.s_kv, d.d, d.dtype, d.causal};
    uint32_t scale_bits;
    std::memcpy(&scale_bits, &d.scale, sizeof scale_bits);
    k.push_back(scale_bits);
    const int64_t *strides[] = {d.q_stride, d.k_stride, d.v_stride, d.o_stride,
                                d.do_stride, d.dq_stride, d.dk_stride, d.dv_stride};
    size_t used = kind == SDPA_FWD ? 4 : 8;
    for (size_t i = 0; i < used; ++i) k.insert(k.end(), strides[i], strides[i] + 4);
    return k;
}

Key conv_key(OpKind kind, const sdti_dnn_conv &d) {
    Key k = {kind,       d.n,        d.c,        d.h,        d.w,          d.k,          d.r,
             d.s,        d.out_h,    d.out_w,    d.pad_h,    d.pad_w,      d.stride_h,   d.stride_w,
             d.dtype,    kind == CONV_FWD ? d.has_bias : 0};
    for (const int64_t *s : {d.x_stride, d.w_stride, d.y_stride}) k.insert(k.end(), s, s + 4);
    return k;
}

std::string sdpa_graph(OpKind kind, const sdti_dnn_sdpa &d, cudnnHandle_t handle, Entry &e) {
    auto g = new_graph(d.dtype);
    std::vector<int64_t> qd = {d.b, d.h, d.s_q, d.d}, kd = {d.b, d.h, d.s_kv, d.d};
    std::vector<int64_t> sd = {d.b, d.h, d.s_q, 1}, ss = {d.h * d.s_q, d.s_q, 1, 1};
    auto q = input(*g, "Q", UID_Q, qd, v4(d.q_stride));
    auto k = input(*g, "K", UID_K, kd, v4(d.k_stride));
    auto v = input(*g, "V", UID_V, kd, v4(d.v_stride));
    if (kind == SDPA_FWD) {
        auto opts = fe::graph::SDPA_attributes().set_name("sdpa").set_generate_stats(true).set_attn_scale(d.scale);
        if (d.causal != 0) {
            // Top-left aligned: query i sees keys 0..=i (set_causal_mask, soon deprecated).
            opts.set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT).set_diagonal_band_right_bound(0);
        }
        auto [o, stats] = g->sdpa(q, k, v, opts);
        output(o, UID_O, qd, v4(d.o_stride));
        output(stats, UID_STATS, sd, ss);
        stats->set_data_type(fe::DataType_t::FLOAT);
    } else {
        auto o = input(*g, "O", UID_O, qd, v4(d.o_stride));
        auto dout = input(*g, "dO", UID_DO, qd, v4(d.do_stride));
        auto stats = input(*g, "Stats", UID_STATS, sd, ss);
        stats->set_data_type(fe::DataType_t::FLOAT);
        auto opts = fe::graph::SDPA_backward_attributes().set_name("sdpa_backward").set_attn_scale(d.scale);
        if (d.causal != 0) {
            // Top-left aligned: query i sees keys 0..=i (set_causal_mask, soon deprecated).
            opts.set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT).set_diagonal_band_right_bound(0);
        }
        auto [dq, dk, dv] = g->sdpa_backward(q, k, v, o, dout, stats, opts);
        output(dq, UID_DQ, qd, v4(d.dq_stride));
        output(dk, UID_DK, kd, v4(d.dk_stride));
        output(dv, UID_DV, kd, v4(d.dv_stride));
    }
    std::string m = finish(*g, handle, e.workspace);
    if (m.empty()) e.graph = g;
    return m;
}

std::string conv_graph(OpKind kind, const sdti_dnn_conv &d, cudnnHandle_t handle, Entry &e) {
    auto g = new_graph(d.dtype);
    std::vector<int64_t> xd = {d.n, d.c, d.h, d.w}, wd = {d.k, d.c, d.r, d.s}, yd = {d.n, d.k, d.out_h, d.out_w};
    std::vector<int64_t> pad = {d.pad_h, d.pad_w}, stride = {d.stride_h, d.stride_w}, dil = {1, 1};
    auto w = input(*g, "W", UID_W, wd, v4(d.w_stride));
    if (kind == CONV_FWD) {
        auto x = input(*g, "X", UID_X, xd, v4(d.x_stride));
        auto y = g->conv_fprop(
            x, w, fe::graph::Conv_fprop_attributes().set_name("conv").set_padding(pad).set_stride(stride).set_dilation(dil));
        if (d.has_bias != 0) {
            auto bias = input(*g, "bias", UID_BIAS, {1, d.k, 1, 1}, {d.k, 1, 1, 1});
            y->set_data_type(fe::DataType_t::FLOAT);
            y = g->pointwise(y, bias,
                             fe::graph::Pointwise_attributes()
                                 .set_name("bias")
                                 .set_mode(fe::PointwiseMode_t::ADD)
                                 .set_compute_data_type(fe::DataType_t::FLOAT));
        }
        output(y, UID_Y, yd, v4(d.y_stride));
    } else {
        auto dy = input(*g, "dY", UID_Y, yd, v4(d.y_stride));
        auto dx = g->conv_dgrad(
            dy, w, fe::graph::Conv_dgrad_attributes().set_name("dgrad").set_padding(pad).set_stride(stride).set_dilation(dil));
        output(dx, UID_X, xd, v4(d.x_stride));
    }
    std::string m = finish(*g, handle, e.workspace);
    if (m.empty()) e.graph = g;
    return m;
}

}  // namespace

struct sdti_dnn {
    cudnnHandle_t handle = nullptr;
    std::map<Key, Entry> cache;
};

namespace {

// Finds or builds the graph of `key`, then runs it with `pack` when the workspace suffices.
template <class Build>
int run(sdti_dnn *h, Key key, Build build, std::unordered_map<int64_t, void *> &pack, void *ws, size_t ws_len,
        size_t *ws_needed, char *err, size_t err_len) {
    auto it = h->cache.find(key);
    if (it == h->cache.end()) {
        Entry e;
        try {
            e.unsupported = build(e);
        } catch (const std::exception &ex) {
            e.graph = nullptr;
            e.unsupported = std::string("building the graph failed: ") + ex.what();
        }
        if (e.graph == nullptr && e.unsupported.empty()) e.unsupported = "no graph was built";
        it = h->cache.emplace(std::move(key), std::move(e)).first;
    }
    Entry &e = it->second;
    if (e.graph == nullptr) {
        set_err(err, err_len, e.unsupported);
        return SDTI_DNN_UNSUPPORTED;
    }
    if (ws_needed != nullptr) *ws_needed = static_cast<size_t>(e.workspace);
    if (static_cast<size_t>(e.workspace) > ws_len) {
        return SDTI_DNN_NEED_WORKSPACE;
    }
    fe::error_t r = e.graph->execute(h->handle, pack, e.workspace > 0 ? ws : nullptr);
    if (r.is_bad()) {
        set_err(err, err_len, "execute: " + r.get_message());
        return SDTI_DNN_ERROR;
    }
    return SDTI_DNN_OK;
}

bool valid_dtype(int32_t dtype) { return dtype == SDTI_DNN_F16 || dtype == SDTI_DNN_BF16; }

}  // namespace

#define SDTI_DNN_GUARD_BEGIN try {
#define SDTI_DNN_GUARD_END                                   \
    }                                                        \
    catch (const std::exception &ex) {                       \
        set_err(err, err_len, ex.what());                    \
        return SDTI_DNN_ERROR;                               \
    }                                                        \
    catch (...) {                                            \
        set_err(err, err_len, "unknown C++ exception");      \
        return SDTI_DNN_ERROR;                               \
    }

extern "C" int sdti_dnn_probe(const char *lib, size_t *version, char *err, size_t err_len) {
    SDTI_DNN_GUARD_BEGIN
    std::lock_guard<std::mutex> lock(probe_mutex);
    if (!probed) {
        try {
            probe_once(lib);
        } catch (const std::exception &ex) {
            probe_ok = false;
            probe_message = ex.what();
        }
    }
    if (!probe_ok) {
        set_err(err, err_len, probe_message);
        return SDTI_DNN_ERROR;
    }
    if (version != nullptr) *version = probe_version;
    return SDTI_DNN_OK;
    SDTI_DNN_GUARD_END
}

extern "C" int sdti_dnn_create(void *stream, sdti_dnn **out, char *err, size_t err_len) {
    SDTI_DNN_GUARD_BEGIN
    if (out == nullptr) {
        set_err(err, err_len, "no output pointer");
        return SDTI_DNN_ERROR;
    }
    {
        std::lock_guard<std::mutex> lock(probe_mutex);
        if (!probe_ok) {
            set_err(err, err_len, "cuDNN was not loaded (sdti_dnn_probe first)");
            return SDTI_DNN_ERROR;
        }
    }
    auto h = std::make_unique<sdti_dnn>();
    cudnnStatus_t st = fe::detail::create_handle(&h->handle);
    if (st != CUDNN_STATUS_SUCCESS) {
        set_err(err, err_len, "cudnnCreate failed with status " + std::to_string(static_cast<int>(st)));
        return SDTI_DNN_ERROR;
    }
    st = fe::detail::set_stream(h->handle, static_cast<cudaStream_t>(stream));
    if (st != CUDNN_STATUS_SUCCESS) {
        fe::detail::destroy_handle(h->handle);
        set_err(err, err_len, "cudnnSetStream failed with status " + std::to_string(static_cast<int>(st)));
        return SDTI_DNN_ERROR;
    }
    *out = h.release();
    return SDTI_DNN_OK;
    SDTI_DNN_GUARD_END
}

extern "C" void sdti_dnn_destroy(sdti_dnn *h) {
    if (h == nullptr) return;
    try {
        h->cache.clear();
        if (h->handle != nullptr) fe::detail::destroy_handle(h->handle);
    } catch (...) {
        // Nothing may cross the boundary; the handle's memory is freed below regardless.
    }
    delete h;
}

extern "C" int sdti_dnn_sdpa_fwd(sdti_dnn *h, const sdti_dnn_sdpa *desc, const void *q, const void *k,
                                 const void *v, void *o, float *stats, void *ws, size_t ws_len, size_t *ws_needed,
                                 char *err, size_t err_len) {
    SDTI_DNN_GUARD_BEGIN
    if (h == nullptr || desc == nullptr || !valid_dtype(desc->dtype)) {
        set_err(err, err_len, "sdpa_fwd: no handle, no descriptor or a dtype other than f16/bf16");
        return SDTI_DNN_ERROR;
    }
    const sdti_dnn_sdpa d = *desc;
    std::unordered_map<int64_t, void *> pack = {{UID_Q, const_cast<void *>(q)}, {UID_K, const_cast<void *>(k)},
                                                {UID_V, const_cast<void *>(v)}, {UID_O, o},
                                                {UID_STATS, stats}};
    auto build = [&](Entry &e) { return sdpa_graph(SDPA_FWD, d, h->handle, e); };
    return run(h, sdpa_key(SDPA_FWD, d), build, pack, ws, ws_len, ws_needed, err, err_len);
    SDTI_DNN_GUARD_END
}

extern "C" int sdti_dnn_sdpa_bwd(sdti_dnn *h, const sdti_dnn_sdpa *desc, const void *q, const void *k,
                                 const void *v, const void *o, const void *dout, const float *stats, void *dq,
                                 void *dk, void *dv, void *ws, size_t ws_len, size_t *ws_needed, char *err,
                                 size_t err_len) {
    SDTI_DNN_GUARD_BEGIN
    if (h == nullptr || desc == nullptr || !valid_dtype(desc->dtype)) {
        set_err(err, err_len, "sdpa_bwd: no handle, no descriptor or a dtype other than f16/bf16");
        return SDTI_DNN_ERROR;
    }
    const sdti_dnn_sdpa d = *desc;
    std::unordered_map<int64_t, void *> pack = {
        {UID_Q, const_cast<void *>(q)},         {UID_K, const_cast<void *>(k)},
        {UID_V, const_cast<void *>(v)},         {UID_O, const_cast<void *>(o)},
        {UID_DO, const_cast<void *>(dout)},     {UID_STATS, const_cast<float *>(stats)},
        {UID_DQ, dq},                           {UID_DK, dk},
        {UID_DV, dv}};
    auto build = [&](Entry &e) { return sdpa_graph(SDPA_BWD, d, h->handle, e); };
    return run(h, sdpa_key(SDPA_BWD, d), build, pack, ws, ws_len, ws_needed, err, err_len);
    SDTI_DNN_GUARD_END
}

extern "C" int sdti_dnn_conv_fwd(sdti_dnn *h, const sdti_dnn_conv *desc, const void *x, const void *w,
                                 const void *bias, void *y, void *ws, size_t ws_len, size_t *ws_needed, char *err,
                                 size_t err_len) {
    SDTI_DNN_GUARD_BEGIN
    if (h == nullptr || desc == nullptr || !valid_dtype(desc->dtype) || (desc->has_bias != 0 && bias == nullptr)) {
        set_err(err, err_len, "conv_fwd: no handle, no descriptor, a dtype other than f16/bf16 or no bias");
        return SDTI_DNN_ERROR;
    }
    const sdti_dnn_conv d = *desc;
    std::unordered_map<int64_t, void *> pack = {
        {UID_X, const_cast<void *>(x)}, {UID_W, const_cast<void *>(w)}, {UID_Y, y}};
    if (d.has_bias != 0) pack.emplace(UID_BIAS, const_cast<void *>(bias));
    auto build = [&](Entry &e) { return conv_graph(CONV_FWD, d, h->handle, e); };
    return run(h, conv_key(CONV_FWD, d), build, pack, ws, ws_len, ws_needed, err, err_len);
    SDTI_DNN_GUARD_END
}

extern "C" int sdti_dnn_conv_dgrad(sdti_dnn *h, const sdti_dnn_conv *desc, const void *dy, const void *w, void *dx,
                                   void *ws, size_t ws_len, size_t *ws_needed, char *err, size_t err_len) {
    SDTI_DNN_GUARD_BEGIN
    if (h == nullptr || desc == nullptr || !valid_dtype(desc->dtype)) {
        set_err(err, err_len, "conv_dgrad: no handle, no descriptor or a dtype other than f16/bf16");
        return SDTI_DNN_ERROR;
    }
    const sdti_dnn_conv d = *desc;
    std::unordered_map<int64_t, void *> pack = {
        {UID_Y, const_cast<void *>(dy)}, {UID_W, const_cast<void *>(w)}, {UID_X, dx}};
    auto build = [&](Entry &e) { return conv_graph(CONV_DGRAD, d, h->handle, e); };
    return run(h, conv_key(CONV_DGRAD, d), build, pack, ws, ws_len, ws_needed, err, err_len);
    SDTI_DNN_GUARD_END
}
