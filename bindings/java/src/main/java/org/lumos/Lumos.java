package org.lumos;

import com.sun.jna.Library;
import com.sun.jna.Native;
import com.sun.jna.Pointer;
import com.sun.jna.ptr.PointerByReference;

import java.io.BufferedReader;
import java.io.File;
import java.io.FileReader;
import java.io.IOException;
import java.security.CodeSource;
import java.util.HashMap;
import java.util.LinkedHashSet;
import java.util.Map;
import java.util.Set;

/**
 * Entry point of the Java binding of the lumos C API (include/lumos.h). Nothing is
 * re-implemented: every call goes to liblumos. Failed calls throw {@link LumosException}
 * carrying the library's message.
 *
 * <p>The library is looked for, in this order (see {@link #lib()}):
 * <ol>
 * <li>the system property {@code lumos.library} (a full path to liblumos.so);</li>
 * <li>the environment variable {@code LUMOS_LIBRARY} (the same);</li>
 * <li>the bundle's copy next to this binding's jar: for {@code Fiji.app/jars/lumos-java-VERSION.jar},
 * {@code Fiji.app/lib/<platform>/liblumos.so} ({@code linux64}, {@code macosx} or {@code win64}, as
 * Fiji names them; {@link System#mapLibraryName} gives the file name), used when that file exists;</li>
 * <li>JNA by name ("lumos"): {@code jna.library.path}, then the system's library path.</li>
 * </ol>
 * A path that is set (1, 2) or a bundle file that exists (3) is the one used: when it
 * cannot be loaded, loading fails rather than falling back to another copy. A failure
 * throws an {@link UnsatisfiedLinkError} that names the file(s) tried, the loader's
 * reason (such as a missing libc10.so) and how to fix it.
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
    private static String libraryFile;

    /** The start of every load failure's message (the plugins recognise it). */
    public static final String LOAD_FAILURE = "the lumos native library cannot be loaded";

    private Lumos() {
    }

    /**
     * The loaded library (loads it on first use, in the order the class comment gives, and
     * checks its C ABI). Throws {@link UnsatisfiedLinkError} (message starting with
     * {@link #LOAD_FAILURE}) when it cannot be loaded; a later call tries again.
     */
    public static synchronized LumosLibrary lib() {
        if (lib == null) {
            Map<String, Object> options = new HashMap<String, Object>();
            options.put(Library.OPTION_STRING_ENCODING, "UTF-8");
            String property = System.getProperty("lumos.library");
            String env = System.getenv("LUMOS_LIBRARY");
            File bundled = bundledLibrary();
            String path, from;
            if (property != null && !property.isEmpty()) {
                path = property;
                from = "the system property lumos.library";
            } else if (env != null && !env.isEmpty()) {
                path = env;
                from = "the environment variable LUMOS_LIBRARY";
            } else if (bundled != null && bundled.isFile()) {
                path = bundled.getPath();
                from = "the bundle, next to " + codeSourceName();
            } else {
                path = "lumos";
                from = "JNA by name (jna.library.path, then the system's library path"
                        + (bundled == null ? "" : "; no bundled copy at " + bundled) + ")";
            }
            LumosLibrary l;
            try {
                l = Native.load(path, LumosLibrary.class, options);
            } catch (LinkageError e) {
                throw loadFailure(path, from, reason(e), e);
            }
            String file = "lumos".equals(path) ? locate(options) : new File(path).getAbsolutePath();
            int abi;
            try {
                abi = l.lumos_abi_version();
            } catch (LinkageError e) { // a library too old to have lumos_abi_version, or not liblumos
                throw loadFailure(file, from, reason(e), e);
            }
            if (abi != LumosLibrary.ABI_VERSION) {
                throw loadFailure(file, from, "it has C ABI " + abi + " but this binding"
                        + (bindingVersion() == null ? "" : " (lumos-java " + bindingVersion() + ")")
                        + " expects ABI " + LumosLibrary.ABI_VERSION + ": the library and the plugin come from"
                        + " different lumos releases", null);
            }
            lib = l;
            libraryFile = file;
        }
        return lib;
    }

    /** The library file that was loaded (loads it first); the bare name when JNA's search cannot tell. */
    public static synchronized String libraryFile() {
        lib();
        return libraryFile;
    }

    /** The C ABI version the loaded library reports (it matches {@link LumosLibrary#ABI_VERSION}). */
    public static int abiVersion() {
        return lib().lumos_abi_version();
    }

    /** This binding's version (its jar manifest's Implementation-Version); null when run from classes. */
    public static String bindingVersion() {
        Package p = Lumos.class.getPackage();
        return p == null ? null : p.getImplementationVersion();
    }

    /**
     * Fiji's name of this platform's native library folder: linux64, macosx, win64 (or
     * linux32, win32).
     */
    public static String platform() {
        String os = System.getProperty("os.name", "").toLowerCase(java.util.Locale.ROOT);
        boolean is64 = System.getProperty("os.arch", "").contains("64");
        if (os.startsWith("mac") || os.startsWith("darwin")) {
            return "macosx";
        }
        if (os.startsWith("windows")) {
            return is64 ? "win64" : "win32";
        }
        return is64 ? "linux64" : "linux32";
    }

    /**
     * Where a bundle puts the library for this binding's jar: the jar's folder's parent +
     * {@code lib/<platform>/} + {@code System.mapLibraryName("lumos")}; null when the binding
     * does not run from a jar file (e.g. from a classes folder).
     */
    public static File bundledLibrary() {
        File jar = codeSource();
        if (jar == null || !jar.isFile() || jar.getParentFile() == null || jar.getParentFile().getParentFile() == null) {
            return null;
        }
        return new File(new File(new File(jar.getParentFile().getParentFile(), "lib"), platform()),
                System.mapLibraryName("lumos"));
    }

    private static File codeSource() {
        try {
            CodeSource cs = Lumos.class.getProtectionDomain().getCodeSource();
            return cs == null || cs.getLocation() == null ? null : new File(cs.getLocation().toURI());
        } catch (Exception e) { // a non-file URL, or a security manager
            return null;
        }
    }

    private static String codeSourceName() {
        File jar = codeSource();
        return jar == null ? "the binding's jar" : jar.getPath();
    }

    /** The loader's reason, without JNA's repetitions and its resource-path search (the class path). */
    private static String reason(Throwable e) {
        String m = e.getMessage() == null ? e.toString() : e.getMessage();
        Set<String> lines = new LinkedHashSet<String>();
        for (String line : m.split("\\r?\\n")) {
            line = line.trim();
            if (line.isEmpty() || line.startsWith("Unable to load library '") && line.endsWith(":")) {
                continue;
            }
            if (line.startsWith("Native library (") && line.contains("not found in resource path")) {
                continue;
            }
            lines.add(line);
        }
        if (lines.isEmpty()) {
            return m.trim();
        }
        StringBuilder b = new StringBuilder();
        for (String line : lines) {
            b.append(b.length() == 0 ? "" : "; ").append(line);
        }
        return b.toString();
    }

    private static UnsatisfiedLinkError loadFailure(String path, String from, String reason, Throwable cause) {
        String version = bindingVersion() == null ? "VERSION" : bindingVersion();
        String fix;
        if (from.startsWith("the system property") || from.startsWith("the environment")) {
            fix = "check that " + path + " is liblumos with libtorch beside it (or on LD_LIBRARY_PATH), or unset "
                    + (from.startsWith("the system property") ? "lumos.library" : "LUMOS_LIBRARY")
                    + " to use the bundled library";
        } else {
            fix = "unzip lumos-fiji-" + version + ".zip over the Fiji.app folder again (it puts liblumos and libtorch"
                    + " into Fiji.app/lib/" + platform() + "/), or start Fiji with"
                    + " -Dlumos.library=/path/to/" + System.mapLibraryName("lumos")
                    + " (or the environment variable LUMOS_LIBRARY)";
        }
        UnsatisfiedLinkError e = new UnsatisfiedLinkError(LOAD_FAILURE + ": tried " + path + " (from " + from + "): "
                + reason + ". To fix: " + fix + ".");
        if (cause != null) {
            e.initCause(cause);
        }
        return e;
    }

    /** The file JNA found for "lumos": its own record, else the process's memory map (Linux). */
    private static String locate(Map<String, Object> options) {
        try {
            File f = com.sun.jna.NativeLibrary.getInstance("lumos", options).getFile();
            if (f != null && f.isAbsolute()) {
                return f.getPath();
            }
        } catch (LinkageError e) {
            // fall through
        }
        String name = System.mapLibraryName("lumos");
        File maps = new File("/proc/self/maps");
        if (maps.isFile()) {
            try (BufferedReader r = new BufferedReader(new FileReader(maps))) {
                for (String line = r.readLine(); line != null; line = r.readLine()) {
                    int slash = line.indexOf('/');
                    if (slash >= 0 && line.endsWith("/" + name)) {
                        return line.substring(slash);
                    }
                }
            } catch (IOException e) {
                // fall through
            }
        }
        return name;
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
