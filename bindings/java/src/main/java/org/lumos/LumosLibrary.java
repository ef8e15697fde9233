package org.lumos;

import com.sun.jna.Callback;
import com.sun.jna.Library;
import com.sun.jna.Pointer;
import com.sun.jna.Structure;
import com.sun.jna.ptr.IntByReference;
import com.sun.jna.ptr.PointerByReference;

/**
 * The raw JNA mapping of include/lumos.h (ABI 1). Use {@link Lumos} and {@link Model}
 * instead: they check every status and free every handle.
 *
 * <p>Type mapping (64-bit platforms): {@code size_t} and {@code uint64_t} are Java
 * {@code long}; {@code uint32_t} and enums are {@code int}; C {@code bool} is one byte, so
 * it is a {@code byte} in structures and return values (JNA's {@code boolean} is four).
 */
public interface LumosLibrary extends Library {
    int ABI_VERSION = 1;

    @Structure.FieldOrder({"kind", "n_input_channels", "n_classes", "patch_height", "patch_width", "can_segment",
            "can_decompose"})
    class ModelInfo extends Structure {
        public int kind;
        public long n_input_channels;
        public long n_classes;
        public long patch_height;
        public long patch_width;
        public byte can_segment;
        public byte can_decompose;
    }

    @Structure.FieldOrder({"tile_height", "tile_width", "step_fraction", "batch_size", "mirror"})
    class TileOptions extends Structure {
        public long tile_height;
        public long tile_width;
        public double step_fraction;
        public long batch_size;
        public byte mirror;
    }

    @Structure.FieldOrder({"start", "inversion_steps", "sampling_steps", "eta", "samples", "forward_t", "seed",
            "clip_denoised"})
    class DiffusionOptions extends Structure {
        public int start;
        public long inversion_steps;
        public long sampling_steps;
        public double eta;
        public long samples;
        public long forward_t;
        public long seed;
        public byte clip_denoised;
    }

    @Structure.FieldOrder({"tile", "keep", "batch_size", "mirror", "samples", "seed"})
    class DecomposeOptions extends Structure {
        public long tile;
        public long keep;
        public long batch_size;
        public byte mirror;
        public long samples;
        public long seed;
    }

    @Structure.FieldOrder({"stage", "epoch", "epochs", "iteration", "iterations", "loss", "val_metric"})
    class Progress extends Structure {
        public int stage;
        public long epoch;
        public long epochs;
        public long iteration;
        public long iterations;
        public double loss;
        public double val_metric;

        public Progress() {
        }

        public Progress(Pointer p) {
            super(p);
            read();
        }
    }

    @Structure.FieldOrder({"data", "channels", "height", "width"})
    class Image extends Structure {
        public Pointer data;
        public long channels;
        public long height;
        public long width;
    }

    /** {@code void (*)(const LumosProgress *, void *)}; called on the training thread. */
    interface ProgressCallback extends Callback {
        void invoke(Pointer progress, Pointer userData);
    }

    String lumos_version();

    int lumos_abi_version();

    String lumos_last_error_message();

    String lumos_status_name(int status);

    byte lumos_cuda_available();

    int lumos_set_num_threads(int nThreads);

    int lumos_model_load(String path, String device, PointerByReference outModel);

    void lumos_model_free(Pointer model);

    int lumos_model_save(Pointer model, String path);

    int lumos_model_info(Pointer model, ModelInfo outInfo);

    /** LUMOS_PRECISION_FLOAT32 (0) or LUMOS_PRECISION_BFLOAT16 (1). */
    int lumos_model_set_precision(Pointer model, int precision);

    int lumos_model_precision(Pointer model, IntByReference outPrecision);

    int lumos_model_kind_name(Pointer model, PointerByReference outName);

    int lumos_model_channel_name(Pointer model, long index, PointerByReference outName);

    int lumos_model_class_name(Pointer model, long index, PointerByReference outName);

    int lumos_model_metadata_json(Pointer model, PointerByReference outJson);

    int lumos_tile_options_default(TileOptions outOptions);

    int lumos_segment(Pointer model, float[] input, long channels, long height, long width, TileOptions options,
                      Pointer cancel, byte[] outLabels, long outLen);

    int lumos_segment_probabilities(Pointer model, float[] input, long channels, long height, long width,
                                    TileOptions options, Pointer cancel, float[] outProbabilities, long outLen);

    int lumos_diffusion_options_default(DiffusionOptions outOptions);

    int lumos_model_diffusion_options(Pointer model, DiffusionOptions outOptions);

    int lumos_segment_diffusion(Pointer model, float[] input, long channels, long height, long width,
                                TileOptions options, DiffusionOptions diffusion, Pointer cancel, byte[] outLabels,
                                long outLen);

    int lumos_decompose_options_default(DecomposeOptions outOptions);

    int lumos_decompose(Pointer model, float[] input, long height, long width, DecomposeOptions options,
                        Pointer cancel, float[] out, long outLen);

    int lumos_cancel_token_new(PointerByReference outToken);

    int lumos_cancel_token_cancel(Pointer token);

    int lumos_cancel_token_reset(Pointer token);

    void lumos_cancel_token_free(Pointer token);

    int lumos_train(String configJson, String dataDir, String outputPath, ProgressCallback progress, Pointer userData,
                    Pointer cancel, PointerByReference outModel);

    int lumos_train_recipe(String method, String size, PointerByReference outJson);

    int lumos_export_bioimageio(String modelPath, String outPath, String optionsJson, PointerByReference outReportJson);

    int lumos_simulate(String modality, String configJson, long seed, Image outImage, Image outTruth);

    int lumos_image_read_tiff(String path, Image outImage);

    void lumos_image_free(Image image);

    int lumos_image_write_tiff(String path, float[] data, long channels, long height, long width, String[] channelNames);

    int lumos_mask_write_tiff(String path, byte[] labels, long height, long width);
}
