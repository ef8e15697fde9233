package org.lumos;

import com.sun.jna.Pointer;
import com.sun.jna.ptr.IntByReference;
import com.sun.jna.ptr.PointerByReference;

/**
 * A loaded model. Thread-safe: the library serializes calls on one model. Close it (or
 * use try-with-resources) to free it deterministically.
 */
public final class Model implements AutoCloseable {
    private Pointer handle;
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
    }

    /** Loads a model file on "auto", "cpu", "cuda" or "cuda:N". */
    public static Model load(String path, String device) {
        PointerByReference out = new PointerByReference();
        Lumos.check(Lumos.lib().lumos_model_load(path, device, out));
        return new Model(out.getValue());
    }

    private synchronized Pointer h() {
        if (handle == null) {
            throw new IllegalStateException("the model was closed");
        }
        return handle;
    }

    private static Pointer tok(CancelToken c) {
        return c == null ? null : c.handle();
    }

    /** Saves the model (atomically). */
    public void save(String path) {
        Lumos.check(Lumos.lib().lumos_model_save(h(), path));
    }

    /**
     * Inference arithmetic for later segment / decompose calls: false = float32 (the default),
     * true = bfloat16 autocast (the fast path on a CUDA GPU with tensor cores; probabilities
     * change at bfloat16 rounding). Training is unaffected.
     */
    public void setBfloat16(boolean bf16) {
        Lumos.check(Lumos.lib().lumos_model_set_precision(h(), bf16 ? 1 : 0));
    }

    /** Whether inference runs in bfloat16 (see {@link #setBfloat16}). */
    public boolean isBfloat16() {
        IntByReference p = new IntByReference();
        Lumos.check(Lumos.lib().lumos_model_precision(h(), p));
        return p.getValue() == 1;
    }

    /** The model's metadata as JSON (config, provenance, normalization). */
    public String metadataJson() {
        PointerByReference s = new PointerByReference();
        Lumos.check(Lumos.lib().lumos_model_metadata_json(h(), s));
        return s.getValue().getString(0, "UTF-8");
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
        Lumos.check(Lumos.lib().lumos_model_diffusion_options(h(), o));
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
        Lumos.check(Lumos.lib().lumos_segment(h(), image.data, image.channels, image.height, image.width,
                tiling == null ? defaultTiling() : tiling, tok(cancel), out, out.length));
        return out;
    }

    /** PG-DiffSeg segmentation with explicit sampling options; returns H*W labels. */
    public byte[] segmentDiffusion(Lumos.Image image, LumosLibrary.DiffusionOptions diffusion, CancelToken cancel) {
        checkImage(image);
        byte[] out = new byte[image.height * image.width];
        Lumos.check(Lumos.lib().lumos_segment_diffusion(h(), image.data, image.channels, image.height, image.width,
                defaultTiling(), diffusion, tok(cancel), out, out.length));
        return out;
    }

    /** Splits an (H, W) image of two superimposed structures; returns 2*H*W floats (structure-major). */
    public float[] decompose(float[] image, int height, int width, LumosLibrary.DecomposeOptions options,
                             CancelToken cancel) {
        float[] out = new float[2 * height * width];
        Lumos.check(Lumos.lib().lumos_decompose(h(), image, height, width,
                options == null ? defaultDecomposition() : options, tok(cancel), out, out.length));
        return out;
    }

    @Override
    public synchronized void close() {
        if (handle != null) {
            Lumos.lib().lumos_model_free(handle);
            handle = null;
        }
    }
}
