package org.lumos;

import com.sun.jna.Pointer;
import com.sun.jna.ptr.IntByReference;
import com.sun.jna.ptr.PointerByReference;

import java.util.concurrent.locks.ReentrantReadWriteLock;

/**
 * A loaded model. Thread-safe: the library serializes calls on one model, and
 * {@link #close()} waits for calls in progress on other threads to return before it frees
 * the model (a call after {@code close()} throws {@link IllegalStateException}). Close it
 * (or use try-with-resources) to free it deterministically.
 */
public final class Model implements AutoCloseable {
    private Pointer handle;
    /** Native calls hold the read lock, {@link #close()} the write lock. */
    private final ReentrantReadWriteLock lock = new ReentrantReadWriteLock();
    /** "unet", "dmqpm", "musplit" or "pgdiff". */
    public final String kind;
    public final int inputChannels;
    public final int classes;
    public final int patchHeight;
    public final int patchWidth;
    public final boolean canSegment;
    public final boolean canDecompose;
    public final String[] channelNames;
    public final String[] classNames;

    Model(Pointer handle) {
        this.handle = handle;
        try {
            LumosLibrary l = Lumos.lib();
            LumosLibrary.ModelInfo info = new LumosLibrary.ModelInfo();
            Lumos.check(l.lumos_model_info(handle, info));
            inputChannels = (int) info.n_input_channels;
            classes = (int) info.n_classes;
            patchHeight = (int) info.patch_height;
            patchWidth = (int) info.patch_width;
            canSegment = info.can_segment != 0;
            canDecompose = info.can_decompose != 0;
            PointerByReference s = new PointerByReference();
            Lumos.check(l.lumos_model_kind_name(handle, s));
            kind = s.getValue().getString(0, "UTF-8");
            channelNames = new String[inputChannels];
            for (int i = 0; i < inputChannels; i++) {
                Lumos.check(l.lumos_model_channel_name(handle, i, s));
                channelNames[i] = s.getValue().getString(0, "UTF-8");
            }
            classNames = new String[classes];
            for (int i = 0; i < classes; i++) {
                Lumos.check(l.lumos_model_class_name(handle, i, s));
                classNames[i] = s.getValue().getString(0, "UTF-8");
            }
        } catch (RuntimeException | Error e) {
            // nothing else owns the handle yet
            Lumos.lib().lumos_model_free(handle);
            this.handle = null;
            throw e;
        }
    }

    /** Loads a model file on "auto", "cpu", "cuda" or "cuda:N". */
    public static Model load(String path, String device) {
        PointerByReference out = new PointerByReference();
        Lumos.check(Lumos.lib().lumos_model_load(path, device, out));
        return new Model(out.getValue());
    }

    /** The handle, with the read lock held: release it with {@link #done()} in a finally block. */
    private Pointer h() {
        lock.readLock().lock();
        if (handle == null) {
            lock.readLock().unlock();
            throw new IllegalStateException("the model was closed");
        }
        return handle;
    }

    private void done() {
        lock.readLock().unlock();
    }

    private static Pointer tok(CancelToken c) {
        return c == null ? null : c.handle();
    }

    /** Saves the model (atomically). */
    public void save(String path) {
        Pointer m = h();
        try {
            Lumos.check(Lumos.lib().lumos_model_save(m, path));
        } finally {
            done();
        }
    }

    /**
     * Inference arithmetic for later segment / decompose calls: false = float32 (the default),
     * true = bfloat16 autocast (the fast path on a CUDA GPU with tensor cores; probabilities
     * change at bfloat16 rounding). Training is unaffected.
     */
    public void setBfloat16(boolean bf16) {
        Pointer m = h();
        try {
            Lumos.check(Lumos.lib().lumos_model_set_precision(m, bf16 ? 1 : 0));
        } finally {
            done();
        }
    }

    /** Whether inference runs in bfloat16 (see {@link #setBfloat16}). */
    public boolean isBfloat16() {
        IntByReference p = new IntByReference();
        Pointer m = h();
        try {
            Lumos.check(Lumos.lib().lumos_model_precision(m, p));
        } finally {
            done();
        }
        return p.getValue() == 1;
    }

