package org.lumos.fiji;

import ij.IJ;
import ij.ImagePlus;
import ij.ImageStack;
import ij.Macro;
import ij.WindowManager;
import ij.gui.GenericDialog;
import ij.macro.Interpreter;
import ij.process.ImageProcessor;
import org.lumos.CancelToken;
import org.lumos.Lumos;

import java.awt.GraphicsEnvironment;

/** What the plugins share: parameters from a dialog or a macro string, Esc to cancel, image conversion. */
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
     * The current image, or null after telling the user that none is open. (Not
     * {@code IJ.getImage()}: without an image and a window it ends the Java process, which
     * headless, in a batch macro or with ImageJ used as a library means exit code 0.)
     */
    static ImagePlus currentImage(String what) {
        ImagePlus imp = WindowManager.getCurrentImage();
        if (imp == null) {
            fail(new IllegalStateException("no image is open: open the image to " + what + " first"));
        }
        return imp;
    }

    static boolean isRgb(ImagePlus imp) {
        return imp.getType() == ImagePlus.COLOR_RGB;
    }

    /**
     * The values of one plane as the engine reads them from the same TIFF: a signed 16-bit
     * image (stored by ImageJ with 32768 added and a calibration that removes it) gives its
     * signed values; {@code rgb} 1, 2, 3 picks the red, green or blue channel of an RGB
     * plane (0 for any other type).
     */
    static float[] pixels(ImagePlus imp, ImageProcessor ip, int rgb) {
        int n = ip.getWidth() * ip.getHeight();
        float[] out = new float[n];
        if (rgb > 0) {
            int[] px = (int[]) ip.getPixels();
            int shift = 8 * (3 - rgb);
            for (int i = 0; i < n; i++) {
                out[i] = (px[i] >> shift) & 0xff;
            }
            return out;
        }
        float offset = imp.getCalibration().isSigned16Bit() ? 32768f : 0f;
        for (int i = 0; i < n; i++) {
            out[i] = ip.getf(i) - offset;
        }
        return out;
    }

    /**
     * The (C, H, W) float input of one (z, t) position of an image whose channels are the
     * model's input channels. A plain stack with as many slices as the model has channels
     * (a multi-page TIFF opened without hyperstack metadata) counts as channels; an RGB
     * image has three channels (red, green, blue), as when the engine reads its TIFF.
     */
    static Lumos.Image frame(ImagePlus imp, int channels, int z, int t) {
        int w = imp.getWidth(), h = imp.getHeight();
        boolean rgb = isRgb(imp);
        if (rgb && channels != 3) {
            throw new IllegalArgumentException("'" + imp.getTitle() + "' is an RGB image (3 colour channels) but the model takes "
                    + channels + " channel" + (channels == 1 ? "" : "s")
                    + ": convert it first (Image > Type > 32-bit for a grey image, or Image > Color > Split Channels)");
        }
        boolean slicesAreChannels = !rgb && imp.getNChannels() == 1 && channels > 1 && imp.getStackSize() == channels;
        if (!rgb && !slicesAreChannels && imp.getNChannels() != channels) {
            throw new IllegalArgumentException("the model takes " + channels + " channels but '" + imp.getTitle()
                    + "' has " + imp.getNChannels() + " (and " + imp.getStackSize() + " planes)");
        }
        float[] data = new float[channels * w * h];
        ImageStack stack = imp.getStack();
        for (int c = 0; c < channels; c++) {
            int index = rgb ? imp.getStackIndex(1, z, t) : slicesAreChannels ? c + 1 : imp.getStackIndex(c + 1, z, t);
            float[] plane = pixels(imp, stack.getProcessor(index), rgb ? c + 1 : 0);
            System.arraycopy(plane, 0, data, c * w * h, w * h);
        }
        return new Lumos.Image(data, channels, h, w);
    }

    /** Number of (z, t) positions to process, given how the channels are laid out. */
    static int positions(ImagePlus imp, int channels) {
        boolean slicesAreChannels = !isRgb(imp) && imp.getNChannels() == 1 && channels > 1 && imp.getStackSize() == channels;
        return slicesAreChannels ? 1 : imp.getNSlices() * imp.getNFrames();
    }

    /**
     * Shows a result. Headless (no display) it stays available to the caller only, except in
     * a batch-mode macro, where show() opens no window but makes it the macro's current image.
     */
    static void show(ImagePlus imp) {
        if (!GraphicsEnvironment.isHeadless() || Interpreter.isBatchMode()) {
            imp.show();
        }
    }

    static GenericDialog dialog(String title) {
        return new GenericDialog(title);
    }

    /**
     * A missing or mismatched native library (the binding's UnsatisfiedLinkError, whose
     * message already names the file, the reason and the fix) or a missing jar (JNA, the
     * binding: NoClassDefFoundError) reported like any failure.
     */
    static String fail(LinkageError e) {
        String m = e.getMessage() == null ? e.toString() : e.getMessage();
        if (m.startsWith(Lumos.LOAD_FAILURE)) {
            return fail(new IllegalStateException(m, e));
        }
        if (e instanceof NoClassDefFoundError && (m.startsWith("com/sun/jna/") || m.startsWith("org/lumos/"))) {
            String jar = m.startsWith("org/lumos/") ? "the lumos Java binding, Fiji.app/jars/lumos-java-*.jar"
                    : "JNA, Fiji.app/jars/jna-*.jar";
            return fail(new IllegalStateException("lumos cannot run: the class " + m + " is missing (" + jar
                    + "): unzip the lumos-fiji zip over the Fiji.app folder again", e));
        }
        return fail(new IllegalStateException("the lumos native library cannot be used: " + m
                + " (unzip the lumos-fiji zip over the Fiji.app folder again: it holds the plugins, the binding"
                + " jars/lumos-java-*.jar, JNA and the native libraries in lib/; or set the system property"
                + " lumos.library to the path of liblumos; see the plugin's README)", e));
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
