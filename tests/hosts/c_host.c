/*
 * A plugin host in C: loads libsdti with dlopen, as a host loads a plugin, and runs a
 * whole job on the tiny test model: train, export, register the result in an encoder,
 * encode prompts with it, and a few misuses. Built and run by tests/suite/ffi.rs (also
 * under valgrind).
 *
 * usage: c_host <libsdti.so> <model dir> <output dir> [steps]
 */
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sdti.h"

/* The functions this host uses, looked up by name. */
static struct {
    uint32_t (*abi_version)(void);
    const char *(*version_string)(void);
    int32_t (*has_feature)(const char *);
    const char *(*status_str)(sdti_status);
    sdti_status (*last_error)(char *, size_t, size_t *);
    sdti_status (*trainer_params_init)(sdti_trainer_params *);
    sdti_status (*trainer_new)(const sdti_trainer_params *, sdti_trainer **);
    sdti_status (*trainer_add_image)(sdti_trainer *, const uint8_t *, uint32_t, uint32_t, size_t,
                                     uint32_t, const char *);
    sdti_status (*trainer_step)(sdti_trainer *, uint32_t, sdti_step_stats *);
    void (*trainer_cancel)(sdti_trainer *);
    sdti_status (*trainer_export)(sdti_trainer *, const char *, uint32_t);
    void (*trainer_free)(sdti_trainer *);
    sdti_status (*model_params_init)(sdti_model_params *);
    sdti_status (*encoder_new)(const sdti_model_params *, sdti_encoder **);
    sdti_status (*encoder_new_from_trainer)(sdti_trainer *, sdti_encoder **);
    sdti_status (*encoder_register_token)(sdti_encoder *, const char *, const char *);
    sdti_status (*encoder_encode)(sdti_encoder *, const char *, float *, size_t, size_t *,
                                  uint32_t *);
    void (*encoder_free)(sdti_encoder *);
} api;

static void *lib;
static int failures;

/* dlsym returns an object pointer; copying its bytes into a function pointer is the
 * conversion POSIX guarantees and ISO C does not forbid. */
static void load(void *dst, size_t size, const char *name) {
    void *sym = dlsym(lib, name);
    if (!sym) {
        fprintf(stderr, "missing symbol %s\n", name);
        exit(2);
    }
    memcpy(dst, &sym, size);
}
#define LOAD(field, name) load(&api.field, sizeof api.field, name)

static void check(int ok, const char *what) {
    if (!ok) {
        char msg[512];
        api.last_error(msg, sizeof msg, NULL);
        fprintf(stderr, "FAILED: %s (last error: %s)\n", what, msg);
        failures++;
    }
}

static void expect(sdti_status got, sdti_status want, const char *what) {
    char msg[512];
    size_t needed = 0;
    if (got != want) {
        api.last_error(msg, sizeof msg, NULL);
        fprintf(stderr, "FAILED: %s: got %d (%s), want %d (%s); last error: %s\n", what, got,
                api.status_str(got), want, api.status_str(want), msg);
        failures++;
        return;
    }
    if (want != SDTI_OK) {
        api.last_error(msg, sizeof msg, &needed);
        check(needed > 1, "a failure leaves a message");
        printf("  %-40s -> %s: %s\n", what, api.status_str(got), msg);
    }
}

/* A 64x64 picture: a disc on a background; k moves the disc. */
static void picture(uint8_t *px, int k, size_t stride, int channels) {
    int x, y;
    for (y = 0; y < 64; y++) {
        for (x = 0; x < 64; x++) {
            uint8_t *p = px + (size_t)y * stride + (size_t)x * (size_t)channels;
            int dx = x - 32 - 3 * k, dy = y - 30;
            int inside = dx * dx + dy * dy < 300;
            p[0] = (uint8_t)(inside ? 220 : 30 + 20 * k);
            p[1] = (uint8_t)(inside ? 60 : 90);
            p[2] = (uint8_t)(inside ? 40 : 160 - x);
            if (channels == 4) p[3] = 255;
        }
    }
}

static int progress_calls;
static int32_t on_progress(void *user_data, const sdti_progress *p) {
    int *calls = (int *)user_data;
    (*calls)++;
    return p->struct_size >= sizeof(sdti_progress) && isfinite(p->loss) ? 0 : 1;
}

