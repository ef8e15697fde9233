/* PG-DiffSeg through the C API, across processes:
 *   pgdiff_roundtrip train   DATA_DIR MODEL_PATH IMAGE_TIF OUT_BIN
 *     trains a tiny PG-DiffSeg model with lumos_train, saves it, segments IMAGE_TIF with
 *     the model still in memory (random start, 2 samples, eta 0.5, seed 3, and the
 *     prior start) and writes both label maps to OUT_BIN;
 *   pgdiff_roundtrip segment MODEL_PATH IMAGE_TIF OUT_BIN
 *     loads the saved model in a fresh process and segments the same TIFF.
 * The Rust test compares the outputs byte for byte. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lumos.h"

#define UNET "{\"model_channels\": 8, \"channel_mult\": [1, 2], \"num_res_blocks\": 1," \
             " \"attention_resolutions\": [2], \"num_head_channels\": 8, \"groups\": 4}"

static const char *CONFIG =
    "{\"kind\": \"pgdiff\","
    " \"pgdiff\": {\"autoencoder\": {\"ch\": 8, \"ch_mult\": [1, 2, 2], \"num_res_blocks\": 1, \"groups\": 4},"
    "              \"ldm_p\": " UNET ", \"ldm_s\": " UNET ","
    "              \"ae_epochs\": 1, \"ae_learning_rate\": 0.002, \"learning_rate\": 0.001,"
    "              \"sampling\": {\"inversion_steps\": 5, \"sampling_steps\": 5}},"
    " \"epochs\": 1, \"iterations_per_epoch\": 3, \"batch_size\": 2, \"patch_size\": [32, 32],"
    " \"val_fraction\": 0.0, \"seed\": 11, \"device\": \"cpu\"}";

static int check(LumosStatus s, const char *what) {
    if (s != LUMOS_STATUS_OK) {
        fprintf(stderr, "%s failed: %s: %s\n", what, lumos_status_name((uint32_t)s), lumos_last_error_message());
        return 1;
    }
    return 0;
}

static int segment_to_file(const LumosModel *model, const char *image_path, const char *out_path) {
    LumosModelInfo info;
    if (check(lumos_model_info(model, &info), "lumos_model_info")) return 1;
    if (info.kind != LUMOS_MODEL_KIND_PGDIFF || info.n_input_channels != 1 || info.n_classes != 3 ||
        !info.can_segment || info.can_decompose) {
        fprintf(stderr, "unexpected model info: kind %u\n", (unsigned)info.kind);
        return 1;
    }
    LumosImage img;
    memset(&img, 0, sizeof img);
    if (check(lumos_image_read_tiff(image_path, &img), "lumos_image_read_tiff")) return 1;
    int rc = 1;
    size_t n = img.height * img.width;
    uint8_t *labels = (uint8_t *)malloc(2 * n);
    LumosDiffusionOptions d;
    if (check(lumos_model_diffusion_options(model, &d), "lumos_model_diffusion_options")) goto done;
    if (d.start != LUMOS_START_PRIOR || d.inversion_steps != 5 || d.sampling_steps != 5 || d.samples != 1) {
        fprintf(stderr, "the model's saved sampling was not returned\n");
        goto done;
    }
    /* an unknown start is refused with INVALID_ARGUMENT */
    d.start = 7;
    if (lumos_segment_diffusion(model, img.data, 1, img.height, img.width, NULL, &d, NULL, labels, n) !=
        LUMOS_STATUS_INVALID_ARGUMENT) {
        fprintf(stderr, "start = 7 was not refused\n");
        goto done;
    }
    if (check(lumos_diffusion_options_default(&d), "lumos_diffusion_options_default")) goto done;
    if (d.inversion_steps != 100 || d.sampling_steps != 200) {
        fprintf(stderr, "library defaults are not the paper's 100 / 200 steps\n");
        goto done;
    }
    d.start = LUMOS_START_RANDOM;
    d.samples = 2;
    d.eta = 0.5;
    d.sampling_steps = 4;
    d.seed = 3;
    if (check(lumos_segment_diffusion(model, img.data, 1, img.height, img.width, NULL, &d, NULL, labels, n),
              "lumos_segment_diffusion (random)"))
        goto done;
    /* the model's own sampling (prior start) through the plain segment call */
    if (check(lumos_segment(model, img.data, 1, img.height, img.width, NULL, NULL, labels + n, n), "lumos_segment"))
        goto done;
    for (size_t i = 0; i < 2 * n; i++) {
        if (labels[i] > 2) {
            fprintf(stderr, "label %u out of range\n", (unsigned)labels[i]);
            goto done;
        }
    }
    FILE *f = fopen(out_path, "wb");
    if (!f || fwrite(labels, 1, 2 * n, f) != 2 * n) {
        fprintf(stderr, "cannot write %s\n", out_path);
        if (f) fclose(f);
        goto done;
    }
    fclose(f);
    printf("segmented %zux%zu twice\n", img.height, img.width);
    rc = 0;
done:
    free(labels);
    lumos_image_free(&img);
    return rc;
}

int main(int argc, char **argv) {
    lumos_set_num_threads(1);
    if (argc == 6 && strcmp(argv[1], "train") == 0) {
        LumosModel *model = NULL;
        if (check(lumos_train(CONFIG, argv[2], argv[3], NULL, NULL, NULL, &model), "lumos_train")) return 1;
        int rc = segment_to_file(model, argv[4], argv[5]);
        lumos_model_free(model);
        return rc;
    }
    if (argc == 5 && strcmp(argv[1], "segment") == 0) {
        LumosModel *model = NULL;
        if (check(lumos_model_load(argv[2], "cpu", &model), "lumos_model_load")) return 1;
        int rc = segment_to_file(model, argv[3], argv[4]);
        lumos_model_free(model);
        return rc;
    }
    fprintf(stderr, "usage: %s train DATA MODEL IMAGE OUT | segment MODEL IMAGE OUT\n", argv[0]);
    return 2;
}
