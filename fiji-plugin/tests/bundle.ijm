// The installed-bundle test's macro (fiji-plugin/test-bundle.sh), run by ImageJ with -batch
// in a fresh Fiji.app that the bundle was unzipped into. Writes ok/FAIL lines and a final
// PASS/FAIL line to WORK/result-MODE.txt. In -batch mode the Log is ImageJ's stdout, which
// test-bundle.sh checks for About lumos's report and for failure messages.
// Argument: MODE,WORK,SSQPM_TRAIN,SSQPM_IMAGE,FLUO_TRAIN,FLUO_IMAGE,EPOCHS
//   job       the menu commands, as a user's macro calls them (ImageJ under Xvfb: ImageJ 1's
//             menus need a display): About lumos, Lumos Train (a tiny DM-QPMNet and a tiny
//             muSplit), Lumos Segment and Lumos Decompose, with checks of their outputs;
//   about     About lumos only (the bad-install case: its message is checked by the script);
//   headless  java.awt.headless=true, where run("...") of a command and open() fail (ImageJ
//             1's Menus builds AWT menus): the plugins through IJ.runPlugIn, the options as
//             its argument (About, Train, Segment of an image made in the macro).
var result = "";
var failures = 0;
a = split(getArgument(), ",");
mode = a[0]; work = a[1]; ssqpm = a[2]; image = a[3]; fluo = a[4]; fluoImage = a[5]; epochs = a[6];
result = work + "/result-" + mode + ".txt";
model = work + "/dmqpm.lumos";
splitModel = work + "/musplit.lumos";

function pass(message) {
    File.append("ok   " + message, result);
}

function fail(message) {
    File.append("FAIL " + message, result);
    failures = failures + 1;
}

// finite: neither NaN nor +-Infinity (the macro language has no isFinite)
function finite(v) {
    return !isNaN(v) && v < 1e30 && v > -1e30;
}

// the labels of the current image: 8-bit, WxH, values 0/1 (background/cell); cells: both present
function checkLabels(what, w, h, cells) {
    getRawStatistics(n, mean, min, max);
    if (bitDepth() == 8 && getWidth() == w && getHeight() == h) pass(what + ": 8-bit, " + w + "x" + h);
    else fail(what + ": 8-bit, " + w + "x" + h + " (got " + bitDepth() + "-bit " + getWidth() + "x" + getHeight() + ")");
    if (min >= 0 && max <= 1) pass(what + ": labels within 0..1 (min " + min + ", max " + max + ")");
    else fail(what + ": labels within 0..1 (min " + min + ", max " + max + ")");
    if (!cells) return;
    if (max == 1 && mean > 0.01 && mean < 0.99) pass(what + ": both labels present (cell fraction " + d2s(mean, 3) + ")");
    else fail(what + ": both labels present (cell fraction " + d2s(mean, 3) + ")");
}

