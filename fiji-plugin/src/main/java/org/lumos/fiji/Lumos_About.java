package org.lumos.fiji;

import ij.IJ;
import ij.plugin.PlugIn;
import org.lumos.Lumos;

import java.awt.GraphicsEnvironment;
import java.io.File;
import java.security.CodeSource;
import java.util.jar.JarFile;
import java.util.jar.Manifest;

/**
 * Plugins > lumos > About lumos: the plugin's version (its jar's Implementation-Version),
 * the library's version, the library file that was loaded, its C ABI and whether CUDA is
 * available. In a macro or headless the report goes to the Log, one line starting with
 * {@code lumos: plugin }; otherwise it is shown in a dialog. A plugin whose version differs
 * from the library's is reported as a warning; a library that cannot be loaded is
 * reported (with the file tried, the reason and the fix) like any failure.
 *
 * <p>Macro: {@code run("About lumos");}
 */
public class Lumos_About implements PlugIn {
    /** The last report (for macros and tests); null after a failure. */
    public static volatile String lastResult;

    @Override
    public void run(String arg) {
        lastResult = null;
        String plugin = pluginVersion();
        String report;
        String warning = null;
        try {
            String library = Lumos.version();
            report = "plugin " + (plugin == null ? "(not from a jar)" : plugin)
                    + ", binding " + (Lumos.bindingVersion() == null ? "(not from a jar)" : Lumos.bindingVersion())
                    + ", library " + library
                    + ", C ABI " + Lumos.abiVersion()
                    + ", CUDA " + (Lumos.cudaAvailable() ? "available" : "not available")
                    + ", library file " + Lumos.libraryFile();
            if (plugin != null && !plugin.equals(library)) {
                warning = "the plugin is version " + plugin + " but the library (" + Lumos.libraryFile() + ") is "
                        + library + ": unzip lumos-fiji-" + plugin + ".zip over the Fiji.app folder again, or point"
                        + " lumos.library at the " + plugin + " library";
            }
        } catch (LinkageError e) {
            Plugins.fail(e);
            return;
        } catch (RuntimeException e) {
            Plugins.fail(e);
            return;
        }
        lastResult = report;
        if (GraphicsEnvironment.isHeadless() || IJ.isMacro()) {
            IJ.log("lumos: " + report);
            if (warning != null) {
                IJ.log("lumos: warning: " + warning);
            }
        } else {
            IJ.showMessage("About lumos", "lumos: deep-learning segmentation and decomposition\n\n"
                    + report.replace(", ", "\n") + (warning == null ? "" : "\n\nWarning: " + warning));
        }
    }

    /**
     * The Implementation-Version of the jar this plugin runs from: through its package
     * (which the class loader defines from the manifest), else read from the jar; null when
     * it runs from a classes folder.
     */
    static String pluginVersion() {
        Package p = Lumos_About.class.getPackage();
        if (p != null && p.getImplementationVersion() != null) {
            return p.getImplementationVersion();
        }
        try {
            CodeSource cs = Lumos_About.class.getProtectionDomain().getCodeSource();
            File jar = cs == null || cs.getLocation() == null ? null : new File(cs.getLocation().toURI());
            if (jar == null || !jar.isFile()) {
                return null;
            }
            try (JarFile j = new JarFile(jar)) {
                Manifest m = j.getManifest();
                return m == null ? null : m.getMainAttributes().getValue("Implementation-Version");
            }
        } catch (Exception e) {
            return null;
        }
    }
}
