// Runs the lumos menu commands in a real ImageJ (under Xvfb), as a user's macro would,
// checks their results and saves screenshots. Writes PASS/FAIL lines to WORK/result.txt.
// Argument: ssqpm train folder, ssqpm image, fluo train folder, fluo image, WORK, screenshot
// folder, a DM-QPMNet and a muSplit model trained long enough for meaningful screenshots.
var result = "";
var failures = 0;
a = split(getArgument(), ",");
ssqpm = a[0]; image = a[1]; fluo = a[2]; fluoImage = a[3]; work = a[4]; shots = a[5]; shotModel = a[6]; shotSplit = a[7];
result = work + "/result.txt";

// (the macro language takes no boolean expression as a function argument: if/else it is)
function pass(message) {
    File.append("ok   " + message, result);
}

function fail(message) {
    File.append("FAIL " + message, result);
    failures = failures + 1;
}

// About: in a macro it logs the versions and the library file (the plugin jar finds the
// binding and JNA through its Class-Path, ../jars/)
run("About lumos");
about = getInfo("log");
if (indexOf(about, "lumos: plugin ") >= 0 && indexOf(about, ", library file ") > 0) pass("About lumos logged the versions");
else fail("About lumos logged the versions: " + about);

// Train: a tiny DM-QPMNet from the simulated folder, through the menu command
model = work + "/dmqpm.lumos";
run("Lumos Train", "method=dm-qpmnet size=tiny data=[" + ssqpm + "] epochs=2 device=cpu seed=0 model=[" + model + "]");
if (File.exists(model)) pass("Lumos Train wrote " + model); else fail("Lumos Train wrote " + model);
split_model = work + "/musplit.lumos";
run("Lumos Train", "method=musplit-hvae size=tiny data=[" + fluo + "] epochs=1 device=cpu seed=0 model=[" + split_model + "]");
if (File.exists(split_model)) pass("Lumos Train wrote " + split_model); else fail("Lumos Train wrote " + split_model);

// Export: the trained model as a bioimage.io package, through the menu command
pkg = work + "/dmqpm.bioimageio.zip";
run("Lumos Export to bioimage.io", "model=[" + model + "] package=[" + pkg + "] name=[Macro export test] authors=[Ada Tester; Imaging Lab] license=CC-BY-4.0");
if (File.exists(pkg)) pass("Lumos Export wrote " + pkg); else fail("Lumos Export wrote " + pkg);

// Segment the current image (a 5-channel hyperstack written by the engine)
open(image);
input = getTitle();
run("Properties...", "unit=um pixel_width=0.5 pixel_height=0.5 voxel_depth=1");
if (nSlices == 5) pass("the ssQPM image opened with 5 channels"); else fail("the ssQPM image opened with 5 channels");
run("Lumos Segment", "model=[" + model + "] device=cpu");
labels = getTitle();
if (endsWith(labels, "-dmqpm-labels")) pass("Lumos Segment made " + labels); else fail("Lumos Segment made " + labels);
if (bitDepth() == 8 && getWidth() == 256) pass("the labels are 8-bit, 256 px wide"); else fail("the labels are 8-bit, 256 px wide");
getPixelSize(unit, pw, ph);
selectImage(input);
getPixelSize(unit0, pw0, ph0);
if (pw == pw0 && unit == unit0) pass("the calibration was copied (" + pw + " " + unit + ")"); else fail("the calibration was copied (" + pw + " " + unit + ")");
close(labels);
// the screenshot: the same command with a model trained for a few more seconds
selectImage(input);
run("Lumos Segment", "model=[" + shotModel + "] device=cpu");
labels = getTitle();
run("Fire");
setMinAndMax(0, 1);
setLocation(560, 90);
run("In [+]");
selectImage(input);
Stack.setChannel(5);
resetMinAndMax();
setLocation(20, 90);
run("In [+]");
if (isOpen("Log")) { selectWindow("Log"); run("Close"); }
wait(800);
run("Capture Screen");
saveAs("PNG", shots + "/fiji-segment.png");
close();

// An error is reported, not thrown: a decomposition model cannot segment
selectImage(input);
run("Lumos Segment", "model=[" + split_model + "] device=cpu");
if (getTitle() == input) pass("segmenting with a muSplit model made no image"); else fail("segmenting with a muSplit model made no image");
close("*");

// Decompose a fluorescence image
open(fluoImage);
mixed = getTitle();
run("Lumos Decompose", "model=[" + split_model + "] device=cpu tile=0 keep=0 samples=2 seed=1");
parts = getTitle();
getDimensions(w, h, channels, slices, frames);
if (endsWith(parts, "-decomposed") && channels == 2) pass("Lumos Decompose made " + parts + " with 2 channels"); else fail("Lumos Decompose made " + parts + " with 2 channels");
close(parts);
// the screenshot: the same command with a model trained for a few more seconds
selectImage(mixed);
run("Lumos Decompose", "model=[" + shotSplit + "] device=cpu tile=0 keep=0 samples=1 seed=1");
parts = getTitle();
Stack.setDisplayMode("composite");
setLocation(560, 90);
run("In [+]");
selectImage(mixed);
setLocation(20, 90);
run("In [+]");
if (isOpen("Log")) { selectWindow("Log"); run("Close"); }
wait(800);
run("Capture Screen");
saveAs("PNG", shots + "/fiji-decompose.png");
close();


if (failures == 0) File.append("PASS fiji-plugin macro", result);
else File.append("FAIL fiji-plugin macro", result);
close("*");
run("Quit");
