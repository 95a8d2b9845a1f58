// A C++17 host that links libsdti directly (-lsdti) and owns its handles with
// std::unique_ptr. Given the tiny SDXL model and its reference numbers (diffusers,
// tests/reference/make_tiny_sdxl.py), it also encodes an SDXL prompt with a two-part word
// and checks the context and the pooled vector. Built and run by tests/suite/ffi.rs.
//
// usage: cpp_host <model dir> <output dir> [<sdxl dir> <sdxl expected.safetensors>]
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "sdti.h"

namespace {

struct TrainerFree {
    void operator()(sdti_trainer *t) const { sdti_trainer_free(t); }
};
struct EncoderFree {
    void operator()(sdti_encoder *e) const { sdti_encoder_free(e); }
};
using Trainer = std::unique_ptr<sdti_trainer, TrainerFree>;
using Encoder = std::unique_ptr<sdti_encoder, EncoderFree>;

// Turns a status into an exception carrying this thread's last error.
void ok(sdti_status status, const char *what) {
    if (status == SDTI_OK) return;
    size_t needed = 0;
    sdti_last_error(nullptr, 0, &needed);
    std::string message(needed, '\0');
    sdti_last_error(message.data(), message.size(), nullptr);
    message.resize(needed > 0 ? needed - 1 : 0);
    throw std::runtime_error(std::string(what) + ": " + sdti_status_str(status) + ": " + message);
}

// The named F32 tensor of a safetensors file (a minimal reader: the header is searched,
// not parsed, which the reference file's plain layout allows).
std::vector<float> read_tensor(const std::string &path, const std::string &name) {
    std::ifstream f(path, std::ios::binary);
    unsigned char len8[8] = {};
    if (!f.read(reinterpret_cast<char *>(len8), 8)) throw std::runtime_error("read " + path);
    std::uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = header_len << 8 | len8[i];
    if (header_len == 0 || header_len > (100u << 20)) throw std::runtime_error("header " + path);
    std::string header(header_len, '\0');
    if (!f.read(header.data(), static_cast<std::streamsize>(header_len)))
        throw std::runtime_error("header " + path);
    const auto at = header.find("\"" + name + "\":{");
    const auto offsets = header.find("\"data_offsets\":[", at);
    if (at == std::string::npos || offsets == std::string::npos ||
        header.find("\"dtype\":\"F32\"", at) > offsets)
        throw std::runtime_error(path + ": no F32 tensor " + name);
    unsigned long long begin = 0, end = 0;
    if (std::sscanf(header.c_str() + offsets, "\"data_offsets\":[%llu,%llu]", &begin, &end) != 2 ||
        end < begin || (end - begin) % 4 != 0)
        throw std::runtime_error(path + ": offsets of " + name);
    std::vector<float> data((end - begin) / 4);
    f.seekg(static_cast<std::streamoff>(8 + header_len + begin));
    if (!f.read(reinterpret_cast<char *>(data.data()), static_cast<std::streamsize>(end - begin)))
        throw std::runtime_error(path + ": data of " + name);
    return data;
}

// The suite's relative error: sqrt(sum (a-b)^2 / sum b^2).
double rel_err(const std::vector<float> &a, const std::vector<float> &b) {
    if (a.size() != b.size()) return 1e30;
    double diff = 0, norm = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        const double d = double(a[i]) - double(b[i]);
        if (!std::isfinite(a[i])) return 1e30;
        diff += d * d;
        norm += double(b[i]) * double(b[i]);
    }
    return std::sqrt(diff / (norm > 0 ? norm : 1e-300));
}

