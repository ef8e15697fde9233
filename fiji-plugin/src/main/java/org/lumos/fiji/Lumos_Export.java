package org.lumos.fiji;

import ij.IJ;
import ij.gui.GenericDialog;
import ij.plugin.PlugIn;
import org.lumos.Lumos;
import org.lumos.LumosException;

import java.io.File;
import java.util.ArrayList;
import java.util.List;

/**
 * Plugins > lumos > Export to bioimage.io: writes a lumos model as a bioimage.io model
 * package (rdf.yaml 0.5, TorchScript weights traced from the engine, test tensors), which
 * deepImageJ, bioimageio.core and the bioimage.io model zoo read. The engine checks the
 * written TorchScript against its own output before it keeps the package.
 *
 * <p>Macro: {@code run("Lumos Export to bioimage.io", "model=/path/m.lumos
 * package=/path/m.bioimageio.zip name=[My cell model] authors=[Ada Lovelace; Lab | B. Second]
 * license=CC-BY-4.0");} (name empty = from the model; package ending in .zip = a zip
 * package, otherwise a new folder).
 */
public class Lumos_Export implements PlugIn {
    /** The report (JSON) of the last export (for macros and tests); null after a failure. */
    public static volatile String lastResult;

    @Override
    public void run(String arg) {
        lastResult = null;
        String model, pkg, name, authors, license;
        String options = Plugins.options(arg);
        if (options != null) {
            model = Plugins.get(options, "model", "");
            pkg = Plugins.get(options, "package", "");
            name = Plugins.get(options, "name", "");
            authors = Plugins.get(options, "authors", "");
            license = Plugins.get(options, "license", "CC-BY-4.0");
        } else {
            GenericDialog gd = Plugins.dialog("Lumos Export to bioimage.io");
            gd.addFileField("model", "model.lumos", 40);
            gd.addFileField("package", "model.bioimageio.zip", 40);
            gd.addStringField("name", "", 40);
            gd.addStringField("authors", "", 40);
            gd.addStringField("license", "CC-BY-4.0", 20);
            gd.addMessage("name: empty = from the model. authors: \"Name; affiliation; ORCID\", separated by |.\n"
                    + "package: a .zip file, or a new folder.");
            gd.showDialog();
            if (gd.wasCanceled()) {
                return;
            }
            model = gd.getNextString();
            pkg = gd.getNextString();
            name = gd.getNextString();
            authors = gd.getNextString();
            license = gd.getNextString();
        }
        try {
            lastResult = export(model, pkg, name, authors, license);
            IJ.log("lumos: exported " + model + " -> " + pkg + " " + lastResult);
            IJ.showStatus("lumos: exported to " + pkg);
        } catch (LumosException e) {
            Plugins.fail(e);
        } catch (RuntimeException e) {
            Plugins.fail(e);
        } catch (LinkageError e) {
            Plugins.fail(e);
        }
    }

    /** Exports (blocking); returns the engine's report as JSON. */
    public static String export(String model, String pkg, String name, String authors, String license) {
        if (model == null || !new File(model).isFile()) {
            throw new IllegalArgumentException("'" + model + "' is not a file; choose a lumos model (.lumos)");
        }
        if (pkg == null || pkg.trim().isEmpty()) {
            throw new IllegalArgumentException("choose where to write the package (.zip or a new folder)");
        }
        IJ.showStatus("lumos: exporting to bioimage.io (tracing the network) ...");
        return Lumos.exportBioimageio(model, pkg, options(name, authors, license));
    }

    /** The export options as JSON. */
    static String options(String name, String authors, String license) {
        List<String> fields = new ArrayList<String>();
        if (name != null && !name.trim().isEmpty()) {
            fields.add("\"name\": " + Lumos.jsonString(name.trim()));
        }
        if (license != null && !license.trim().isEmpty()) {
            fields.add("\"license\": " + Lumos.jsonString(license.trim()));
        }
        List<String> people = new ArrayList<String>();
        if (authors != null) {
            for (String a : authors.split("\\|")) {
                String[] parts = a.split(";", -1);
                if (parts[0].trim().isEmpty()) {
                    continue;
                }
                StringBuilder p = new StringBuilder("{\"name\": " + Lumos.jsonString(parts[0].trim()));
                if (parts.length > 1 && !parts[1].trim().isEmpty()) {
                    p.append(", \"affiliation\": ").append(Lumos.jsonString(parts[1].trim()));
                }
                if (parts.length > 2 && !parts[2].trim().isEmpty()) {
                    p.append(", \"orcid\": ").append(Lumos.jsonString(parts[2].trim()));
                }
                people.add(p.append("}").toString());
            }
        }
        if (!people.isEmpty()) {
            StringBuilder list = new StringBuilder("[");
            for (int i = 0; i < people.size(); i++) {
                list.append(i == 0 ? "" : ", ").append(people.get(i));
            }
            fields.add("\"authors\": " + list.append("]"));
        }
        StringBuilder json = new StringBuilder("{");
        for (int i = 0; i < fields.size(); i++) {
            json.append(i == 0 ? "" : ", ").append(fields.get(i));
        }
        return json.append("}").toString();
    }
}
