package org.lumos.fiji;

import ij.IJ;
import ij.ImagePlus;
import ij.ImageStack;
import ij.measure.Calibration;
import ij.process.FloatProcessor;
import org.junit.BeforeClass;
import org.junit.Test;
import org.lumos.CancelToken;
import org.lumos.Lumos;
import org.lumos.LumosException;
import org.lumos.Model;

import java.io.File;
import java.nio.file.Files;
import java.util.Arrays;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNotNull;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

/**
 * The Java binding and the four plugins, headless, on real ImagePlus data: tiny models
 * are trained through the binding on simulated frames, then the plugins run through
 * {@code IJ.runPlugIn} exactly as a macro would call them.
 */
public class PluginsTest {
    static File dir;
    static String dmqpm;
    static String pgdiff;
    static String musplit;

    static File folder(String name, String modality, int n, int size) {
        File d = new File(dir, name);
        for (int s = 0; s < n; s++) {
            Lumos.Image[] f = Lumos.simulate(modality, "{\"size\": " + size + "}", s);
            String file = String.format("frame_%04d.tif", s);
            if (modality.equals("fluo")) {
                new File(d, "targets").mkdirs();
                Lumos.writeImageTiff(new File(d, "targets/" + file).getPath(), f[1], null);
            } else {
                new File(d, "images").mkdirs();
                new File(d, "masks").mkdirs();
                Lumos.writeImageTiff(new File(d, "images/" + file).getPath(), f[0],
                        modality.equals("ssqpm") ? new String[]{"I0", "I45", "I90", "I135", "phase"} : new String[]{"phase"});
                byte[] mask = new byte[size * size];
                for (int i = 0; i < mask.length; i++) {
                    mask[i] = (byte) f[1].data[i];
                }
                Lumos.writeMaskTiff(new File(d, "masks/" + file).getPath(), mask, size, size);
            }
        }
        return d;
    }

    static String tinyConfig(String method, String extra) {
        String cfg = Lumos_Train.config(method, "tiny", 0, "cpu", 1, false);
        cfg = Lumos_Train.setTop(cfg, "val_fraction", "0.0");
        return extra == null ? cfg : Lumos_Train.setTop(cfg, "iterations_per_epoch", extra);
    }

    @BeforeClass
    public static void trainModels() throws Exception {
        System.setProperty("java.awt.headless", "true");
        dir = Files.createTempDirectory("lumos-fiji").toFile();
        dmqpm = new File(dir, "dmqpm.lumos").getPath();
        Lumos.train(tinyConfig("dm-qpmnet", null), folder("ssqpm", "ssqpm", 3, 64).getPath(), dmqpm, null, null).close();
        pgdiff = new File(dir, "pgdiff.lumos").getPath();
        String pg = tinyConfig("pg-diffseg", "2").replace("\"inversion_steps\": 10", "\"inversion_steps\": 3")
                .replace("\"sampling_steps\": 10", "\"sampling_steps\": 3");
        Lumos.train(pg, folder("qpi", "qpi", 3, 64).getPath(), pgdiff, null, null).close();
        musplit = new File(dir, "musplit.lumos").getPath();
        Lumos.train(tinyConfig("musplit-hvae", null), folder("fluo", "fluo", 2, 64).getPath(), musplit, null, null)
                .close();
    }

    static ImagePlus ssqpmImage(int seed) {
        Lumos.Image x = Lumos.simulate("ssqpm", "{\"size\": 96}", seed)[0];
        ImageStack st = new ImageStack(96, 96);
        for (int c = 0; c < 5; c++) {
            st.addSlice(new String[]{"I0", "I45", "I90", "I135", "phase"}[c], new FloatProcessor(96, 96, x.channel(c)));
        }
        ImagePlus imp = new ImagePlus("ssqpm", st);
        imp.setDimensions(5, 1, 1);
        Calibration cal = imp.getCalibration();
        cal.pixelWidth = 0.5;
        cal.pixelHeight = 0.5;
        cal.setUnit("um");
        return imp;
    }

