package org.lumos.fiji;

import ij.IJ;
import ij.ImagePlus;
import ij.ImageStack;
import ij.Macro;
import ij.gui.GenericDialog;
import ij.process.ImageProcessor;
import org.lumos.CancelToken;
import org.lumos.Lumos;

import java.awt.GraphicsEnvironment;

/** What the three plugins share: parameters from a dialog or a macro string, Esc to cancel, image conversion. */
final class Plugins {
    private Plugins() {
    }

    /**
     * The options string when the plugin runs without a dialog: the plugin argument (from
     * {@code IJ.runPlugIn(imp, class, arg)}), or the macro options when headless. Null
     * means: show the dialog (which itself reads macro options when a macro runs it).
     */
    static String options(String arg) {
        if (arg != null && !arg.trim().isEmpty()) {
            return arg;
        }
        if (GraphicsEnvironment.isHeadless()) {
            String o = Macro.getOptions();
            return o == null ? "" : o;
        }
        return null;
    }

    static String get(String options, String key, String def) {
        return Macro.getValue(options, key, def);
    }

    static int getInt(String options, String key, int def) {
        String v = Macro.getValue(options, key, Integer.toString(def));
        try {
            return (int) Double.parseDouble(v);
        } catch (NumberFormatException e) {
            throw new IllegalArgumentException(key + "=" + v + " is not a number");
        }
    }

    static boolean getFlag(String options, String key) {
        // ImageJ writes a ticked checkbox as the bare key
        return (" " + options + " ").contains(" " + key + " ") || "true".equals(Macro.getValue(options, key, "false"));
    }

    /** Cancels the token when the user presses Esc (polled; stops with {@link #stop}). */
    static Thread watchEscape(final CancelToken token) {
        IJ.resetEscape();
        Thread t = new Thread(new Runnable() {
            @Override
            public void run() {
                while (!Thread.currentThread().isInterrupted()) {
                    if (IJ.escapePressed()) {
                        token.cancel();
                        IJ.showStatus("lumos: stopping ...");
                        return;
                    }
                    try {
                        Thread.sleep(100);
                    } catch (InterruptedException e) {
                        return;
                    }
                }
            }
        }, "lumos-escape");
        t.setDaemon(true);
        t.start();
        return t;
    }

    static void stop(Thread watcher) {
        watcher.interrupt();
        IJ.showProgress(1.0);
    }

    /**
     * The (C, H, W) float input of one (z, t) position of an image whose channels are the
     * model's input channels. A plain stack with as many slices as the model has channels
     * (a multi-page TIFF opened without hyperstack metadata) counts as channels.
     */
    static Lumos.Image frame(ImagePlus imp, int channels, int z, int t) {
        int w = imp.getWidth(), h = imp.getHeight();
        boolean slicesAreChannels = imp.getNChannels() == 1 && channels > 1 && imp.getStackSize() == channels;
        if (!slicesAreChannels && imp.getNChannels() != channels) {
            throw new IllegalArgumentException("the model takes " + channels + " channels but '" + imp.getTitle()
                    + "' has " + imp.getNChannels() + " (and " + imp.getStackSize() + " planes)");
        }
        float[] data = new float[channels * w * h];
        ImageStack stack = imp.getStack();
        for (int c = 0; c < channels; c++) {
            int index = slicesAreChannels ? c + 1 : imp.getStackIndex(c + 1, z, t);
            ImageProcessor ip = stack.getProcessor(index);
            for (int i = 0; i < w * h; i++) {
                data[c * w * h + i] = ip.getf(i);
            }
        }
        return new Lumos.Image(data, channels, h, w);
    }

    /** Number of (z, t) positions to process, given how the channels are laid out. */
    static int positions(ImagePlus imp, int channels) {
        boolean slicesAreChannels = imp.getNChannels() == 1 && channels > 1 && imp.getStackSize() == channels;
        return slicesAreChannels ? 1 : imp.getNSlices() * imp.getNFrames();
    }

    /** Shows a result; headless (no display) it stays available to the caller only. */
    static void show(ImagePlus imp) {
        if (!GraphicsEnvironment.isHeadless()) {
            imp.show();
        }
    }

    static GenericDialog dialog(String title) {
        return new GenericDialog(title);
    }

    static String fail(Exception e) {
        String m = e.getMessage() == null ? e.toString() : e.getMessage();
        // a running macro carries on (and can check for the missing result); the log says why
        if (GraphicsEnvironment.isHeadless() || IJ.isMacro()) {
            IJ.log("lumos: " + m);
        } else {
            IJ.error("lumos", m);
        }
        return m;
    }
}
