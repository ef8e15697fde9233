/* DM-QPMNet through the C API, across processes:
 *   dmqpm_roundtrip train   DATA_DIR MODEL_PATH IMAGE_TIF MASK_OUT
 *     trains a (tiny) DM-QPMNet with lumos_train, saves it, segments IMAGE_TIF with the
 *     model still in memory and writes the labels to MASK_OUT;
 *   dmqpm_roundtrip segment MODEL_PATH IMAGE_TIF MASK_OUT
 *     loads the saved model in a fresh process and segments the same TIFF.
 * The Rust test compares the two masks byte for byte. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lumos.h"

static const char *CONFIG =
    "{\"kind\": \"dmqpm\","
    " \"dmqpm\": {\"variant\": \"dual\", \"n_stages\": 4, \"base_features\": 8, \"max_features\": 32,"
    "            \"fusion_stage\": 2, \"fusion\": \"attention\", \"heads\": 2},"
    " \"epochs\": 3, \"iterations_per_epoch\": 4, \"batch_size\": 2, \"patch_size\": [32, 32],"
    " \"val_fraction\": 0.0, \"seed\": 7, \"device\": \"cpu\"}";

static int check(LumosStatus s, const char *what) {
    if (s != LUMOS_STATUS_OK) {
        fprintf(stderr, "%s failed: %s: %s\n", what, lumos_status_name((uint32_t)s), lumos_last_error_message());
        return 1;
    }
    return 0;
}

static int segment_to_file(const LumosModel *model, const char *image_path, const char *mask_path) {
    LumosImage img;
    memset(&img, 0, sizeof img);
    if (check(lumos_image_read_tiff(image_path, &img), "lumos_image_read_tiff")) return 1;
    if (img.channels != 5) {
        fprintf(stderr, "expected a 5-channel TIFF, got %zu channels\n", img.channels);
        lumos_image_free(&img);
        return 1;
    }
    size_t n = img.height * img.width;
    uint8_t *labels = (uint8_t *)malloc(n);
    int rc = check(lumos_segment(model, img.data, img.channels, img.height, img.width, NULL, NULL, labels, n),
                   "lumos_segment") ||
             check(lumos_mask_write_tiff(mask_path, labels, img.height, img.width), "lumos_mask_write_tiff");
    size_t fg = 0;
    for (size_t i = 0; i < n; i++) fg += labels[i] != 0;
    printf("segmented %zux%zu: %zu foreground pixels\n", img.height, img.width, fg);
    free(labels);
    lumos_image_free(&img);
    lumos_image_free(&img); /* a second free of the same struct is harmless */
    return rc;
}

static int model_is_dmqpm(const LumosModel *model) {
    LumosModelInfo info;
    if (check(lumos_model_info(model, &info), "lumos_model_info")) return 0;
    if (info.kind != LUMOS_MODEL_KIND_DMQPM || info.n_input_channels != 5 || !info.can_segment) {
        fprintf(stderr, "unexpected model info: kind %u, %zu channels\n", (unsigned)info.kind, info.n_input_channels);
        return 0;
    }
    return 1;
}

int main(int argc, char **argv) {
    lumos_set_num_threads(1);
    if (argc == 6 && strcmp(argv[1], "train") == 0) {
        LumosModel *model = NULL;
        if (check(lumos_train(CONFIG, argv[2], argv[3], NULL, NULL, NULL, &model), "lumos_train")) return 1;
        int rc = !model_is_dmqpm(model) || segment_to_file(model, argv[4], argv[5]);
        lumos_model_free(model);
        return rc;
    }
    if (argc == 5 && strcmp(argv[1], "segment") == 0) {
        LumosModel *model = NULL;
        if (check(lumos_model_load(argv[2], "cpu", &model), "lumos_model_load")) return 1;
        int rc = !model_is_dmqpm(model) || segment_to_file(model, argv[3], argv[4]);
        lumos_model_free(model);
        return rc;
    }
    fprintf(stderr, "usage: %s train DATA MODEL IMAGE MASK | segment MODEL IMAGE MASK\n", argv[0]);
    return 2;
}
