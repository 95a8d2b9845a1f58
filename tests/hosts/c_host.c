/*
 * A plugin host in C: loads libsdti with dlopen, as a host loads a plugin, and runs a
 * whole job on the tiny test model: train, export, register the result in an encoder,
 * encode prompts with it, and a few misuses. Given the tiny SDXL model and its reference
 * numbers (made by diffusers/transformers, tests/reference/make_tiny_sdxl.py), it also
 * encodes an SDXL prompt with a two-part word and compares the context and the pooled
 * vector with the reference. Built and run by tests/suite/ffi.rs (also under valgrind).
 *
 * usage: c_host <libsdti.so> <model dir> <output dir> [steps [<sdxl dir> <sdxl expected>]]
 */
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
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
    /* ABI 1.4 */
    sdti_status (*encoder_family)(sdti_encoder *, sdti_family *);
    sdti_status (*encoder_dim)(sdti_encoder *, uint32_t *);
    sdti_status (*encoder_pooled_dim)(sdti_encoder *, uint32_t *);
    sdti_status (*encoder_part_dims)(sdti_encoder *, uint32_t *, size_t, size_t *);
    sdti_status (*encoder_register_vectors)(sdti_encoder *, const char *, const float *, size_t,
                                            size_t);
    sdti_status (*encoder_register_vectors_sdxl)(sdti_encoder *, const char *, const float *,
                                                 size_t, size_t, const float *, size_t, size_t);
    sdti_status (*encoder_encode_pooled)(sdti_encoder *, const char *, float *, size_t, float *,
                                         size_t, size_t *, uint32_t *);
    sdti_status (*encoder_set_clip_layer)(sdti_encoder *, int32_t);
    sdti_status (*encoder_clip_skip)(sdti_encoder *, uint32_t *);
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

/* ---- a minimal safetensors reader for the reference tensors (F32 only) ---- */

/* The named F32 tensor of a safetensors file, malloc'ed; its element count in *count. */
static float *read_tensor(const char *path, const char *name, size_t *count) {
    FILE *f = fopen(path, "rb");
    unsigned char len8[8];
    uint64_t header_len = 0;
    char *header = NULL, key[256], *at, *offsets;
    unsigned long long begin = 0, end = 0;
    float *data = NULL;
    int i;
    if (!f) {
        fprintf(stderr, "cannot open %s\n", path);
        exit(3);
    }
    if (fread(len8, 1, 8, f) != 8) goto bad;
    for (i = 7; i >= 0; i--) header_len = header_len << 8 | len8[i];
    if (header_len == 0 || header_len > 100u * 1024 * 1024) goto bad;
    header = (char *)malloc((size_t)header_len + 1);
    if (!header || fread(header, 1, (size_t)header_len, f) != (size_t)header_len) goto bad;
    header[header_len] = 0;
    snprintf(key, sizeof key, "\"%s\":{", name);
    at = strstr(header, key);
    if (!at || !strstr(at, "\"dtype\":\"F32\"")) goto bad;
    offsets = strstr(at, "\"data_offsets\":[");
    if (!offsets || sscanf(offsets, "\"data_offsets\":[%llu,%llu]", &begin, &end) != 2) goto bad;
    if (end < begin || (end - begin) % 4 != 0) goto bad;
    *count = (size_t)((end - begin) / 4);
    data = (float *)malloc((size_t)(end - begin));
    if (!data || fseek(f, (long)(8 + header_len + begin), SEEK_SET) != 0 ||
        fread(data, 4, *count, f) != *count)
        goto bad;
    /* safetensors is little-endian, as are the machines these tests run on. */
    free(header);
    fclose(f);
    return data;
bad:
    fprintf(stderr, "%s: no F32 tensor %s\n", path, name);
    exit(3);
}

/* sqrt(sum (a-b)^2 / sum b^2), the suite's relative error; *max_abs gets max |a-b|. */
static double rel_err(const float *a, const float *b, size_t n, double *max_abs) {
    double diff = 0, norm = 0;
    size_t i;
    *max_abs = 0;
    for (i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        if (!isfinite(a[i])) return 1e30;
        diff += d * d;
        norm += (double)b[i] * b[i];
        if (fabs(d) > *max_abs) *max_abs = fabs(d);
    }
    return sqrt(diff / (norm > 0 ? norm : 1e-300));
}

