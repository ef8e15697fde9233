package org.lumos.fiji;

import ij.IJ;
import ij.gui.GenericDialog;
import ij.plugin.PlugIn;
import org.lumos.CancelToken;
import org.lumos.Lumos;
import org.lumos.LumosException;
import org.lumos.LumosLibrary;
import org.lumos.Model;

import java.io.File;
import java.util.Locale;
import java.util.regex.Matcher;

/**
 * Plugins > lumos > Train: trains a model from a data folder (images/ + masks/ for
 * segmentation, targets/ for muSplit; see the README) with one of the engine's recipes.
 * Progress and the loss go to the status bar and the progress bar; Esc stops and keeps the
 * last checkpoint (MODEL.lumos.ckpt; tick "resume" to continue from it).
 *
 * <p>Macro: {@code run("Lumos Train", "method=dm-qpmnet size=cpu data=/path/data
 * epochs=0 device=auto seed=0 model=/path/m.lumos");} (epochs 0 = the recipe's; add
 * {@code resume} to continue from the checkpoint).
 */
public class Lumos_Train implements PlugIn {
    static final String[] METHODS = {"dm-qpmnet", "early-fusion", "angles-only", "phase-only", "nnunet",
            "pg-diffseg", "musplit-unet", "musplit-hvae"};
    static final String[] SIZES = {"tiny", "cpu", "paper"};

    /** The path of the model the last run wrote (for macros and tests); null after a failure. */
    public static volatile String lastResult;

    @Override
    public void run(String arg) {
        lastResult = null;
        String method, size, data, device, output;
        int epochs, seed;
        boolean resume;
        String options = Plugins.options(arg);
        if (options != null) {
            method = Plugins.get(options, "method", "dm-qpmnet");
            size = Plugins.get(options, "size", "cpu");
            data = Plugins.get(options, "data", "");
            epochs = Plugins.getInt(options, "epochs", 0);
            device = Plugins.get(options, "device", "auto");
            seed = Plugins.getInt(options, "seed", 0);
            output = Plugins.get(options, "model", "");
            resume = Plugins.getFlag(options, "resume");
        } else {
            GenericDialog gd = Plugins.dialog("Lumos Train");
            gd.addChoice("method", METHODS, "dm-qpmnet");
            gd.addChoice("size", SIZES, "cpu");
            gd.addDirectoryField("data", "", 40);
            gd.addNumericField("epochs", 0, 0, 6, "(0 = the recipe's)");
            gd.addChoice("device", new String[]{"auto", "cpu", "cuda"}, "auto");
            gd.addNumericField("seed", 0, 0, 10, "");
            gd.addFileField("model", "model.lumos", 40);
            gd.addCheckbox("resume", false);
            gd.showDialog();
            if (gd.wasCanceled()) {
                return;
            }
            method = gd.getNextChoice();
            size = gd.getNextChoice();
            data = gd.getNextString();
            epochs = (int) gd.getNextNumber();
            device = gd.getNextChoice();
            seed = (int) gd.getNextNumber();
            output = gd.getNextString();
            resume = gd.getNextBoolean();
        }
        File ckpt = new File(output + ".ckpt");
        long before = ckpt.isFile() ? ckpt.lastModified() : -1;
        try {
            train(method, size, data, epochs, device, seed, output, resume);
            lastResult = output;
        } catch (LumosException e) {
            if (e.isCancelled()) {
                // only a checkpoint this run wrote (or the one it resumed from) belongs to it
                boolean ours = ckpt.isFile() && (resume || ckpt.lastModified() != before);
                String kept = ours ? "; last checkpoint kept: " + ckpt + " (tick resume to continue)" : "";
                IJ.log("lumos: training stopped" + kept);
                IJ.showStatus("lumos: training stopped" + kept);
            } else {
                Plugins.fail(e);
            }
        } catch (RuntimeException e) {
            Plugins.fail(e);
        } catch (LinkageError e) {
            Plugins.fail(e);
        }
    }

    /**
     * The training configuration: the recipe with the user's epochs, device, seed and
     * resume. The recipe JSON comes from the engine, pretty-printed with two-space
     * indentation, so its top-level keys are exactly the lines indented by two spaces.
     */
    static String config(String method, String size, int epochs, String device, int seed, boolean resume) {
        String json = Lumos.trainRecipe(method, size);
        if (epochs > 0) {
            json = setTop(json, "epochs", Integer.toString(epochs));
        }
        json = setTop(json, "device", "\"" + device.replace("\"", "") + "\"");
        json = setTop(json, "seed", Integer.toString(seed));
        return setTop(json, "resume", resume ? "true" : "false");
    }

    static String setTop(String json, String key, String value) {
        String re = "(?m)^  \"" + key + "\": [^,\\n]*";
        java.util.regex.Pattern p = java.util.regex.Pattern.compile(re);
        Matcher m = p.matcher(json);
        if (!m.find()) {
            throw new IllegalStateException("the recipe has no top-level '" + key + "'");
        }
        return m.replaceFirst(Matcher.quoteReplacement("  \"" + key + "\": " + value));
    }

    /** Trains (blocking) and writes the model to {@code output}. */
    public static void train(String method, String size, String data, int epochs, String device, int seed,
                             String output, boolean resume) {
        if (data == null || data.isEmpty() || !new File(data).isDirectory()) {
            throw new IllegalArgumentException("'" + data + "' is not a folder; choose the training data folder");
        }
        if (output == null || !output.endsWith(".lumos")) {
            throw new IllegalArgumentException("the model file should end in .lumos: '" + output + "'");
        }
        String cfg = config(method, size, epochs, device, seed, resume);
        try (CancelToken token = new CancelToken()) {
            Thread watcher = Plugins.watchEscape(token);
            try {
                Model m = Lumos.train(cfg, data, output, new Lumos.ProgressListener() {
                    @Override
                    public void progress(LumosLibrary.Progress p) {
                        if (p.stage == 1) {
                            long done = p.epoch * p.iterations + p.iteration + 1;
                            IJ.showProgress((int) done, (int) (p.epochs * p.iterations));
                            IJ.showStatus(String.format(Locale.ROOT, "lumos: epoch %d/%d, loss %.4f (Esc stops)",
                                    p.epoch + 1, p.epochs, p.loss));
                        } else if (p.stage == 2 && !Double.isNaN(p.val_metric)) {
                            IJ.log(String.format(Locale.ROOT, "lumos: epoch %d/%d loss %.4f validation Dice %.3f",
                                    p.epoch + 1, p.epochs, p.loss, p.val_metric));
                        }
                    }
                }, token);
                m.close();
            } finally {
                Plugins.stop(watcher);
            }
        }
        IJ.log("lumos: trained " + output);
        IJ.showStatus("lumos: trained " + output);
    }
}
