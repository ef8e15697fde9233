/*
 * An acquisition-style program linking liblumos: load a model once, then segment a
 * stream of frames as they arrive, checking every status and freeing everything.
 *
 * Frames come from the engine's simulator (standing in for a camera) or from TIFF files:
 *   acquire MODEL.lumos simulate MODALITY N [OUT_DIR]   (MODALITY: ssqpm or qpi)
 *   acquire MODEL.lumos FRAME.tif [FRAME.tif ...]
 * With OUT_DIR, each mask is written as OUT_DIR/mask_NNNN.tif.
 * Prints one line per frame (class fractions, milliseconds) and exits 0 only when every
 * call succeeded.
 *
 * Build: cc -I include bindings/c/acquire.c -L target/release -llumos -Wl,-rpath,$PWD/target/release
 */
#define _POSIX_C_SOURCE 199309L /* clock_gettime */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lumos.h"

/* Reports a failed call with the library's message; evaluates to 1 on failure. */
static int failed(LumosStatus s, const char *what) {
    if (s == LUMOS_STATUS_OK) return 0;
    fprintf(stderr, "acquire: %s failed: %s: %s\n", what, lumos_status_name(s), lumos_last_error_message());
    return 1;
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.lumos simulate MODALITY N [OUT_DIR] | MODEL.lumos FRAME.tif...\n", argv[0]);
        return 2;
    }
    int simulate = strcmp(argv[2], "simulate") == 0;
    if (simulate && argc < 5) {
        fprintf(stderr, "usage: %s MODEL.lumos simulate MODALITY N [OUT_DIR]\n", argv[0]);
        return 2;
    }
    int n_frames = argc - 2;
    if (simulate) {
        char *end = NULL;
        long n = strtol(argv[4], &end, 10);
        if (end == argv[4] || *end != '\0' || n < 1 || n > 100000) {
            fprintf(stderr, "N = '%s': expected a whole number of frames from 1 to 100000\n", argv[4]);
            return 2;
        }
        n_frames = (int)n;
    }
    const char *out_dir = simulate && argc > 5 ? argv[5] : NULL;

    int rc = 1;
    LumosModel *model = NULL;
    LumosCancelToken *cancel = NULL;
    uint8_t *labels = NULL;
    size_t labels_len = 0;
    LumosImage frame = {0}, truth = {0};

    /* once: the model, the tiling, a cancel token the acquisition software could trigger */
    if (failed(lumos_model_load(argv[1], "auto", &model), "loading the model")) goto done;
    LumosModelInfo info;
    if (failed(lumos_model_info(model, &info), "model info")) goto done;
    if (!info.can_segment) {
        fprintf(stderr, "acquire: this model does not segment\n");
        goto done;
    }
    const char *kind = NULL;
    if (failed(lumos_model_kind_name(model, &kind), "model kind")) goto done;
    LumosTileOptions tiling;
    if (failed(lumos_tile_options_default(&tiling), "tile options")) goto done;
    if (failed(lumos_cancel_token_new(&cancel), "cancel token")) goto done;
    printf("model %s: %zu channels, %zu classes, lumos %s\n", kind, info.n_input_channels, info.n_classes,
           lumos_version());

    for (int i = 0; i < n_frames; i++) {
        /* a frame arrives */
        if (simulate) {
            if (failed(lumos_simulate(argv[3], "{\"size\": 128}", (uint64_t)i, &frame, &truth), "simulating a frame"))
                goto done;
        } else if (failed(lumos_image_read_tiff(argv[2 + i], &frame), "reading a frame")) {
            goto done;
        }
        if (frame.channels != info.n_input_channels) {
            fprintf(stderr, "acquire: frame %d has %zu channels; the model takes %zu\n", i, frame.channels,
                    info.n_input_channels);
            goto done;
        }
        size_t n = frame.height * frame.width;
        if (n > labels_len) { /* the label buffer grows only when the frame size does */
            uint8_t *grown = realloc(labels, n);
            if (!grown) {
                fprintf(stderr, "acquire: out of memory\n");
                goto done;
            }
            labels = grown;
            labels_len = n;
        }
        double t0 = now_ms();
        if (failed(lumos_segment(model, frame.data, frame.channels, frame.height, frame.width, &tiling, cancel,
                                 labels, labels_len), "segmenting"))
            goto done;
        double ms = now_ms() - t0;
        size_t counts[256] = {0};
        for (size_t k = 0; k < n; k++) counts[labels[k]]++;
        printf("frame %d: %zux%zu, %.1f ms,", i, frame.height, frame.width, ms);
        for (size_t c = 0; c < info.n_classes; c++) {
            const char *name = NULL;
            if (failed(lumos_model_class_name(model, c, &name), "class name")) goto done;
            printf(" %s %.3f", name, (double)counts[c] / (double)n);
        }
        printf("\n");
        if (out_dir) {
            char path[4096];
            snprintf(path, sizeof path, "%s/mask_%04d.tif", out_dir, i);
            if (failed(lumos_mask_write_tiff(path, labels, frame.height, frame.width), "writing a mask")) goto done;
        }
        lumos_image_free(&frame);
        lumos_image_free(&truth);
    }
    printf("segmented %d frames\n", n_frames);
    rc = 0;

done:
    lumos_image_free(&frame); /* safe on freed or zeroed images */
    lumos_image_free(&truth);
    free(labels);
    lumos_cancel_token_free(cancel); /* NULL is ignored */
    lumos_model_free(model);
    return rc;
}
