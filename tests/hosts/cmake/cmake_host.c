/*
 * A host built with CMake against the installed package (find_package(sdti CONFIG),
 * target sdti::sdti; see CMakeLists.txt beside it): checks the ABI version, encodes a
 * prompt with a model's text encoder and writes the hidden states as raw little-endian
 * f32 for the test to compare with the reference. Built and run by tests/suite/cmake.rs.
 *
 * usage: cmake_host <model> <prompt> <out.f32>
 */
#include <stdio.h>
#include <stdlib.h>

#include <sdti.h>

static void fail(const char *what, sdti_status rc) {
    char msg[1024];
    sdti_last_error(msg, sizeof msg, NULL);
    fprintf(stderr, "cmake host: %s: %s: %s\n", what, sdti_status_str(rc), msg);
    exit(1);
}

int main(int argc, char **argv) {
    uint32_t abi = sdti_abi_version();
    sdti_model_params params;
    sdti_encoder *encoder = NULL;
    sdti_status rc;
    size_t needed = 0;
    uint32_t rows = 0;
    float *states;
    FILE *out;

    if (argc != 4) {
        fprintf(stderr, "usage: cmake_host <model> <prompt> <out.f32>\n");
        return 2;
    }
    /* The library must implement at least the ABI this host was compiled against. */
    if (abi >> 16 != SDTI_ABI_MAJOR || (abi & 0xffff) < SDTI_ABI_MINOR) {
        fprintf(stderr, "cmake host: library ABI %u.%u, compiled against %u.%u\n", abi >> 16,
                abi & 0xffff, (unsigned)SDTI_ABI_MAJOR, (unsigned)SDTI_ABI_MINOR);
        return 1;
    }
    printf("cmake host: sdti %s, ABI %u.%u\n", sdti_version_string(), abi >> 16, abi & 0xffff);

    rc = sdti_model_params_init(&params);
    if (rc != SDTI_OK) fail("sdti_model_params_init", rc);
    params.model_path = argv[1];
    rc = sdti_encoder_new(&params, &encoder);
    if (rc != SDTI_OK) fail("sdti_encoder_new", rc);

    /* A size query first (no buffer), then the encoding. */
    rc = sdti_encoder_encode(encoder, argv[2], NULL, 0, &needed, &rows);
    if (rc != SDTI_ERR_BUFFER_TOO_SMALL || needed == 0 || rows == 0)
        fail("sdti_encoder_encode size query", rc);
    states = (float *)malloc(needed * sizeof *states);
    if (!states) {
        fprintf(stderr, "cmake host: out of memory\n");
        return 1;
    }
    rc = sdti_encoder_encode(encoder, argv[2], states, needed, NULL, NULL);
    if (rc != SDTI_OK) fail("sdti_encoder_encode", rc);
    printf("cmake host: encoded %u rows of %u\n", rows, (unsigned)(needed / rows));

    out = fopen(argv[3], "wb");
    if (!out || fwrite(states, sizeof *states, needed, out) != needed || fclose(out) != 0) {
        fprintf(stderr, "cmake host: cannot write %s\n", argv[3]);
        return 1;
    }
    free(states);
    sdti_encoder_free(encoder);

    /* A failure comes back as a status with its detail, and the handle stays NULL. */
    params.model_path = "no-such-model";
    rc = sdti_encoder_new(&params, &encoder);
    if (rc == SDTI_OK) {
        fprintf(stderr, "cmake host: a missing model was accepted\n");
        return 1;
    }
    printf("cmake host: missing model -> %s\n", sdti_status_str(rc));
    printf("cmake host: ok\n");
    return 0;
}