/* Encodes the reference prompt on the tiny SDXL model with the reference's learned word and
 * compares the context [77, 32 + 48] and the pooled vector [48] with diffusers' numbers. */
static void sdxl_job(const char *model_dir, const char *expected) {
    sdti_model_params model;
    sdti_encoder *enc = NULL;
    sdti_family family = 0;
    uint32_t dim = 0, pooled_dim = 0, dims[2] = {0, 0}, rows = 0, skip = 0;
    size_t n_l, n_g, n_ctx, n_pooled, parts = 0, needed = 0, i;
    float *l = read_tensor(expected, "te.vectors_l", &n_l);
    float *g = read_tensor(expected, "te.vectors_g", &n_g);
    float *want_ctx = read_tensor(expected, "te.context", &n_ctx);
    float *want_pooled = read_tensor(expected, "te2.pooled_eos", &n_pooled);
    float *ctx = NULL, *pooled = NULL, small_pooled[4];
    double e_ctx, e_pooled, max_ctx, max_pooled, e_last, max_last;
    const char *prompt = "a photo of a sks toy";

    check(api.has_feature("sdti.model.sdxl/1") == 1, "has sdti.model.sdxl/1");
    expect(api.model_params_init(&model), SDTI_OK, "sdxl model_params_init");
    model.model_path = model_dir;
    expect(api.encoder_new(&model, &enc), SDTI_OK, "sdxl encoder_new");
    if (!enc) exit(1);
    expect(api.encoder_family(enc, &family), SDTI_OK, "sdxl family");
    expect(api.encoder_dim(enc, &dim), SDTI_OK, "sdxl dim");
    expect(api.encoder_pooled_dim(enc, &pooled_dim), SDTI_OK, "sdxl pooled dim");
    expect(api.encoder_part_dims(enc, NULL, 0, &parts), SDTI_ERR_BUFFER_TOO_SMALL,
           "part dims size query");
    expect(api.encoder_part_dims(enc, dims, 2, &parts), SDTI_OK, "part dims");
    expect(api.encoder_clip_skip(enc, &skip), SDTI_OK, "sdxl clip skip");
    printf("  sdxl: family %u, context %u wide (parts %u + %u), pooled %u, clip skip %u\n",
           family, dim, dims[0], dims[1], pooled_dim, skip);
    check(family == SDTI_FAMILY_SDXL, "family SDXL");
    check(parts == 2 && dims[0] == 32 && dims[1] == 48 && dim == 80, "tiny SDXL widths 32 + 48");
    check(pooled_dim == 48, "pooled 48 wide");
    check(skip == 2, "SDXL's penultimate layers by default");
    check(n_l == 2 * 32 && n_g == 2 * 48 && n_ctx == 77 * 80 && n_pooled == 48,
          "reference shapes");

    /* Misuse: unequal row counts, a one-part word, a wrong width. */
    expect(api.encoder_register_vectors_sdxl(enc, "sks", l, 2, 32, g, 1, 48),
           SDTI_ERR_INVALID_ARGUMENT, "clip_l 2 rows, clip_g 1");
    expect(api.encoder_register_vectors_sdxl(enc, "sks", l, 2, 48, g, 2, 32),
           SDTI_ERR_INVALID_ARGUMENT, "widths swapped");
    expect(api.encoder_register_vectors(enc, "sks", l, 2, 32), SDTI_ERR_INVALID_ARGUMENT,
           "one-part word on SDXL");
    expect(api.encoder_register_vectors_sdxl(enc, "sks", l, 2, 32, g, 2, 48), SDTI_OK,
           "register sks (clip_l, clip_g)");

    expect(api.encoder_encode_pooled(enc, prompt, NULL, 0, NULL, 0, &needed, &rows),
           SDTI_ERR_BUFFER_TOO_SMALL, "encode_pooled size query");
    check(needed == 77 * 80 && rows == 77, "one chunk of 77 rows, 80 wide");
    ctx = (float *)malloc(needed * sizeof(float));
    pooled = (float *)malloc(pooled_dim * sizeof(float));
    if (!ctx || !pooled) exit(3);
    expect(api.encoder_encode_pooled(enc, prompt, ctx, needed, small_pooled, 4, &needed, &rows),
           SDTI_ERR_BUFFER_TOO_SMALL, "pooled buffer of 4 floats");
    expect(api.encoder_encode_pooled(enc, prompt, ctx, needed, pooled, pooled_dim, &needed,
                                     &rows),
           SDTI_OK, "encode_pooled");
    e_ctx = rel_err(ctx, want_ctx, n_ctx, &max_ctx);
    e_pooled = rel_err(pooled, want_pooled, n_pooled, &max_pooled);
    printf("  sdxl \"%s\": context rel err %.2e (max |diff| %.2e), pooled rel err %.2e "
           "(max |diff| %.2e)\n",
           prompt, e_ctx, max_ctx, e_pooled, max_pooled);
    check(e_ctx <= 1e-5, "context equals te.context");
    check(e_pooled <= 1e-5, "pooled equals te2.pooled_eos");

    /* ComfyUI's CLIPSetLastLayer(-1): the last layers, another context; 0 restores -2. */
    expect(api.encoder_set_clip_layer(enc, -1), SDTI_OK, "clip layer -1");
    expect(api.encoder_encode_pooled(enc, prompt, ctx, needed, pooled, pooled_dim, &needed,
                                     &rows),
           SDTI_OK, "encode at layer -1");
    e_last = rel_err(ctx, want_ctx, n_ctx, &max_last);
    check(e_last > 1e-2, "layer -1 is not the penultimate layer");
    expect(api.encoder_set_clip_layer(enc, -99), SDTI_ERR_INVALID_ARGUMENT, "clip layer -99");
    expect(api.encoder_set_clip_layer(enc, 0), SDTI_OK, "clip layer 0 (the family's)");
    expect(api.encoder_clip_skip(enc, &skip), SDTI_OK, "clip skip after reset");
    check(skip == 2, "reset to the family's 2");
    expect(api.encoder_encode_pooled(enc, prompt, ctx, needed, pooled, pooled_dim, &needed,
                                     &rows),
           SDTI_OK, "encode after reset");
    e_ctx = rel_err(ctx, want_ctx, n_ctx, &max_ctx);
    check(e_ctx <= 1e-5, "reset gives te.context again");
    for (i = 0; i < pooled_dim; i++) check(isfinite(pooled[i]), "finite pooled");

    api.encoder_free(enc);
    free(l);
    free(g);
    free(want_ctx);
    free(want_pooled);
    free(ctx);
    free(pooled);
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
    LOAD(encoder_family, "sdti_encoder_family");
    LOAD(encoder_dim, "sdti_encoder_dim");
    LOAD(encoder_pooled_dim, "sdti_encoder_pooled_dim");
    LOAD(encoder_part_dims, "sdti_encoder_part_dims");
    LOAD(encoder_register_vectors, "sdti_encoder_register_vectors");
    LOAD(encoder_register_vectors_sdxl, "sdti_encoder_register_vectors_sdxl");
    LOAD(encoder_encode_pooled, "sdti_encoder_encode_pooled");
    LOAD(encoder_set_clip_layer, "sdti_encoder_set_clip_layer");
    LOAD(encoder_clip_skip, "sdti_encoder_clip_skip");

    /* A host checks the major version first. */
    if ((api.abi_version() >> 16) != SDTI_ABI_MAJOR || (api.abi_version() & 0xffff) < 4) {
        fprintf(stderr, "ABI %u.%u, this host needs %d.4 or later\n", api.abi_version() >> 16,
                api.abi_version() & 0xffff, SDTI_ABI_MAJOR);
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
    {
        /* SD 1.x has no pooled vector: width 0, and a pooled buffer is refused. */
        uint32_t pooled_dim = 99;
        sdti_family family = 0;
        float pooled[4];
        size_t needed = 0;
        expect(api.encoder_pooled_dim(from_file, &pooled_dim), SDTI_OK, "sd1 pooled dim");
        expect(api.encoder_family(from_file, &family), SDTI_OK, "sd1 family");
        check(pooled_dim == 0 && family == SDTI_FAMILY_SD1, "SD 1.x: no pooled vector");
        expect(api.encoder_encode_pooled(from_file, "sks", NULL, 0, pooled, 4, &needed, NULL),
               SDTI_ERR_UNSUPPORTED, "pooled buffer on an SD 1.x encoder");
    }

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
    if (argc > 6) sdxl_job(argv[5], argv[6]);
    dlclose(lib);
    if (failures) {
        fprintf(stderr, "c host: %d failure(s)\n", failures);
        return 1;
    }
    printf("c host: ok\n");
    return 0;
}