    @Test
    public void bindingFacts() {
        assertEquals(2, Lumos.version().split("\\.").length - 1);
        try (Model m = Model.load(dmqpm, "cpu")) {
            assertEquals("dmqpm", m.kind);
            assertArrayEquals(new String[]{"I0", "I45", "I90", "I135", "phase"}, m.channelNames);
            assertTrue(m.canSegment);
            assertFalse(m.canDecompose);
            assertTrue(m.metadataJson().contains("provenance"));
            assertFalse(m.isBfloat16());
            m.setBfloat16(true);
            assertTrue(m.isBfloat16());
            m.setBfloat16(false);
            assertFalse(m.isBfloat16());
        }
        try {
            Model.load(new File(dir, "missing.lumos").getPath(), "cpu");
            fail("loading a missing file must fail");
        } catch (LumosException e) {
            assertEquals("IO", e.statusName);
            assertTrue(e.getMessage(), e.getMessage().contains("missing.lumos"));
        }
        try {
            Lumos.simulate("sem", null, 0);
            fail();
        } catch (LumosException e) {
            assertEquals("INVALID_ARGUMENT", e.statusName);
        }
    }

    @Test
    public void segmentPluginOnAHyperstack() {
        ImagePlus imp = ssqpmImage(7);
        IJ.runPlugIn(imp, "org.lumos.fiji.Lumos_Segment", "model=[" + dmqpm + "] device=cpu");
        ImagePlus out = Lumos_Segment.lastResult;
        assertNotNull("the plugin produced no image (see the log)", out);
        assertEquals(96, out.getWidth());
        assertEquals(ImagePlus.GRAY8, out.getType());
        assertEquals(0.5, out.getCalibration().pixelWidth, 0.0);
        assertEquals(imp.getCalibration().getUnit(), out.getCalibration().getUnit());
        byte[] viaPlugin = (byte[]) out.getProcessor().getPixels();
        // the bfloat16 flag runs (labels may differ only where classes were nearly tied)
        IJ.runPlugIn(imp, "org.lumos.fiji.Lumos_Segment", "model=[" + dmqpm + "] device=cpu bfloat16");
        assertNotNull("the bfloat16 run produced no image (see the log)", Lumos_Segment.lastResult);
        assertEquals(96, Lumos_Segment.lastResult.getWidth());
        try (Model m = Model.load(dmqpm, "cpu")) {
            byte[] direct = m.segment(Plugins.frame(imp, 5, 1, 1), null, null);
            assertArrayEquals("the plugin gives what the binding gives", direct, viaPlugin);
        }
    }

    @Test
    public void segmentPluginRefusesAWrongChannelCount() {
        ImagePlus imp = new ImagePlus("one", new FloatProcessor(64, 64));
        IJ.runPlugIn(imp, "org.lumos.fiji.Lumos_Segment", "model=[" + dmqpm + "] device=cpu");
        assertNull(Lumos_Segment.lastResult);
    }

    @Test
    public void withoutAnImageThePluginsReturnInsteadOfEndingJava() {
        // IJ.getImage() would call System.exit(0) here (no image, no ImageJ window)
        new Lumos_Segment().run("model=[" + dmqpm + "] device=cpu");
        assertNull(Lumos_Segment.lastResult);
        new Lumos_Decompose().run("model=[" + musplit + "] device=cpu");
        assertNull(Lumos_Decompose.lastResult);
    }

    @Test
    public void pixelsAreReadAsTheEngineReadsTheTiff() {
        // signed 16-bit: ImageJ stores value + 32768 with a calibration that removes it
        ij.process.ShortProcessor sp = new ij.process.ShortProcessor(4, 1);
        sp.set(0, 0, 0);
        sp.set(1, 0, 32768);
        sp.set(2, 0, 40000);
        ImagePlus signed = new ImagePlus("signed", sp);
        Calibration cal = signed.getCalibration();
        cal.setSigned16BitCalibration();
        assertArrayEquals(new float[]{-32768f, 0f, 7232f, -32768f}, Plugins.pixels(signed, sp, 0), 0f);
        // RGB: three channels, red, green, blue
        ij.process.ColorProcessor cp = new ij.process.ColorProcessor(2, 1);
        cp.set(0, 0, 0x102030);
        cp.set(1, 0, 0xff0001);
        ImagePlus rgb = new ImagePlus("rgb", cp);
        Lumos.Image x = Plugins.frame(rgb, 3, 1, 1);
        assertArrayEquals(new float[]{16, 255, 32, 0, 48, 1}, x.data, 0f);
        try {
            Plugins.frame(rgb, 5, 1, 1);
            fail("an RGB image for a 5-channel model");
        } catch (IllegalArgumentException e) {
            assertTrue(e.getMessage(), e.getMessage().contains("RGB"));
        }
    }