void sdxl_job(const char *model_dir, const char *expected) {
    sdti_model_params params;
    ok(sdti_model_params_init(&params), "model_params_init");
    params.model_path = model_dir;
    sdti_encoder *raw = nullptr;
    ok(sdti_encoder_new(&params, &raw), "sdxl encoder_new");
    Encoder encoder(raw);
    sdti_family family = 0;
    uint32_t dim = 0, pooled_dim = 0;
    ok(sdti_encoder_family(encoder.get(), &family), "family");
    ok(sdti_encoder_dim(encoder.get(), &dim), "dim");
    ok(sdti_encoder_pooled_dim(encoder.get(), &pooled_dim), "pooled_dim");
    if (family != SDTI_FAMILY_SDXL || dim != 80 || pooled_dim != 48)
        throw std::runtime_error("tiny SDXL: family 3, context 80, pooled 48 expected");
    const auto l = read_tensor(expected, "te.vectors_l");
    const auto g = read_tensor(expected, "te.vectors_g");
    const auto want_context = read_tensor(expected, "te.context");
    const auto want_pooled = read_tensor(expected, "te2.pooled_eos");
    ok(sdti_encoder_register_vectors_sdxl(encoder.get(), "sks", l.data(), l.size() / 32, 32,
                                          g.data(), g.size() / 48, 48),
       "register_vectors_sdxl");
    const char *prompt = "a photo of a sks toy";
    size_t needed = 0;
    uint32_t rows = 0;
    if (sdti_encoder_encode_pooled(encoder.get(), prompt, nullptr, 0, nullptr, 0, &needed, &rows) !=
        SDTI_ERR_BUFFER_TOO_SMALL)
        throw std::runtime_error("encode_pooled size query");
    std::vector<float> context(needed), pooled(pooled_dim);
    ok(sdti_encoder_encode_pooled(encoder.get(), prompt, context.data(), context.size(),
                                  pooled.data(), pooled.size(), &needed, &rows),
       "encode_pooled");
    const double e_context = rel_err(context, want_context);
    const double e_pooled = rel_err(pooled, want_pooled);
    std::printf("cpp host sdxl: context [%u, %u] rel err %.2e, pooled [%u] rel err %.2e\n", rows,
                dim, e_context, pooled_dim, e_pooled);
    if (!(e_context <= 1e-5) || !(e_pooled <= 1e-5))
        throw std::runtime_error("SDXL context or pooled vector differs from the reference");
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s <model> <outdir>\n", argv[0]);
        return 2;
    }
    try {
        if ((sdti_abi_version() >> 16) != SDTI_ABI_MAJOR) throw std::runtime_error("ABI major");
        sdti_trainer_params params;
        ok(sdti_trainer_params_init(&params), "params_init");
        params.model_path = argv[1];
        params.token = "cpp-word";
        params.resolution = 64;
        params.max_steps = 10;
        params.seed = 3;
        sdti_trainer *raw = nullptr;
        ok(sdti_trainer_new(&params, &raw), "trainer_new");
        Trainer trainer(raw);

        std::vector<uint8_t> pixels(48 * 40 * 3);
        for (size_t i = 0; i < pixels.size(); ++i) pixels[i] = static_cast<uint8_t>(i * 7 % 251);
        ok(sdti_trainer_add_image(trainer.get(), pixels.data(), 48, 40, 0, SDTI_PIXEL_RGB8,
                                  nullptr),
           "add_image");
        sdti_step_stats stats{};
        stats.struct_size = sizeof stats;
        ok(sdti_trainer_step(trainer.get(), 2, &stats), "step");
        if (stats.steps_done != 2 || !std::isfinite(stats.loss)) throw std::runtime_error("stats");

        const std::string out = std::string(argv[2]) + "/cpp-word.safetensors";
        ok(sdti_trainer_export(trainer.get(), out.c_str(), SDTI_FORMAT_SAFETENSORS), "export");

        sdti_encoder *enc_raw = nullptr;
        ok(sdti_encoder_new_from_trainer(trainer.get(), &enc_raw), "encoder_new_from_trainer");
        Encoder encoder(enc_raw);
        trainer.reset();  // the encoder keeps the shared model

        const char *prompt = "a photo of cpp-word";
        size_t slots = 0;
        sdti_status st = sdti_encoder_tokenize(encoder.get(), prompt, nullptr, nullptr, nullptr,
                                               0, &slots);
        if (st != SDTI_ERR_BUFFER_TOO_SMALL || slots != 77) throw std::runtime_error("tokenize size");
        std::vector<uint32_t> ids(slots);
        std::vector<int32_t> words(slots), vecs(slots);
        ok(sdti_encoder_tokenize(encoder.get(), prompt, ids.data(), words.data(), vecs.data(),
                                 slots, &slots),
           "tokenize");
        int learned = 0;
        for (size_t i = 0; i < slots; ++i) learned += words[i] == 0 ? 1 : 0;
        if (learned != 1) throw std::runtime_error("one learned slot expected");

        size_t needed = 0;
        uint32_t rows = 0;
        sdti_encoder_encode(encoder.get(), prompt, nullptr, 0, &needed, &rows);
        std::vector<float> states(needed);
        ok(sdti_encoder_encode(encoder.get(), prompt, states.data(), states.size(), &needed, &rows),
           "encode");
        for (float v : states)
            if (!std::isfinite(v)) throw std::runtime_error("non-finite hidden state");
        if (argc > 4) sdxl_job(argv[3], argv[4]);
        std::printf("cpp host: ok (%u rows, %zu floats, loss %.4f)\n", rows, needed, stats.loss);
    } catch (const std::exception &e) {
        std::fprintf(stderr, "cpp host failed: %s\n", e.what());
        return 1;
    }
    return 0;
}
