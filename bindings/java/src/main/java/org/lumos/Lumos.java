package org.lumos;

import com.sun.jna.Library;
import com.sun.jna.Native;
import com.sun.jna.Pointer;
import com.sun.jna.ptr.PointerByReference;

import java.util.HashMap;
import java.util.Map;

/**
 * Entry point of the Java binding of the lumos C API (include/lumos.h). Nothing is
 * re-implemented: every call goes to liblumos. Failed calls throw {@link LumosException}
 * carrying the library's message.
 *
 * <p>The library is found through the system property {@code lumos.library} or the
 * environment variable {@code LUMOS_LIBRARY} (a full path to liblumos.so), else by name
 * ("lumos") on {@code jna.library.path} and the system's library path.
 */
public final class Lumos {
    public static final int STATUS_CANCELLED = 9;

    /** A (C, H, W) float image, channel-major, row-major within a channel. */
    public static final class Image {
        public final float[] data;
        public final int channels;
        public final int height;
        public final int width;

        public Image(float[] data, int channels, int height, int width) {
            if ((long) channels * height * width != data.length) {
                throw new IllegalArgumentException("data has " + data.length + " floats; expected channels*height*width = "
                        + ((long) channels * height * width));
            }
            this.data = data;
            this.channels = channels;
            this.height = height;
            this.width = width;
        }

        /** One channel as a new array of height*width floats. */
        public float[] channel(int c) {
            float[] out = new float[height * width];
            System.arraycopy(data, c * height * width, out, 0, out.length);
            return out;
        }
    }

    /** Receives training progress, on the training thread. */
    public interface ProgressListener {
        void progress(LumosLibrary.Progress p);
    }

    private static LumosLibrary lib;

    private Lumos() {
    }

    /** The loaded library (loads it on first use). */
    public static synchronized LumosLibrary lib() {
        if (lib == null) {
            String path = System.getProperty("lumos.library");
            if (path == null || path.isEmpty()) {
                path = System.getenv("LUMOS_LIBRARY");
            }
            if (path == null || path.isEmpty()) {
                path = "lumos";
            }
            Map<String, Object> options = new HashMap<String, Object>();
            options.put(Library.OPTION_STRING_ENCODING, "UTF-8");
            LumosLibrary l = Native.load(path, LumosLibrary.class, options);
            int abi = l.lumos_abi_version();
            if (abi != LumosLibrary.ABI_VERSION) {
                throw new UnsatisfiedLinkError("liblumos has ABI " + abi + " but this binding expects "
                        + LumosLibrary.ABI_VERSION);
            }
            lib = l;
        }
        return lib;
    }

    static void check(int status) {
        if (status != 0) {
            LumosLibrary l = lib();
            throw new LumosException(status, l.lumos_status_name(status), l.lumos_last_error_message());
        }
    }

    public static String version() {
        return lib().lumos_version();
    }

    public static boolean cudaAvailable() {
        return lib().lumos_cuda_available() != 0;
    }

    private static Image take(LumosLibrary.Image im) {
        try {
            int c = (int) im.channels, h = (int) im.height, w = (int) im.width;
            return new Image(im.data.getFloatArray(0, c * h * w), c, h, w);
        } finally {
            lib().lumos_image_free(im);
        }
    }

    /** Reads a TIFF the engine reads (8/16/32-bit, multi-page, hyperstacks) as (C, H, W). */
    public static Image readTiff(String path) {
        LumosLibrary.Image im = new LumosLibrary.Image();
        check(lib().lumos_image_read_tiff(path, im));
        return take(im);
    }

    /**
     * Writes a (C, H, W) image as a float32 ImageJ TIFF, atomically. {@code channelNames}
     * (null, or one per channel) become slice labels; models remember them, and the ssQPM
     * names I0, I45, I90, I135, phase select the ssQPM normalization.
     */
    public static void writeImageTiff(String path, Image image, String[] channelNames) {
        if (channelNames != null && channelNames.length != image.channels) {
            throw new IllegalArgumentException(channelNames.length + " channel names for " + image.channels + " channels");
        }
        check(lib().lumos_image_write_tiff(path, image.data, image.channels, image.height, image.width, channelNames));
    }

