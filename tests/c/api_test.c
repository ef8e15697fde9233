/*
 * Exercises every function of the lumos C API from C (and, compiled with g++, from C++),
 * error paths included. Built and run by tests/c_api.rs:
 *   api_test DATA_DIR WORK_DIR
 * Exit status 0 and a final "C API: N passed, 0 failed" line mean success.
 */
#define _POSIX_C_SOURCE 200809L
#include "lumos.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int passed = 0, failed = 0;

#define CHECK(cond, ...)                                                    \
    do {                                                                    \
        if (cond) {                                                         \
            passed++;                                                       \
        } else {                                                            \
            failed++;                                                       \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                   \
            fprintf(stderr, " (last error: %s)\n", lumos_last_error_message()); \
        }                                                                   \
    } while (0)

#define EXPECT_STATUS(call, expected)                                               \
    do {                                                                            \
        LumosStatus st_ = (call);                                                   \
        CHECK(st_ == (expected), "%s returned %s, expected %s", #call,              \
              lumos_status_name(st_), lumos_status_name(expected));                 \
        if ((expected) != LUMOS_STATUS_OK)                                          \
            CHECK(strlen(lumos_last_error_message()) > 0, "no error message for %s", #call); \
    } while (0)

/* A tiny training run (seconds on a CPU). */
static const char *CONFIG =
    "{\"unet\": {\"n_stages\": 3, \"base_features\": 4, \"max_features\": 16},"
    " \"epochs\": 2, \"iterations_per_epoch\": 3, \"batch_size\": 2,"
    " \"patch_size\": [32, 32], \"seed\": 1, \"device\": \"cpu\"}";

static const char *SLOW_CONFIG =
    "{\"unet\": {\"n_stages\": 3, \"base_features\": 4, \"max_features\": 16},"
    " \"epochs\": 1000, \"iterations_per_epoch\": 2, \"batch_size\": 2,"
    " \"patch_size\": [32, 32], \"seed\": 1, \"device\": \"cpu\"}";

typedef struct {
    int calls;
    int training;
    int validation;
    int checkpoints;
    LumosCancelToken *cancel_after_checkpoint;
} ProgressLog;

static void on_progress(const LumosProgress *p, void *user_data) {
    ProgressLog *log = (ProgressLog *)user_data;
    log->calls++;
    if (p->stage == 1) log->training++;
    if (p->stage == 2) log->validation++;
    if (p->stage == 3) {
        log->checkpoints++;
        if (log->cancel_after_checkpoint) lumos_cancel_token_cancel(log->cancel_after_checkpoint);
    }
}

static float *make_frame(size_t c, size_t h, size_t w) {
    float *x = (float *)malloc(c * h * w * sizeof(float));
    for (size_t k = 0; k < c; k++)
        for (size_t y = 0; y < h; y++)
            for (size_t i = 0; i < w; i++)
                x[(k * h + y) * w + i] = (float)(1000.0 + 300.0 * sin(0.1 * (double)(y + k)) * cos(0.13 * (double)i));
    return x;
}

typedef struct {
    const LumosModel *model;
    const float *frame;
    size_t c, h, w;
    unsigned char *out;
    LumosStatus status;
} SegJob;

static void *seg_thread(void *arg) {
    SegJob *j = (SegJob *)arg;
    j->status = lumos_segment(j->model, j->frame, j->c, j->h, j->w, NULL, NULL, j->out, j->h * j->w);
    return NULL;
}

typedef struct {
    const char *data;
    const char *out;
    LumosCancelToken *token;
    LumosStatus status;
} TrainJob;

static void *train_thread(void *arg) {
    TrainJob *j = (TrainJob *)arg;
    j->status = lumos_train(SLOW_CONFIG, j->data, j->out, NULL, NULL, j->token, NULL);
    return NULL;
}

static int file_exists(const char *p) {
    FILE *f = fopen(p, "rb");
    if (!f) return 0;
    fclose(f);
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s DATA_DIR WORK_DIR\n", argv[0]);
        return 2;
    }
    const char *data = argv[1];
    const char *work = argv[2];
    char model_path[4096], saved_path[4096], corrupt_path[4096], trunc_path[4096], ckpt_path[4096], slow_path[4096];
    snprintf(model_path, sizeof model_path, "%s/c_model.lumos", work);
    snprintf(saved_path, sizeof saved_path, "%s/c_saved.lumos", work);
    snprintf(corrupt_path, sizeof corrupt_path, "%s/corrupt.lumos", work);
    snprintf(trunc_path, sizeof trunc_path, "%s/truncated.lumos", work);
    snprintf(slow_path, sizeof slow_path, "%s/slow.lumos", work);
    snprintf(ckpt_path, sizeof ckpt_path, "%s/slow.lumos.ckpt", work);

    /* library facts */
    CHECK(lumos_abi_version() == LUMOS_ABI_VERSION, "ABI %u vs header %d", lumos_abi_version(), LUMOS_ABI_VERSION);
    CHECK(strlen(lumos_version()) >= 5, "version '%s'", lumos_version());
    CHECK(strcmp(lumos_status_name(LUMOS_STATUS_OK), "LUMOS_STATUS_OK") == 0, "status name");
    CHECK(strcmp(lumos_status_name(LUMOS_STATUS_CANCELLED), "LUMOS_STATUS_CANCELLED") == 0, "status name");
    CHECK(strcmp(lumos_status_name(9999), "unknown") == 0, "unknown status name");
    (void)lumos_cuda_available();
    EXPECT_STATUS(lumos_set_num_threads(0), LUMOS_STATUS_INVALID_ARGUMENT);
    EXPECT_STATUS(lumos_set_num_threads(2), LUMOS_STATUS_OK);
    CHECK(strlen(lumos_last_error_message()) == 0, "a success clears the last error");

    /* train */
    ProgressLog log;
    memset(&log, 0, sizeof log);
    LumosModel *model = NULL;
    EXPECT_STATUS(lumos_train(CONFIG, data, model_path, on_progress, &log, NULL, &model), LUMOS_STATUS_OK);
    CHECK(model != NULL, "train returned a model");
    CHECK(log.training == 6 && log.validation == 2 && log.checkpoints == 2, "progress: %d training, %d validation, %d checkpoints",
          log.training, log.validation, log.checkpoints);
    CHECK(file_exists(model_path), "model file written");
    LumosModel *untouched = (LumosModel *)0x1;
    EXPECT_STATUS(lumos_train("{\"epochs\": 0}", data, model_path, NULL, NULL, NULL, &untouched), LUMOS_STATUS_INVALID_CONFIG);
    CHECK(untouched == (LumosModel *)0x1, "out-param untouched on failure");
    EXPECT_STATUS(lumos_train("{\"no_such_field\": 1}", data, model_path, NULL, NULL, NULL, NULL), LUMOS_STATUS_INVALID_CONFIG);
    EXPECT_STATUS(lumos_train("{not json", data, model_path, NULL, NULL, NULL, NULL), LUMOS_STATUS_INVALID_CONFIG);
    EXPECT_STATUS(lumos_train(CONFIG, "/no/such/folder", model_path, NULL, NULL, NULL, NULL), LUMOS_STATUS_INVALID_ARGUMENT);
    EXPECT_STATUS(lumos_train(CONFIG, NULL, model_path, NULL, NULL, NULL, NULL), LUMOS_STATUS_NULL_POINTER);
    EXPECT_STATUS(lumos_train(CONFIG, data, NULL, NULL, NULL, NULL, NULL), LUMOS_STATUS_NULL_POINTER);
    EXPECT_STATUS(lumos_train("{\"device\": \"tpu\"}", data, model_path, NULL, NULL, NULL, NULL), LUMOS_STATUS_DEVICE);

    /* info */
    LumosModelInfo info;
    EXPECT_STATUS(lumos_model_info(model, &info), LUMOS_STATUS_OK);
    CHECK(info.kind == LUMOS_MODEL_KIND_UNET, "kind %u", (unsigned)info.kind);
    CHECK(info.n_input_channels == 5 && info.n_classes == 2, "%zu channels, %zu classes", info.n_input_channels, info.n_classes);
    CHECK(info.patch_height == 32 && info.patch_width == 32, "patch %zux%zu", info.patch_height, info.patch_width);
    CHECK(info.can_segment && !info.can_decompose, "verbs");
    EXPECT_STATUS(lumos_model_info(NULL, &info), LUMOS_STATUS_NULL_POINTER);
    EXPECT_STATUS(lumos_model_info(model, NULL), LUMOS_STATUS_NULL_POINTER);
    const char *name = NULL;
    EXPECT_STATUS(lumos_model_kind_name(model, &name), LUMOS_STATUS_OK);
    CHECK(name && strcmp(name, "unet") == 0, "kind name %s", name ? name : "(null)");
    EXPECT_STATUS(lumos_model_channel_name(model, 0, &name), LUMOS_STATUS_OK);
    CHECK(name && strcmp(name, "I0") == 0, "channel 0 %s", name ? name : "(null)");
    EXPECT_STATUS(lumos_model_channel_name(model, 4, &name), LUMOS_STATUS_OK);
    CHECK(name && strcmp(name, "phase") == 0, "channel 4 %s", name ? name : "(null)");
    EXPECT_STATUS(lumos_model_channel_name(model, 5, &name), LUMOS_STATUS_INVALID_ARGUMENT);
    EXPECT_STATUS(lumos_model_class_name(model, 1, &name), LUMOS_STATUS_OK);
    CHECK(name && strcmp(name, "cell") == 0, "class 1 %s", name ? name : "(null)");
    EXPECT_STATUS(lumos_model_class_name(model, 2, &name), LUMOS_STATUS_INVALID_ARGUMENT);
    EXPECT_STATUS(lumos_model_class_name(model, 0, NULL), LUMOS_STATUS_NULL_POINTER);
    const char *json = NULL;
    EXPECT_STATUS(lumos_model_metadata_json(model, &json), LUMOS_STATUS_OK);
    CHECK(json && strstr(json, "\"normalization\"") && strstr(json, "\"provenance\""), "metadata JSON");
    EXPECT_STATUS(lumos_model_metadata_json(NULL, &json), LUMOS_STATUS_NULL_POINTER);

    /* segment: a frame larger than one tile and not a multiple of it */
    const size_t C = 5, H = 45, W = 77;
    float *frame = make_frame(C, H, W);
    unsigned char *labels = (unsigned char *)malloc(H * W);
    unsigned char *labels2 = (unsigned char *)malloc(H * W);
    float *probs = (float *)malloc(2 * H * W * sizeof(float));
    LumosTileOptions opts;
    EXPECT_STATUS(lumos_tile_options_default(&opts), LUMOS_STATUS_OK);
    CHECK(opts.step_fraction == 0.5 && opts.batch_size >= 1 && !opts.mirror && opts.tile_height == 0, "defaults");
    EXPECT_STATUS(lumos_tile_options_default(NULL), LUMOS_STATUS_NULL_POINTER);
    EXPECT_STATUS(lumos_segment(model, frame, C, H, W, &opts, NULL, labels, H * W), LUMOS_STATUS_OK);
    int bad_label = 0;
    for (size_t i = 0; i < H * W; i++) bad_label |= labels[i] > 1;
    CHECK(!bad_label, "labels are 0/1");
    EXPECT_STATUS(lumos_segment_probabilities(model, frame, C, H, W, &opts, NULL, probs, 2 * H * W), LUMOS_STATUS_OK);
    double worst = 0.0;
    int argmax_agrees = 1;
    for (size_t i = 0; i < H * W; i++) {
        double s = probs[i] + probs[H * W + i];
        if (fabs(s - 1.0) > worst) worst = fabs(s - 1.0);
        unsigned char a = probs[H * W + i] > probs[i] ? 1 : 0;
        if (fabs(probs[H * W + i] - probs[i]) > 1e-4 && a != labels[i]) argmax_agrees = 0;
    }
    CHECK(worst < 1e-4, "probabilities sum to 1 (worst %g)", worst);
    CHECK(argmax_agrees, "labels are the argmax of the probabilities");
    /* bfloat16 inference: probabilities within bfloat16 rounding, float32 restored after */
    uint32_t prec = 99;
    EXPECT_STATUS(lumos_model_precision(model, &prec), LUMOS_STATUS_OK);
    CHECK(prec == LUMOS_PRECISION_FLOAT32, "default precision %u", prec);
    EXPECT_STATUS(lumos_model_set_precision(model, 7), LUMOS_STATUS_INVALID_ARGUMENT);
    EXPECT_STATUS(lumos_model_set_precision(NULL, LUMOS_PRECISION_BFLOAT16), LUMOS_STATUS_NULL_POINTER);
    EXPECT_STATUS(lumos_model_precision(model, NULL), LUMOS_STATUS_NULL_POINTER);
    EXPECT_STATUS(lumos_model_set_precision(model, LUMOS_PRECISION_BFLOAT16), LUMOS_STATUS_OK);
    EXPECT_STATUS(lumos_model_precision(model, &prec), LUMOS_STATUS_OK);
    CHECK(prec == LUMOS_PRECISION_BFLOAT16, "precision set to %u", prec);
    float *probs16 = (float *)malloc(2 * H * W * sizeof(float));
    EXPECT_STATUS(lumos_segment_probabilities(model, frame, C, H, W, &opts, NULL, probs16, 2 * H * W), LUMOS_STATUS_OK);
    double dmax = 0.0, dsum = 0.0;
    size_t same = 0;
    for (size_t i = 0; i < 2 * H * W; i++) {
        double d = fabs(probs16[i] - probs[i]);
        dsum += d;
        if (d > dmax) dmax = d;
    }
    size_t clear = 0; /* pixels whose float32 class probabilities differ by more than 0.2 */
    for (size_t i = 0; i < H * W; i++) {
        if (fabs(probs[H * W + i] - probs[i]) <= 0.2) continue;
        clear++;
        same += (probs16[H * W + i] > probs16[i]) == (probs[H * W + i] > probs[i]);
    }
    /* bfloat16 keeps 8 mantissa bits: probabilities move (autocast took effect), a little
       on average, and the argmax changes only where the classes were nearly tied */
    CHECK(dmax > 0.0 && dsum / (2 * H * W) < 0.02 && clear > 0 && same == clear,
          "bfloat16 probabilities near float32 (max diff %g, mean diff %g, %zu of %zu clear labels equal)", dmax,
          dsum / (2 * H * W), same, clear);
    free(probs16);
    EXPECT_STATUS(lumos_model_set_precision(model, LUMOS_PRECISION_FLOAT32), LUMOS_STATUS_OK);
    opts.mirror = true;
    opts.tile_height = opts.tile_width = 32;
    opts.batch_size = 1;
    EXPECT_STATUS(lumos_segment(model, frame, C, H, W, &opts, NULL, labels2, H * W), LUMOS_STATUS_OK);
    opts.tile_height = 33;
    EXPECT_STATUS(lumos_segment(model, frame, C, H, W, &opts, NULL, labels2, H * W), LUMOS_STATUS_INVALID_ARGUMENT);
    opts.tile_height = 32;
    opts.tile_width = 0;
    EXPECT_STATUS(lumos_segment(model, frame, C, H, W, &opts, NULL, labels2, H * W), LUMOS_STATUS_INVALID_ARGUMENT);
    lumos_tile_options_default(&opts);
    opts.step_fraction = 0.0;
    EXPECT_STATUS(lumos_segment(model, frame, C, H, W, &opts, NULL, labels2, H * W), LUMOS_STATUS_INVALID_ARGUMENT);

    /* segment: bad input */
    EXPECT_STATUS(lumos_segment(NULL, frame, C, H, W, NULL, NULL, labels, H * W), LUMOS_STATUS_NULL_POINTER);
    EXPECT_STATUS(lumos_segment(model, NULL, C, H, W, NULL, NULL, labels, H * W), LUMOS_STATUS_NULL_POINTER);
    EXPECT_STATUS(lumos_segment(model, frame, C, H, W, NULL, NULL, NULL, H * W), LUMOS_STATUS_NULL_POINTER);
    EXPECT_STATUS(lumos_segment(model, frame, 4, H, W, NULL, NULL, labels, H * W), LUMOS_STATUS_SHAPE_MISMATCH);
    CHECK(strstr(lumos_last_error_message(), "5") != NULL, "message names the expected channel count: %s", lumos_last_error_message());
    EXPECT_STATUS(lumos_segment(model, frame, C, 0, W, NULL, NULL, labels, H * W), LUMOS_STATUS_SHAPE_MISMATCH);
    EXPECT_STATUS(lumos_segment(model, frame, C, (size_t)1 << 40, (size_t)1 << 40, NULL, NULL, labels, H * W), LUMOS_STATUS_SHAPE_MISMATCH);
    EXPECT_STATUS(lumos_segment(model, frame, C, H, W, NULL, NULL, labels, H * W - 1), LUMOS_STATUS_BUFFER_TOO_SMALL);
    EXPECT_STATUS(lumos_segment_probabilities(model, frame, C, H, W, NULL, NULL, probs, H * W), LUMOS_STATUS_BUFFER_TOO_SMALL);
    frame[7] = NAN;
    EXPECT_STATUS(lumos_segment(model, frame, C, H, W, NULL, NULL, labels2, H * W), LUMOS_STATUS_INVALID_INPUT);
    frame[7] = INFINITY;
    EXPECT_STATUS(lumos_segment(model, frame, C, H, W, NULL, NULL, labels2, H * W), LUMOS_STATUS_INVALID_INPUT);
    free(frame);
    frame = make_frame(C, H, W);

    /* decompose: not for a segmentation model */
    float *dec = (float *)malloc(2 * H * W * sizeof(float));
    EXPECT_STATUS(lumos_decompose(model, frame, H, W, NULL, NULL, dec, 2 * H * W), LUMOS_STATUS_UNSUPPORTED);
    CHECK(strstr(lumos_last_error_message(), "not supported") != NULL, "message: %s", lumos_last_error_message());
    EXPECT_STATUS(lumos_decompose(NULL, frame, H, W, NULL, NULL, dec, 2 * H * W), LUMOS_STATUS_NULL_POINTER);
    free(dec);

    /* cancellation of segmentation */
    LumosCancelToken *token = NULL;
    EXPECT_STATUS(lumos_cancel_token_new(&token), LUMOS_STATUS_OK);
    EXPECT_STATUS(lumos_cancel_token_new(NULL), LUMOS_STATUS_NULL_POINTER);
    EXPECT_STATUS(lumos_cancel_token_cancel(token), LUMOS_STATUS_OK);
    EXPECT_STATUS(lumos_segment(model, frame, C, H, W, NULL, token, labels2, H * W), LUMOS_STATUS_CANCELLED);
    EXPECT_STATUS(lumos_cancel_token_reset(token), LUMOS_STATUS_OK);
    EXPECT_STATUS(lumos_segment(model, frame, C, H, W, NULL, token, labels2, H * W), LUMOS_STATUS_OK);
    EXPECT_STATUS(lumos_cancel_token_cancel(NULL), LUMOS_STATUS_NULL_POINTER);
    EXPECT_STATUS(lumos_cancel_token_reset(NULL), LUMOS_STATUS_NULL_POINTER);

    /* two threads segmenting with one handle agree with one thread */
    {
        unsigned char *o1 = (unsigned char *)malloc(H * W), *o2 = (unsigned char *)malloc(H * W);
        SegJob j1 = {model, frame, C, H, W, o1, LUMOS_STATUS_INTERNAL};
        SegJob j2 = {model, frame, C, H, W, o2, LUMOS_STATUS_INTERNAL};
        pthread_t t1, t2;
        pthread_create(&t1, NULL, seg_thread, &j1);
        pthread_create(&t2, NULL, seg_thread, &j2);
        pthread_join(t1, NULL);
        pthread_join(t2, NULL);
        CHECK(j1.status == LUMOS_STATUS_OK && j2.status == LUMOS_STATUS_OK, "threads ok");
        CHECK(memcmp(o1, labels, H * W) == 0 && memcmp(o2, labels, H * W) == 0, "threads agree with the first result");
        free(o1);
        free(o2);
    }

    /* save, then load and get the same masks */
    EXPECT_STATUS(lumos_model_save(model, saved_path), LUMOS_STATUS_OK);
    EXPECT_STATUS(lumos_model_save(model, "/no/such/folder/m.lumos"), LUMOS_STATUS_IO);
    EXPECT_STATUS(lumos_model_save(NULL, saved_path), LUMOS_STATUS_NULL_POINTER);
    EXPECT_STATUS(lumos_model_save(model, NULL), LUMOS_STATUS_NULL_POINTER);
    LumosModel *loaded = NULL;
    EXPECT_STATUS(lumos_model_load(saved_path, "cpu", &loaded), LUMOS_STATUS_OK);
    EXPECT_STATUS(lumos_segment(loaded, frame, C, H, W, NULL, NULL, labels2, H * W), LUMOS_STATUS_OK);
    CHECK(memcmp(labels, labels2, H * W) == 0, "reloaded model gives the same labels");
    lumos_model_free(loaded);
    loaded = NULL;
    EXPECT_STATUS(lumos_model_load(saved_path, NULL, &loaded), LUMOS_STATUS_OK);
    lumos_model_free(loaded);

    /* load: bad files and arguments */
    LumosModel *none = NULL;
    EXPECT_STATUS(lumos_model_load("/no/such/model.lumos", "cpu", &none), LUMOS_STATUS_IO);
    CHECK(none == NULL, "out-param untouched");
    EXPECT_STATUS(lumos_model_load(NULL, "cpu", &none), LUMOS_STATUS_NULL_POINTER);
    EXPECT_STATUS(lumos_model_load(saved_path, "cpu", NULL), LUMOS_STATUS_NULL_POINTER);
    EXPECT_STATUS(lumos_model_load(saved_path, "quantum", &none), LUMOS_STATUS_DEVICE);
    EXPECT_STATUS(lumos_model_load("\xff\xfe.lumos", "cpu", &none), LUMOS_STATUS_INVALID_ARGUMENT);
    {
        FILE *f = fopen(corrupt_path, "wb");
        fputs("this is not a model file, just text", f);
        fclose(f);
        EXPECT_STATUS(lumos_model_load(corrupt_path, "cpu", &none), LUMOS_STATUS_MODEL_FORMAT);
        /* a truncated copy of a real model */
        FILE *in = fopen(saved_path, "rb");
        fseek(in, 0, SEEK_END);
        long n = ftell(in);
        fseek(in, 0, SEEK_SET);
        char *buf = (char *)malloc((size_t)n);
        size_t got = fread(buf, 1, (size_t)n, in);
        fclose(in);
        FILE *out = fopen(trunc_path, "wb");
        fwrite(buf, 1, got / 2, out);
        fclose(out);
        free(buf);
        EXPECT_STATUS(lumos_model_load(trunc_path, "cpu", &none), LUMOS_STATUS_MODEL_FORMAT);
        CHECK(none == NULL, "out-param untouched");
    }

    /* cancel a long training from another thread: CANCELLED, checkpoint kept */
    {
        LumosCancelToken *t2 = NULL;
        lumos_cancel_token_new(&t2);
        TrainJob job = {data, slow_path, t2, LUMOS_STATUS_OK};
        pthread_t th;
        pthread_create(&th, NULL, train_thread, &job);
        /* wait for the first checkpoint, then cancel from this thread */
        for (int i = 0; i < 600 && !file_exists(ckpt_path); i++) {
            struct timespec ts = {0, 100 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
        lumos_cancel_token_cancel(t2);
        pthread_join(th, NULL);
        CHECK(job.status == LUMOS_STATUS_CANCELLED, "training cancelled: %s", lumos_status_name(job.status));
        CHECK(file_exists(ckpt_path), "checkpoint kept");
        CHECK(!file_exists(slow_path), "no final model written for a cancelled run");
        LumosModel *ck = NULL;
        EXPECT_STATUS(lumos_model_load(ckpt_path, "cpu", &ck), LUMOS_STATUS_OK);
        lumos_model_free(ck);
        lumos_cancel_token_free(t2);
    }
    /* cancellation through the progress callback's token */
    {
        ProgressLog l2;
        memset(&l2, 0, sizeof l2);
        lumos_cancel_token_reset(token);
        l2.cancel_after_checkpoint = token;
        EXPECT_STATUS(lumos_train(CONFIG, data, slow_path, on_progress, &l2, token, NULL), LUMOS_STATUS_CANCELLED);
        CHECK(l2.checkpoints == 1, "stopped after the first checkpoint (%d)", l2.checkpoints);
    }

    /* freeing NULL is harmless */
    lumos_model_free(NULL);
    lumos_cancel_token_free(NULL);
    lumos_cancel_token_free(token);
    lumos_model_free(model);
    free(frame);
    free(labels);
    free(labels2);
    free(probs);

    printf("C API: %d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
