// A C++17 host that links libsdti directly (-lsdti) and owns its handles with
// std::unique_ptr. Built and run by tests/suite/ffi.rs.
//
// usage: cpp_host <model dir> <output dir>
#include <cmath>
#include <cstdio>
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
        std::printf("cpp host: ok (%u rows, %zu floats, loss %.4f)\n", rows, needed, stats.loss);
    } catch (const std::exception &e) {
        std::fprintf(stderr, "cpp host failed: %s\n", e.what());
        return 1;
    }
    return 0;
}