    @Test
    public void javaArraysMustMatchTheSizesGivenToTheLibrary() {
        try (Model m = Model.load(musplit, "cpu")) {
            try {
                m.decompose(new float[10], 64, 64, null, null);
                fail("a 10-value array for a 64 x 64 image");
            } catch (IllegalArgumentException e) {
                assertTrue(e.getMessage(), e.getMessage().contains("4096"));
            }
        }
        try {
            Lumos.writeMaskTiff(new File(dir, "short.tif").getPath(), new byte[3], 2, 2);
            fail("a 3-value mask for 2 x 2");
        } catch (IllegalArgumentException e) {
            assertFalse(new File(dir, "short.tif").exists());
        }
        Model closed = Model.load(musplit, "cpu");
        closed.close();
        try {
            closed.metadataJson();
            fail("a closed model");
        } catch (IllegalStateException e) {
            assertTrue(e.getMessage().contains("closed"));
        }
    }

    @Test
    public void pgdiffSegmentationIsSeeded() {
        Lumos.Image x = Lumos.simulate("qpi", "{\"size\": 64}", 9)[0];
        ImagePlus imp = new ImagePlus("phase", new FloatProcessor(64, 64, x.channel(0)));
        String args = "model=[" + pgdiff + "] device=cpu samples=2 seed=5";
        IJ.runPlugIn(imp, "org.lumos.fiji.Lumos_Segment", args);
        byte[] a = (byte[]) Lumos_Segment.lastResult.getProcessor().getPixels();
        IJ.runPlugIn(imp, "org.lumos.fiji.Lumos_Segment", args);
        byte[] b = (byte[]) Lumos_Segment.lastResult.getProcessor().getPixels();
        assertArrayEquals(a, b);
        for (byte v : a) {
            assertTrue(v >= 0 && v <= 2);
        }
    }

    @Test
    public void decomposePluginOnAStack() {
        ImageStack st = new ImageStack(64, 64);
        for (int s = 0; s < 2; s++) {
            st.addSlice(new FloatProcessor(64, 64, Lumos.simulate("fluo", "{\"size\": 64}", 20 + s)[0].channel(0)));
        }
        ImagePlus imp = new ImagePlus("mixed", st);
        IJ.runPlugIn(imp, "org.lumos.fiji.Lumos_Decompose", "model=[" + musplit + "] device=cpu samples=2 seed=3");
        ImagePlus out = Lumos_Decompose.lastResult;
        assertNotNull(out);
        assertEquals(2, out.getNChannels());
        assertEquals(2, out.getNSlices() * out.getNFrames());
        float[] first = (float[]) out.getStack().getProcessor(1).getPixels();
        try (Model m = Model.load(musplit, "cpu")) {
            org.lumos.LumosLibrary.DecomposeOptions o = Model.defaultDecomposition();
            o.samples = 2;
            o.seed = 3;
            float[] y = m.decompose((float[]) st.getProcessor(1).convertToFloat().getPixels(), 64, 64, o, null);
            assertArrayEquals(Arrays.copyOf(y, 64 * 64), first, 0f);
        }
    }