t0 = getTime();
if (mode == "about") {
    run("About lumos");
    pass("About lumos returned");
} else if (mode == "job") {
    run("About lumos");
    pass("About lumos returned");

    // Train: a tiny DM-QPMNet and a tiny muSplit, through the menu command
    t = getTime();
    run("Lumos Train", "method=dm-qpmnet size=tiny data=[" + ssqpm + "] epochs=" + epochs + " device=cpu seed=1 model=[" + model + "]");
    if (File.exists(model)) pass("Lumos Train wrote " + model + " (" + d2s((getTime() - t) / 1000, 1) + " s)");
    else fail("Lumos Train wrote " + model);
    t = getTime();
    run("Lumos Train", "method=musplit-hvae size=tiny data=[" + fluo + "] epochs=1 device=cpu seed=1 model=[" + splitModel + "]");
    if (File.exists(splitModel)) pass("Lumos Train wrote " + splitModel + " (" + d2s((getTime() - t) / 1000, 1) + " s)");
    else fail("Lumos Train wrote " + splitModel);

    // Segment a simulated ssQPM image (5 channels: I0, I45, I90, I135, phase)
    open(image);
    input = getTitle();
    w = getWidth(); h = getHeight();
    if (nSlices == 5) pass("the ssQPM image opened with 5 channels"); else fail("the ssQPM image opened with 5 channels");
    t = getTime();
    run("Lumos Segment", "model=[" + model + "] device=cpu");
    labels = getTitle();
    if (labels != input && endsWith(labels, "-dmqpm-labels")) {
        pass("Lumos Segment made " + labels + " (" + d2s((getTime() - t) / 1000, 1) + " s)");
        checkLabels("the labels", w, h, true);
        close(labels);
    } else {
        fail("Lumos Segment made a label image (current image: " + labels + ")");
    }
    close(input);

    // Decompose a simulated fluorescence image (one channel, two structures)
    open(fluoImage);
    mixed = getTitle();
    w = getWidth(); h = getHeight();
    t = getTime();
    run("Lumos Decompose", "model=[" + splitModel + "] device=cpu tile=0 keep=0 samples=2 seed=1");
    parts = getTitle();
    getDimensions(pw, ph, channels, slices, frames);
    if (parts != mixed && endsWith(parts, "-decomposed") && channels == 2 && pw == w && ph == h) {
        pass("Lumos Decompose made " + parts + ": 2 channels, " + w + "x" + h + " (" + d2s((getTime() - t) / 1000, 1) + " s)");
        for (c = 1; c <= 2; c++) {
            Stack.setChannel(c);
            getRawStatistics(n, mean, min, max, std);
            if (bitDepth() == 32 && finite(min) && finite(max) && finite(mean) && std > 0)
                pass("structure " + c + ": finite 32-bit values (" + d2s(min, 3) + " .. " + d2s(max, 3) + "), not constant");
            else fail("structure " + c + ": finite 32-bit values (" + min + " .. " + max + ", std " + std + ")");
        }
        close(parts);
    } else {
        fail("Lumos Decompose made a 2-channel " + w + "x" + h + " image (current: " + parts + ", " + channels + " channels, " + pw + "x" + ph + ")");
    }
    close(mixed);

    // An error is reported (to the Log), not thrown: a muSplit model does not segment
    open(image);
    input = getTitle();
    run("Lumos Segment", "model=[" + splitModel + "] device=cpu");
    if (getTitle() == input) pass("segmenting with a muSplit model made no image"); else fail("segmenting with a muSplit model made no image");
    close(input);
} else if (mode == "headless") {
    // (open() needs the menus too: the image is made in the macro)
    call("ij.IJ.runPlugIn", "org.lumos.fiji.Lumos_About", " ");
    pass("About lumos returned (IJ.runPlugIn)");
    headlessModel = work + "/dmqpm-headless.lumos";
    t = getTime();
    call("ij.IJ.runPlugIn", "org.lumos.fiji.Lumos_Train", "method=dm-qpmnet size=tiny data=[" + ssqpm + "] epochs=1 device=cpu seed=2 model=[" + headlessModel + "]");
    if (File.exists(headlessModel)) pass("Lumos Train (IJ.runPlugIn, headless) wrote " + headlessModel + " (" + d2s((getTime() - t) / 1000, 1) + " s)");
    else fail("Lumos Train (IJ.runPlugIn, headless) wrote " + headlessModel);
    setBatchMode(true);
    newImage("noise", "32-bit noise", 96, 80, 5);
    call("ij.IJ.runPlugIn", "org.lumos.fiji.Lumos_Segment", "model=[" + model + "] device=cpu");
    labels = getTitle();
    if (labels == "noise-dmqpm-labels") {
        pass("Lumos Segment (IJ.runPlugIn, headless, batch mode) made " + labels);
        checkLabels("the headless labels", 96, 80, false);
    } else {
        fail("Lumos Segment (IJ.runPlugIn, headless, batch mode) made a label image (current image: " + labels + ")");
    }
} else {
    fail("unknown mode " + mode);
}
pass("the " + mode + " macro took " + d2s((getTime() - t0) / 1000, 1) + " s");

if (failures == 0) File.append("PASS bundle " + mode, result);
else File.append("FAIL bundle " + mode, result);