    /** Writes (H, W) labels as an 8-bit TIFF, atomically. */
    public static void writeMaskTiff(String path, byte[] labels, int height, int width) {
        if (labels == null || height <= 0 || width <= 0 || (long) height * width != labels.length) {
            // the library reads height * width labels: a shorter array would be read past its end
            throw new IllegalArgumentException("labels has " + (labels == null ? "no" : Integer.toString(labels.length))
                    + " values; a " + height + " x " + width + " mask needs height * width = " + ((long) height * width));
        }
        check(lib().lumos_mask_write_tiff(path, labels, height, width));
    }

    /**
     * One simulated frame: {@code [image, truth]}. Modality "ssqpm" (5 channels: I0, I45,
     * I90, I135 in ADU, phase in rad; truth 0/1 cell mask), "qpi" (phase in rad; truth
     * 0 background / 1 live / 2 dead) or "fluo" (mixed image; truth the 2 structures).
     * {@code configJson}: simulator settings such as {@code {"size": 256}}, or null.
     */
    public static Image[] simulate(String modality, String configJson, long seed) {
        LumosLibrary.Image im = new LumosLibrary.Image();
        LumosLibrary.Image tr = new LumosLibrary.Image();
        check(lib().lumos_simulate(modality, configJson, seed, im, tr));
        Image image = take(im);
        return new Image[]{image, take(tr)};
    }

    /** The training configuration (JSON) of a method ("dm-qpmnet", "pg-diffseg", ...) at a size ("tiny", "cpu", "paper"). */
    public static String trainRecipe(String method, String size) {
        PointerByReference out = new PointerByReference();
        check(lib().lumos_train_recipe(method, size, out));
        return out.getValue().getString(0, "UTF-8");
    }

    /**
     * Exports a model file to the bioimage.io model format (rdf.yaml 0.5, TorchScript
     * weights traced from the engine, test tensors): a folder, or a package when
     * {@code out} ends in ".zip". {@code optionsJson}: null or a JSON object (name,
     * description, authors, maintainers, license, tags, git_repo, version, tile, sample;
     * see lumos.h). Returns the report as JSON (path, input_shape, output_shape,
     * self_check, files). Blocking; writes nothing on failure.
     */
    public static String exportBioimageio(String modelPath, String out, String optionsJson) {
        PointerByReference report = new PointerByReference();
        check(lib().lumos_export_bioimageio(modelPath, out, optionsJson, report));
        return report.getValue().getString(0, "UTF-8");
    }

    /** A JSON string literal (quotes, backslashes and control characters escaped). */
    public static String jsonString(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') {
                b.append('\\').append(c);
            } else if (c < 0x20) {
                b.append(String.format("\\u%04x", (int) c));
            } else {
                b.append(c);
            }
        }
        return b.append('"').toString();
    }

    /**
     * Trains a model (blocking) from {@code dataDir} and writes it to {@code output}.
     * {@code listener} and {@code cancel} may be null. A cancelled training throws a
     * {@link LumosException} with {@link LumosException#isCancelled()} and keeps the last
     * checkpoint ({@code output + ".ckpt"}). An exception thrown by the listener stops the
     * training at its next progress report (the last checkpoint is kept) and is rethrown here.
     */
    public static Model train(String configJson, String dataDir, String output, final ProgressListener listener,
                              CancelToken cancel) {
        final RuntimeException[] failure = new RuntimeException[1];
        // the library polls one token: the caller's, else one of our own, so that a failing
        // listener can always stop the run
        final CancelToken own = cancel == null && listener != null ? new CancelToken() : null;
        final CancelToken token = cancel != null ? cancel : own;
        LumosLibrary.ProgressCallback cb = listener == null ? null : new LumosLibrary.ProgressCallback() {
            @Override
            public void invoke(Pointer progress, Pointer userData) {
                try {
                    listener.progress(new LumosLibrary.Progress(progress));
                } catch (RuntimeException e) { // must not unwind into the library
                    failure[0] = e;
                    token.cancel();
                }
            }
        };
        PointerByReference out = new PointerByReference();
        int status;
        try {
            status = lib().lumos_train(configJson, dataDir, output, cb, null, token == null ? null : token.handle(), out);
        } finally {
            if (own != null) {
                own.close();
            }
        }
        if (failure[0] != null) {
            if (out.getValue() != null) {
                lib().lumos_model_free(out.getValue());
            }
            throw failure[0];
        }
        check(status);
        return new Model(out.getValue());
    }
}