    /** The model's metadata as JSON (config, provenance, normalization). */
    public String metadataJson() {
        PointerByReference s = new PointerByReference();
        Pointer m = h();
        try {
            Lumos.check(Lumos.lib().lumos_model_metadata_json(m, s));
            return s.getValue().getString(0, "UTF-8");
        } finally {
            done();
        }
    }

    /** Default tiling: the model's patch, half overlap, batch 4, no mirroring. */
    public static LumosLibrary.TileOptions defaultTiling() {
        LumosLibrary.TileOptions o = new LumosLibrary.TileOptions();
        Lumos.check(Lumos.lib().lumos_tile_options_default(o));
        return o;
    }

    /** The sampling a PG-DiffSeg model was saved with. */
    public LumosLibrary.DiffusionOptions diffusionOptions() {
        LumosLibrary.DiffusionOptions o = new LumosLibrary.DiffusionOptions();
        Pointer m = h();
        try {
            Lumos.check(Lumos.lib().lumos_model_diffusion_options(m, o));
        } finally {
            done();
        }
        return o;
    }

    /** Default decomposition options (the model's patch, half kept, one sample, seed 0). */
    public static LumosLibrary.DecomposeOptions defaultDecomposition() {
        LumosLibrary.DecomposeOptions o = new LumosLibrary.DecomposeOptions();
        Lumos.check(Lumos.lib().lumos_decompose_options_default(o));
        return o;
    }

    private static void checkImage(Lumos.Image image) {
        if (image == null) {
            throw new IllegalArgumentException("image is null");
        }
    }

    /** Segments a (C, H, W) image; returns H*W class labels (row-major). Tiling may be null. */
    public byte[] segment(Lumos.Image image, LumosLibrary.TileOptions tiling, CancelToken cancel) {
        checkImage(image);
        byte[] out = new byte[image.height * image.width];
        LumosLibrary.TileOptions t = tiling == null ? defaultTiling() : tiling;
        Pointer m = h();
        try {
            Lumos.check(Lumos.lib().lumos_segment(m, image.data, image.channels, image.height, image.width,
                    t, tok(cancel), out, out.length));
        } finally {
            done();
        }
        return out;
    }

    /** PG-DiffSeg segmentation with explicit sampling options; returns H*W labels. */
    public byte[] segmentDiffusion(Lumos.Image image, LumosLibrary.DiffusionOptions diffusion, CancelToken cancel) {
        checkImage(image);
        byte[] out = new byte[image.height * image.width];
        LumosLibrary.TileOptions t = defaultTiling();
        Pointer m = h();
        try {
            Lumos.check(Lumos.lib().lumos_segment_diffusion(m, image.data, image.channels, image.height, image.width,
                    t, diffusion, tok(cancel), out, out.length));
        } finally {
            done();
        }
        return out;
    }

    /** Splits an (H, W) image of two superimposed structures; returns 2*H*W floats (structure-major). */
    public float[] decompose(float[] image, int height, int width, LumosLibrary.DecomposeOptions options,
                             CancelToken cancel) {
        if (image == null) {
            throw new IllegalArgumentException("image is null");
        }
        if (height <= 0 || width <= 0 || (long) height * width != image.length) {
            // the library reads height * width values: a shorter array would be read past its end
            throw new IllegalArgumentException("image has " + image.length + " values; a " + height + " x " + width
                    + " image needs height * width = " + ((long) height * width) + " (row-major)");
        }
        if (2L * height * width > Integer.MAX_VALUE) {
            throw new IllegalArgumentException(height + " x " + width + " is too large for one Java array of results");
        }
        float[] out = new float[2 * height * width];
        LumosLibrary.DecomposeOptions o = options == null ? defaultDecomposition() : options;
        Pointer m = h();
        try {
            Lumos.check(Lumos.lib().lumos_decompose(m, image, height, width, o, tok(cancel), out, out.length));
        } finally {
            done();
        }
        return out;
    }

    /** Frees the model; waits first for calls running on other threads to return. */
    @Override
    public void close() {
        lock.writeLock().lock();
        try {
            if (handle != null) {
                Lumos.lib().lumos_model_free(handle);
                handle = null;
            }
        } finally {
            lock.writeLock().unlock();
        }
    }
}
