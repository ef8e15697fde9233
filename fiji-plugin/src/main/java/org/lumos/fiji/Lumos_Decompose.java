package org.lumos.fiji;

import ij.CompositeImage;
import ij.IJ;
import ij.ImagePlus;
import ij.ImageStack;
import ij.gui.GenericDialog;
import ij.plugin.PlugIn;
import ij.process.FloatProcessor;
import org.lumos.CancelToken;
import org.lumos.Lumos;
import org.lumos.LumosException;
import org.lumos.LumosLibrary;
import org.lumos.Model;

/**
 * Plugins > lumos > Decompose: splits each plane of the current single-channel image into
 * the two superimposed structures with a muSplit model. The result is a 2-channel
 * hyperstack (one channel per structure) with the input's calibration. Esc stops.
 *
 * <p>Macro: {@code run("Lumos Decompose", "model=/path/s.lumos device=cpu [bfloat16] tile=0 keep=0
 * samples=1 seed=0");} (tile 0 = the training patch, keep 0 = half the tile).
 */
public class Lumos_Decompose implements PlugIn {
    /** The image the last run produced (for macros and tests); null after a failure. */
    public static volatile ImagePlus lastResult;

    static String lastModel = "";

    @Override
    public void run(String arg) {
        lastResult = null;
        ImagePlus imp = Plugins.currentImage("decompose");
        if (imp == null) {
            return;
        }
        String model, device;
        boolean bf16;
        int tile, keep, samples, seed;
        String options = Plugins.options(arg);
        if (options != null) {
            model = Plugins.get(options, "model", lastModel);
            device = Plugins.get(options, "device", "auto");
            bf16 = Plugins.getFlag(options, "bfloat16");
            tile = Plugins.getInt(options, "tile", 0);
            keep = Plugins.getInt(options, "keep", 0);
            samples = Plugins.getInt(options, "samples", 1);
            seed = Plugins.getInt(options, "seed", 0);
        } else {
            GenericDialog gd = Plugins.dialog("Lumos Decompose");
            gd.addFileField("model", lastModel, 40);
            gd.addChoice("device", new String[]{"auto", "cpu", "cuda"}, "auto");
            gd.addCheckbox("bfloat16", false);
            gd.addNumericField("tile", 0, 0, 6, "px (0 = training patch)");
            gd.addNumericField("keep", 0, 0, 6, "px kept per tile (0 = half)");
            gd.addNumericField("samples", 1, 0, 6, "posterior samples (HVAE)");
            gd.addNumericField("seed", 0, 0, 10, "");
            gd.showDialog();
            if (gd.wasCanceled()) {
                return;
            }
            model = gd.getNextString();
            device = gd.getNextChoice();
            bf16 = gd.getNextBoolean();
            tile = (int) gd.getNextNumber();
            keep = (int) gd.getNextNumber();
            samples = (int) gd.getNextNumber();
            seed = (int) gd.getNextNumber();
        }
        lastModel = model;
        try {
            ImagePlus out = decompose(imp, model, device, bf16, tile, keep, samples, seed);
            lastResult = out;
            Plugins.show(out);
        } catch (LumosException e) {
            if (e.isCancelled()) {
                IJ.showStatus("lumos: decomposition stopped");
            } else {
                Plugins.fail(e);
            }
        } catch (RuntimeException e) {
            Plugins.fail(e);
        } catch (LinkageError e) {
            Plugins.fail(e);
        }
    }

    /** Decomposes every plane of {@code imp}; returns a (2 channels x planes) hyperstack. */
    public static ImagePlus decompose(ImagePlus imp, String modelPath, String device, int tile, int keep, int samples,
                                      int seed) {
        return decompose(imp, modelPath, device, false, tile, keep, samples, seed);
    }

    /** As above; {@code bfloat16}: inference under bfloat16 autocast (faster on recent GPUs). */
    public static ImagePlus decompose(ImagePlus imp, String modelPath, String device, boolean bfloat16,
                                      int tile, int keep, int samples, int seed) {
        if (modelPath == null || modelPath.isEmpty()) {
            throw new IllegalArgumentException("choose a model file (.lumos)");
        }
        if (Plugins.isRgb(imp)) {
            throw new IllegalArgumentException("'" + imp.getTitle() + "' is an RGB image; decomposition takes one grey"
                    + " channel holding both structures: convert it first (Image > Type > 32-bit, or Image > Color >"
                    + " Split Channels and pick one)");
        }
        if (imp.getNChannels() != 1) {
            throw new IllegalArgumentException("'" + imp.getTitle() + "' has " + imp.getNChannels()
                    + " channels; decomposition takes one channel holding both structures");
        }
        try (Model model = Model.load(modelPath, device); CancelToken token = new CancelToken()) {
            model.setBfloat16(bfloat16);
            if (!model.canDecompose) {
                throw new IllegalArgumentException("'" + modelPath + "' is a " + model.kind
                        + " model, which does not decompose; use Lumos Segment");
            }
            LumosLibrary.DecomposeOptions o = Model.defaultDecomposition();
            o.tile = tile;
            o.keep = keep;
            o.samples = Math.max(1, samples);
            o.seed = seed;
            int w = imp.getWidth(), h = imp.getHeight(), n = imp.getStackSize();
            ImageStack out = new ImageStack(w, h);
            String[] names = model.classNames.length == 2 ? model.classNames : new String[]{"structure 1", "structure 2"};
            Thread watcher = Plugins.watchEscape(token);
            try {
                for (int i = 1; i <= n; i++) {
                    IJ.showStatus("lumos: decomposing " + i + "/" + n);
                    IJ.showProgress(i - 1, n);
                    float[] x = Plugins.pixels(imp, imp.getStack().getProcessor(i), 0);
                    float[] y = model.decompose(x, h, w, o, token);
                    for (int c = 0; c < 2; c++) {
                        float[] part = new float[w * h];
                        System.arraycopy(y, c * w * h, part, 0, w * h);
                        out.addSlice(names[c], new FloatProcessor(w, h, part));
                    }
                }
            } finally {
                Plugins.stop(watcher);
            }
            ImagePlus res = new ImagePlus(imp.getShortTitle() + "-decomposed", out);
            res.setDimensions(2, imp.getNSlices(), imp.getNFrames());
            res.setCalibration(imp.getCalibration().copy());
            res.setOpenAsHyperStack(true);
            CompositeImage comp = new CompositeImage(res, CompositeImage.COLOR);
            for (int c = 1; c <= 2; c++) {
                comp.setC(c);
                comp.resetDisplayRange();
            }
            comp.setC(1);
            return comp;
        }
    }
}