static float *encode(sdti_encoder *enc, const char *prompt, uint32_t *rows) {
    size_t needed = 0;
    float *out;
    expect(api.encoder_encode(enc, prompt, NULL, 0, &needed, rows), SDTI_ERR_BUFFER_TOO_SMALL,
           "encode size query");
    out = (float *)malloc(needed * sizeof(float));
    if (!out) exit(3);
    expect(api.encoder_encode(enc, prompt, out, needed, &needed, rows), SDTI_OK, "encode");
    return out;
}

int main(int argc, char **argv) {
    sdti_trainer_params params;
    sdti_model_params model;
    sdti_step_stats stats;
    sdti_trainer *trainer = NULL;
    sdti_encoder *from_file = NULL, *from_trainer = NULL;
    uint8_t *rgb, *rgba;
    char path_pt[1024], path_st[1024], bad_path[1024];
    uint32_t rows = 0, rows2 = 0, steps = 3, i;
    float *a, *b, diff = 0;
    size_t stride_rgba = 64 * 4 + 12; /* padded rows */

    if (argc < 4) {
        fprintf(stderr, "usage: %s <libsdti> <model> <outdir> [steps]\n", argv[0]);
        return 2;
    }
    if (argc > 4) steps = (uint32_t)atoi(argv[4]);
    lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 2;
    }
    LOAD(abi_version, "sdti_abi_version");
    LOAD(version_string, "sdti_version_string");
    LOAD(has_feature, "sdti_has_feature");
    LOAD(status_str, "sdti_status_str");
    LOAD(last_error, "sdti_last_error");
    LOAD(trainer_params_init, "sdti_trainer_params_init");
    LOAD(trainer_new, "sdti_trainer_new");
    LOAD(trainer_add_image, "sdti_trainer_add_image");
    LOAD(trainer_step, "sdti_trainer_step");
    LOAD(trainer_cancel, "sdti_trainer_cancel");
    LOAD(trainer_export, "sdti_trainer_export");
    LOAD(trainer_free, "sdti_trainer_free");
    LOAD(model_params_init, "sdti_model_params_init");
    LOAD(encoder_new, "sdti_encoder_new");
    LOAD(encoder_new_from_trainer, "sdti_encoder_new_from_trainer");
    LOAD(encoder_register_token, "sdti_encoder_register_token");
    LOAD(encoder_encode, "sdti_encoder_encode");
    LOAD(encoder_free, "sdti_encoder_free");

    /* A host checks the major version first. */
    if ((api.abi_version() >> 16) != SDTI_ABI_MAJOR) {
        fprintf(stderr, "ABI major %u, this host needs %d\n", api.abi_version() >> 16,
                SDTI_ABI_MAJOR);
        return 2;
    }
    printf("sdti %s, ABI %u.%u\n", api.version_string(), api.abi_version() >> 16,
           api.abi_version() & 0xffff);
    check(api.has_feature("sdti.train/1") == 1, "has sdti.train/1");
    check(api.has_feature("sdti.train/99") == 0, "lacks sdti.train/99");

    expect(api.trainer_params_init(&params), SDTI_OK, "params_init");
    params.model_path = argv[2];
    params.token = "sks";
    params.init_text = "toy";
    params.vectors = 2;
    params.resolution = 64;
    params.max_steps = 100;
    params.seed = 7;
    params.progress = on_progress;
    params.progress_user_data = &progress_calls;
    expect(api.trainer_new(&params, &trainer), SDTI_OK, "trainer_new");
    if (!trainer) return 1;

    rgb = (uint8_t *)malloc(64 * 64 * 3);
    rgba = (uint8_t *)calloc(64, stride_rgba);
    if (!rgb || !rgba) return 3;
    picture(rgb, 0, 64 * 3, 3);
    picture(rgba, 1, stride_rgba, 4);
    expect(api.trainer_add_image(trainer, rgb, 64, 64, 0, SDTI_PIXEL_RGB8, NULL), SDTI_OK,
           "add RGB8 image");
    expect(api.trainer_add_image(trainer, rgba, 64, 64, stride_rgba, SDTI_PIXEL_RGBA8,
                                 "a red disc"),
           SDTI_OK, "add RGBA8 image with stride and caption");
    free(rgb); /* the library copied the pixels */
    free(rgba);

    memset(&stats, 0, sizeof stats);
    stats.struct_size = sizeof stats;
    expect(api.trainer_step(trainer, steps, &stats), SDTI_OK, "step");
    printf("  steps %u, step %llu of %llu, loss %.5f, lr %g, %.2f s, %d callbacks\n",
           stats.steps_done, (unsigned long long)stats.step,
           (unsigned long long)stats.total_steps, stats.loss, stats.learning_rate,
           stats.seconds, progress_calls);
    check(stats.steps_done == steps && (int)steps == progress_calls, "every step reported");
    check(isfinite(stats.loss) && stats.loss > 0, "finite loss");

    snprintf(path_pt, sizeof path_pt, "%s/sks.pt", argv[3]);
    snprintf(path_st, sizeof path_st, "%s/sks-diffusers.safetensors", argv[3]);
    expect(api.trainer_export(trainer, path_pt, SDTI_FORMAT_AUTO), SDTI_OK, "export .pt");
    expect(api.trainer_export(trainer, path_st, SDTI_FORMAT_DIFFUSERS_SAFETENSORS), SDTI_OK,
           "export diffusers");

    /* The exported file, registered under its stem, in an encoder of its own... */
    expect(api.model_params_init(&model), SDTI_OK, "model_params_init");
    model.model_path = argv[2];
    expect(api.encoder_new(&model, &from_file), SDTI_OK, "encoder_new");
    expect(api.encoder_register_token(from_file, NULL, path_pt), SDTI_OK, "register .pt");
    a = encode(from_file, "a photo of embedding:sks", &rows);
    /* ...equals the trainer's word in an encoder sharing the trainer's model. */
    expect(api.encoder_new_from_trainer(trainer, &from_trainer), SDTI_OK, "encoder from trainer");
    b = encode(from_trainer, "a photo of <sks>", &rows2);
    check(rows == 77 && rows2 == 77, "one chunk of 77 rows");
    for (i = 0; i < rows * 32 && rows == rows2; i++) {
        float d = fabsf(a[i] - b[i]);
        if (!isfinite(a[i])) diff = 1e30f;
        if (d > diff) diff = d;
    }
    printf("  encoded %u rows; file vs trainer max |diff| %g\n", rows, (double)diff);
    check(diff < 1e-5f, "the exported word encodes as the trainer's word");
    free(a);
    free(b);

    /* Misuse: each gets its status and a message, nothing crashes or leaks. */
    expect(api.trainer_new(NULL, &trainer), SDTI_ERR_INVALID_ARGUMENT, "trainer_new(NULL)");
    params.struct_size = 8;
    expect(api.trainer_new(&params, &trainer), SDTI_ERR_STRUCT_SIZE, "struct_size 8");
    snprintf(bad_path, sizeof bad_path, "%s/no/such/dir/x.pt", argv[3]);
    expect(api.trainer_export(trainer, bad_path, SDTI_FORMAT_AUTO), SDTI_ERR_IO,
           "export to a missing folder");
    expect(api.trainer_export(trainer, path_pt, 77), SDTI_ERR_INVALID_ARGUMENT,
           "export format 77");
    expect(api.trainer_export(trainer, path_pt, SDTI_FORMAT_AUTO), SDTI_ERR_EXISTS,
           "export over an existing file (ABI 1.2)");
    api.trainer_cancel(trainer);
    api.trainer_cancel(trainer);
    expect(api.trainer_step(trainer, 1, &stats), SDTI_CANCELLED, "step after cancel twice");
    check(stats.steps_done == 0, "a cancelled step did nothing");
    expect(api.trainer_step(trainer, 1, NULL), SDTI_OK, "the next step runs");

    api.trainer_free(trainer);
    api.trainer_free(trainer); /* freed already: a no-op */
    api.trainer_free(NULL);
    /* The encoder from the trainer keeps the shared model alive. */
    a = encode(from_trainer, "sks", &rows);
    free(a);
    api.encoder_free(from_trainer);
    api.encoder_free(from_file);
    api.encoder_free(NULL);
    expect(api.encoder_encode(from_file, "x", NULL, 0, NULL, NULL), SDTI_ERR_INVALID_HANDLE,
           "encode on a freed encoder");
    dlclose(lib);
    if (failures) {
        fprintf(stderr, "c host: %d failure(s)\n", failures);
        return 1;
    }
    printf("c host: ok\n");
    return 0;
}