    @Test
    public void trainPluginWritesAModelAndCancelKeepsTheCheckpoint() throws Exception {
        File data = new File(dir, "ssqpm");
        String out = new File(dir, "trained.lumos").getPath();
        IJ.runPlugIn("org.lumos.fiji.Lumos_Train",
                "method=phase-only size=tiny data=[" + data + "] epochs=1 device=cpu seed=2 model=[" + out + "]");
        assertEquals(out, Lumos_Train.lastResult);
        try (Model m = Model.load(out, "cpu")) {
            assertEquals("dmqpm", m.kind);
        }
        // cancel from another thread once the first checkpoint exists
        final String out2 = new File(dir, "stopped.lumos").getPath();
        final CancelToken token = new CancelToken();
        final boolean[] checkpointed = {false};
        try {
            Lumos.train(Lumos_Train.config("dm-qpmnet", "tiny", 500, "cpu", 0, false), data.getPath(), out2,
                    new Lumos.ProgressListener() {
                        @Override
                        public void progress(org.lumos.LumosLibrary.Progress p) {
                            if (p.stage == 3) {
                                checkpointed[0] = true;
                                token.cancel();
                            }
                        }
                    }, token);
            fail("a cancelled training must throw");
        } catch (LumosException e) {
            assertTrue(e.isCancelled());
        } finally {
            token.close();
        }
        assertTrue(checkpointed[0]);
        assertFalse(new File(out2).exists());
        assertTrue(new File(out2 + ".ckpt").isFile());
    }

    @Test
    public void exportWritesABioimageioPackage() throws Exception {
        String pkg = new File(dir, "dmqpm.bioimageio.zip").getPath();
        IJ.runPlugIn("org.lumos.fiji.Lumos_Export", "model=[" + dmqpm + "] package=[" + pkg
                + "] name=[Fiji export test] authors=[Ada Tester; Imaging Lab | Bo \"Q\" Second] license=MIT");
        String report = Lumos_Export.lastResult;
        assertNotNull("the export failed (see the log)", report);
        assertTrue(report, report.contains("\"input_shape\":[1,5,32,32]"));
        assertTrue(new File(pkg).isFile());
        java.util.zip.ZipFile z = new java.util.zip.ZipFile(pkg);
        try {
            java.util.zip.ZipEntry e = z.getEntry("rdf.yaml");
            assertNotNull(e);
            byte[] bytes = new byte[(int) e.getSize()];
            java.io.DataInputStream in = new java.io.DataInputStream(z.getInputStream(e));
            in.readFully(bytes);
            String rdf = new String(bytes, "UTF-8");
            assertTrue(rdf, rdf.contains("name: Fiji export test"));
            assertTrue(rdf, rdf.contains("affiliation: Imaging Lab"));
            assertTrue(rdf, rdf.contains("Bo \"Q\" Second"));
            assertTrue(rdf, rdf.contains("license: MIT"));
        } finally {
            z.close();
        }
        // a missing model is a clear error, not an exception out of the plugin
        try {
            Lumos_Export.export(new File(dir, "missing.lumos").getPath(), pkg, "", "", "MIT");
            fail("a missing model must be refused");
        } catch (IllegalArgumentException e) {
            assertTrue(e.getMessage().contains("not a file"));
        }
    }

    @Test
    public void recipeOverridesOnlyTouchTopLevelKeys() {
        String cfg = Lumos_Train.config("pg-diffseg", "cpu", 7, "cpu", 11, true);
        assertTrue(cfg.contains("\n  \"epochs\": 7,"));
        assertTrue(cfg.contains("\n  \"seed\": 11,"));
        assertTrue(cfg.contains("\n  \"device\": \"cpu\","));
        // the sampling seed inside pgdiff is left alone
        assertTrue(cfg.matches("(?s).*\\n {6}\"seed\": 0.*"));
    }

    @Test
    public void aboutReportsVersionsAndTheLoadedFile() {
        IJ.runPlugIn(Lumos_About.class.getName(), "");
        String report = Lumos_About.lastResult;
        assertNotNull("About lumos made no report (see the log)", report);
        // the jars' manifests carry the version; the library and ABI come from liblumos
        assertEquals(Lumos.version(), Lumos_About.pluginVersion());
        assertEquals(Lumos.version(), Lumos.bindingVersion());
        assertTrue(report, report.startsWith("plugin " + Lumos.version() + ", binding " + Lumos.version()
                + ", library " + Lumos.version() + ", C ABI 1, CUDA "));
        assertTrue(report, report.endsWith(", library file " + Lumos.libraryFile()));
        assertTrue(Lumos.libraryFile(), new File(Lumos.libraryFile()).isFile());
    }
}
