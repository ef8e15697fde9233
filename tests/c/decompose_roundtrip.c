/* muSplit decomposition through the C API, across processes:
 *   decompose_roundtrip train     DATA_DIR MODEL_PATH IMAGE_TIF OUT_BIN
 *     trains a (tiny) LC hierarchical VAE with lumos_train, saves it, decomposes the
 *     single-channel IMAGE_TIF with the model still in memory (2 posterior samples,
 *     seed 3) and writes the (2, H, W) floats to OUT_BIN;
 *   decompose_roundtrip decompose MODEL_PATH IMAGE_TIF OUT_BIN
 *     loads the saved model in a fresh process and decomposes the same TIFF.
 * The Rust test compares the two outputs byte for byte. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lumos.h"

static const char *CONFIG =
    "{\"kind\": \"musplit\","
    " \"musplit\": {\"variant\": \"hvae\", \"levels\": 3, \"lc_levels\": 2, \"base_channels\": 4,"
    "              \"max_channels\": 4, \"z_dim\": 2},"
    " \"epochs\": 2, \"iterations_per_epoch\": 3, \"batch_size\": 2, \"patch_size\": [16, 16],"
    " \"val_fraction\": 0.0, \"seed\": 11, \"device\": \"cpu\"}";

static int check(LumosStatus s, const char *what) {
    if (s != LUMOS_STATUS_OK) {
        fprintf(stderr, "%s failed: %s: %s\n", what, lumos_status_name((uint32_t)s), lumos_last_error_message());
        return 1;
    }
    return 0;
}

static int decompose_to_file(const LumosModel *model, const char *image_path, const char *out_path) {
    LumosModelInfo info;
    if (check(lumos_model_info(model, &info), "lumos_model_info")) return 1;
    if (info.kind != LUMOS_MODEL_KIND_MUSPLIT || info.n_input_channels != 1 || info.n_classes != 2 ||
        !info.can_decompose || info.can_segment) {
        fprintf(stderr, "unexpected model info: kind %u\n", (unsigned)info.kind);
        return 1;
    }
    LumosImage img;
    memset(&img, 0, sizeof img);
    if (check(lumos_image_read_tiff(image_path, &img), "lumos_image_read_tiff")) return 1;
    int rc = 1;
    size_t n = img.height * img.width;
    float *out = (float *)malloc(2 * n * sizeof(float));
    uint8_t *labels = (uint8_t *)malloc(n);
    LumosDecomposeOptions opts;
    if (img.channels != 1) {
        fprintf(stderr, "expected a 1-channel TIFF, got %zu channels\n", img.channels);
        goto done;
    }
    /* a decomposition model does not segment, and says so */
    if (lumos_segment(model, img.data, 1, img.height, img.width, NULL, NULL, labels, n) != LUMOS_STATUS_UNSUPPORTED) {
        fprintf(stderr, "lumos_segment on a musplit model did not return UNSUPPORTED\n");
        goto done;
    }
    /* too small an output buffer */
    if (lumos_decompose(model, img.data, img.height, img.width, NULL, NULL, out, n) != LUMOS_STATUS_BUFFER_TOO_SMALL) {
        fprintf(stderr, "a short output buffer was not refused\n");
        goto done;
    }
    if (check(lumos_decompose_options_default(&opts), "lumos_decompose_options_default")) goto done;
    opts.samples = 2;
    opts.seed = 3;
    if (check(lumos_decompose(model, img.data, img.height, img.width, &opts, NULL, out, 2 * n), "lumos_decompose"))
        goto done;
    FILE *f = fopen(out_path, "wb");
    if (!f || fwrite(out, sizeof(float), 2 * n, f) != 2 * n) {
        fprintf(stderr, "cannot write %s\n", out_path);
        if (f) fclose(f);
        goto done;
    }
    fclose(f);
    printf("decomposed %zux%zu into 2 channels\n", img.height, img.width);
    rc = 0;
done:
    free(out);
    free(labels);
    lumos_image_free(&img);
    return rc;
}

int main(int argc, char **argv) {
    lumos_set_num_threads(1);
    if (argc == 6 && strcmp(argv[1], "train") == 0) {
        LumosModel *model = NULL;
        if (check(lumos_train(CONFIG, argv[2], argv[3], NULL, NULL, NULL, &model), "lumos_train")) return 1;
        int rc = decompose_to_file(model, argv[4], argv[5]);
        lumos_model_free(model);
        return rc;
    }
    if (argc == 5 && strcmp(argv[1], "decompose") == 0) {
        LumosModel *model = NULL;
        if (check(lumos_model_load(argv[2], "cpu", &model), "lumos_model_load")) return 1;
        int rc = decompose_to_file(model, argv[3], argv[4]);
        lumos_model_free(model);
        return rc;
    }
    fprintf(stderr, "usage: %s train DATA MODEL IMAGE OUT | decompose MODEL IMAGE OUT\n", argv[0]);
    return 2;
}
