package org.lumos.fiji;

import ij.IJ;
import ij.ImagePlus;
import ij.ImageStack;
import ij.gui.GenericDialog;
import ij.plugin.PlugIn;
import ij.process.ByteProcessor;
import org.lumos.CancelToken;
import org.lumos.Lumos;
import org.lumos.LumosException;
import org.lumos.LumosLibrary;
import org.lumos.Model;

/**
 * Plugins > lumos > Segment: segments the current image with a DM-QPMNet, nnU-Net or
 * PG-DiffSeg model. The image's channels are the model's input channels (for ssQPM: I0,
 * I45, I90, I135, phase); every slice and frame is segmented. The labels come out as a
 * new 8-bit image with the calibration of the input. Esc stops.
 *
 * <p>Macro: {@code run("Lumos Segment", "model=/path/m.lumos device=cpu [bfloat16] inversion=0
 * sampling=0 samples=0 seed=0");} (PG-DiffSeg fields: 0 = the model's saved sampling).
 */
public class Lumos_Segment implements PlugIn {
    /** The image the last run produced (for macros and tests); null after a failure. */
    public static volatile ImagePlus lastResult;

    static String lastModel = "";

    @Override
    public void run(String arg) {
        lastResult = null;
        ImagePlus imp = Plugins.currentImage("segment");
        if (imp == null) {
            return;
        }
        String model, device;
        boolean bf16;
        int inversion, sampling, samples, seed;
        String options = Plugins.options(arg);
        if (options != null) {
            model = Plugins.get(options, "model", lastModel);
            device = Plugins.get(options, "device", "auto");
            bf16 = Plugins.getFlag(options, "bfloat16");
            inversion = Plugins.getInt(options, "inversion", 0);
            sampling = Plugins.getInt(options, "sampling", 0);
            samples = Plugins.getInt(options, "samples", 0);
            seed = Plugins.getInt(options, "seed", 0);
        } else {
            GenericDialog gd = Plugins.dialog("Lumos Segment");
            gd.addFileField("model", lastModel, 40);
            gd.addChoice("device", new String[]{"auto", "cpu", "cuda"}, "auto");
            gd.addCheckbox("bfloat16", false);
            gd.addMessage("PG-DiffSeg sampling (0 = the model's own):");
            gd.addNumericField("inversion", 0, 0, 6, "DDIM inversion steps");
            gd.addNumericField("sampling", 0, 0, 6, "DDIM sampling steps");
            gd.addNumericField("samples", 0, 0, 6, "majority voting over samples");
            gd.addNumericField("seed", 0, 0, 10, "");
            gd.showDialog();
            if (gd.wasCanceled()) {
                return;
            }
            model = gd.getNextString();
            device = gd.getNextChoice();
            bf16 = gd.getNextBoolean();
            inversion = (int) gd.getNextNumber();
            sampling = (int) gd.getNextNumber();
            samples = (int) gd.getNextNumber();
            seed = (int) gd.getNextNumber();
        }
        lastModel = model;
        try {
            ImagePlus out = segment(imp, model, device, bf16, inversion, sampling, samples, seed);
            lastResult = out;
            Plugins.show(out);
        } catch (LumosException e) {
            if (e.isCancelled()) {
                IJ.showStatus("lumos: segmentation stopped");
            } else {
                Plugins.fail(e);
            }
        } catch (RuntimeException e) {
            Plugins.fail(e);
        } catch (LinkageError e) {
            Plugins.fail(e);
        }
    }

    /** Segments every (z, t) position of {@code imp}; returns the label image. */
    public static ImagePlus segment(ImagePlus imp, String modelPath, String device, int inversion, int sampling,
                                    int samples, int seed) {
        return segment(imp, modelPath, device, false, inversion, sampling, samples, seed);
    }

    /** As above; {@code bfloat16}: inference under bfloat16 autocast (faster on recent GPUs). */
    public static ImagePlus segment(ImagePlus imp, String modelPath, String device, boolean bfloat16,
                                    int inversion, int sampling, int samples, int seed) {
        if (modelPath == null || modelPath.isEmpty()) {
            throw new IllegalArgumentException("choose a model file (.lumos)");
        }
        try (Model model = Model.load(modelPath, device); CancelToken token = new CancelToken()) {
            model.setBfloat16(bfloat16);
            if (!model.canSegment) {
                throw new IllegalArgumentException("'" + modelPath + "' is a " + model.kind
                        + " model, which does not segment; use Lumos Decompose");
            }
            LumosLibrary.DiffusionOptions diffusion = null;
            if ("pgdiff".equals(model.kind)) {
                diffusion = model.diffusionOptions();
                if (inversion > 0) {
                    diffusion.inversion_steps = inversion;
                }
                if (sampling > 0) {
                    diffusion.sampling_steps = sampling;
                }
                if (samples > 0) {
                    diffusion.samples = samples;
                }
                if (seed > 0) {
                    diffusion.seed = seed;
                }
            }
            int n = Plugins.positions(imp, model.inputChannels);
            int w = imp.getWidth(), h = imp.getHeight();
            ImageStack labels = new ImageStack(w, h);
            Thread watcher = Plugins.watchEscape(token);
            try {
                int i = 0;
                for (int t = 1; t <= (n == 1 ? 1 : imp.getNFrames()); t++) {
                    for (int z = 1; z <= (n == 1 ? 1 : imp.getNSlices()); z++) {
                        IJ.showStatus("lumos: segmenting " + (i + 1) + "/" + n);
                        IJ.showProgress(i, n);
                        Lumos.Image x = Plugins.frame(imp, model.inputChannels, z, t);
                        byte[] y = diffusion == null ? model.segment(x, null, token)
                                : model.segmentDiffusion(x, diffusion, token);
                        labels.addSlice(n == 1 ? "labels" : "z" + z + " t" + t, new ByteProcessor(w, h, y));
                        i++;
                    }
                }
            } finally {
                Plugins.stop(watcher);
            }
            ImagePlus out = new ImagePlus(imp.getShortTitle() + "-" + model.kind + "-labels", labels);
            if (n > 1) {
                out.setDimensions(1, n == 1 ? 1 : imp.getNSlices(), n == 1 ? 1 : imp.getNFrames());
            }
            out.setCalibration(imp.getCalibration().copy());
            out.setDisplayRange(0, Math.max(1, model.classes - 1));
            out.setProperty("Info", "lumos " + Lumos.version() + " " + model.kind + " classes: "
                    + String.join(", ", model.classNames));
            IJ.showStatus("lumos: segmented " + n + " plane(s)");
            return out;
        }
    }
}
