//! TIFF reading and writing: fixtures written by tifffile (see
//! tests/fixtures/make_tiff_fixtures.py), round trips through our writer, and errors.

use std::path::{Path, PathBuf};
use std::process::Command;

use lumos::Error;
use lumos::image::Image;
use lumos::io::tiff::*;
use ndarray::{Array2, Array3, ArrayView2};

fn fx(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiff").join(name)
}

/// Same formula as `base` in make_tiff_fixtures.py; `p` is the page (plane) index.
fn base(p: usize, y: usize, x: usize) -> i64 {
    ((p * 7 + y * 3 + x) % 251) as i64
}

/// Same table as `VALUE` in make_tiff_fixtures.py, then converted to f32 as the reader does.
fn value(dtype: &str, b: i64) -> f32 {
    match dtype {
        "u8" => b as f32,
        "i8" => (b - 125) as f32,
        "u16" => (b * 250 + 3) as f32,
        "i16" => (b * 100 - 12000) as f32,
        "u32" => ((b * 1000003 + 7) as u32) as f32,
        "i32" => ((b * -100003 + 5) as i32) as f32,
        "f16" => b as f32 * 0.5,
        "f32" => (b as f64 * 0.25 - 10.5) as f32,
        "f64" => (b as f64 / 3.0) as f32,
        _ => panic!("unknown dtype {dtype}"),
    }
}

fn check_plane(name: &str, plane: ArrayView2<f32>, dtype: &str, p: usize) {
    for ((y, x), &v) in plane.indexed_iter() {
        let want = value(dtype, base(p, y, x));
        assert_eq!(v, want, "{name}: plane {p} pixel (row {y}, col {x})");
    }
}

fn tiff_msg(r: Result<impl std::fmt::Debug, Error>) -> String {
    match r {
        Err(Error::Tiff { msg, .. }) => msg,
        other => panic!("expected Error::Tiff, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Fixtures written by tifffile
// ---------------------------------------------------------------------------------------

#[test]
fn single_page_fixtures_all_types_and_compressions() {
    let cases = [
        ("u8_plain.tif", "u8"), // 3 strips, last partial
        ("i8.tif", "i8"),
        ("u16_lzw.tif", "u16"),
        ("u16_lzw_predictor.tif", "u16"),
        ("i16.tif", "i16"),
        ("u32.tif", "u32"),
        ("i32.tif", "i32"),
        ("f16.tif", "f16"),
        ("f32_deflate.tif", "f32"),
        ("f32_deflate_fppredictor.tif", "f32"),
        ("f64.tif", "f64"),
        ("u8_packbits.tif", "u8"),
        ("u16_packbits.tif", "u16"),
        ("u16_bigtiff.tif", "u16"),
        ("u16_bigendian.tif", "u16"),
        ("palette_u8.tif", "u8"),
        // WhiteIsZero keeps the stored values (as ImageJ and tifffile do)
        ("miniswhite_u8.tif", "u8"),
        ("miniswhite_i16.tif", "i16"),
    ];
    for (name, dtype) in cases {
        let img = read_image(&fx(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(img.data.dim(), (1, 12, 16), "{name}");
        assert_eq!(img.channel_names, vec!["ch0"], "{name}");
        check_plane(name, img.data.index_axis(ndarray::Axis(0), 0), dtype, 0);

        let stack = read_stack(&fx(name)).unwrap();
        assert_eq!(stack.data.dim(), (1, 1, 12, 16), "{name}");
        assert_eq!(stack.source_dtype, dtype, "{name}");
        assert_eq!(stack.channel_names, None, "{name}");
    }
}

#[test]
fn tiled_fixtures_are_read_whole() {
    for (name, h, w) in [("u16_tiled.tif", 32, 32), ("u16_tiled_partial_deflate.tif", 24, 40)] {
        let img = read_image(&fx(name)).unwrap();
        assert_eq!(img.data.dim(), (1, h, w), "{name}");
        check_plane(name, img.data.index_axis(ndarray::Axis(0), 0), "u16", 0);
    }
}

#[test]
fn plain_multipage_pages_become_channels() {
    let img = read_image(&fx("multipage_u16.tif")).unwrap();
    assert_eq!(img.data.dim(), (3, 12, 16));
    assert_eq!(img.channel_names, vec!["ch0", "ch1", "ch2"]);
    for p in 0..3 {
        check_plane("multipage", img.data.index_axis(ndarray::Axis(0), p), "u16", p);
    }
    // As a stack each page is a time point of one channel.
    let stack = read_stack(&fx("multipage_u16.tif")).unwrap();
    assert_eq!(stack.data.dim(), (3, 1, 12, 16));
    for p in 0..3 {
        let plane = stack.data.slice(ndarray::s![p, 0, .., ..]);
        check_plane("multipage stack", plane, "u16", p);
    }
}

#[test]
fn rgb_samples_become_channels() {
    for name in ["rgb_u8.tif", "rgb_planar_u8.tif"] {
        let img = read_image(&fx(name)).unwrap();
        assert_eq!(img.data.dim(), (3, 12, 16), "{name}");
        for s in 0..3 {
            check_plane(name, img.data.index_axis(ndarray::Axis(0), s), "u8", s);
        }
        let stack = read_stack(&fx(name)).unwrap();
        assert_eq!(stack.data.dim(), (1, 3, 12, 16), "{name}");
    }
}

#[test]
fn rgb_with_extra_samples_reads_the_colour_samples_in_both_layouts() {
    // the decoder gives R, G, B and not the unspecified extra samples: chunky and planar
    // files read alike (planar was refused as "decoded fewer samples than expected")
    for name in ["rgb_extra_u8.tif", "rgb_extra_planar_u8.tif"] {
        let img = read_image(&fx(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(img.data.dim(), (3, 12, 16), "{name}");
        for s in 0..3 {
            check_plane(name, img.data.index_axis(ndarray::Axis(0), s), "u8", s);
        }
    }
}

#[test]
fn bilevel_one_bit_unpacks_to_zero_and_one() {
    let stack = read_stack(&fx("bilevel_1bit.tif")).unwrap();
    assert_eq!(stack.source_dtype, "u1");
    let plane = stack.data.slice(ndarray::s![0, 0, .., ..]);
    for ((y, x), &v) in plane.indexed_iter() {
        assert_eq!(v, (base(0, y, x) % 2) as f32, "({y},{x})");
    }
}

#[test]
fn imagej_cyx_hyperstack_channels_labels_and_pixel_size() {
    let path = fx("imagej_cyx_u16.tif");
    let img = read_image(&path).unwrap();
    assert_eq!(img.data.dim(), (3, 12, 16));
    assert_eq!(img.channel_names, vec!["DAPI", "GFP", "mCherry"]);
    for c in 0..3 {
        check_plane("cyx", img.data.index_axis(ndarray::Axis(0), c), "u16", c);
    }
    let stack = read_stack(&path).unwrap();
    assert_eq!(stack.data.dim(), (1, 3, 12, 16));
    assert_eq!(stack.channel_names.as_deref(), Some(&["DAPI".to_string(), "GFP".into(), "mCherry".into()][..]));
    assert_eq!(stack.pixel_size, Some((0.5, 0.25)));
    assert_eq!(stack.unit.as_deref(), Some("um"));
}

#[test]
fn imagej_tcyx_hyperstack_frames_vs_channels() {
    let path = fx("imagej_tcyx_u16.tif");
    let stack = read_stack(&path).unwrap();
    // 2 frames x 2 channels; pages are channel-fastest so page = t * 2 + c.
    assert_eq!(stack.data.dim(), (2, 2, 12, 16));
    for t in 0..2 {
        for c in 0..2 {
            let plane = stack.data.slice(ndarray::s![t, c, .., ..]);
            check_plane("tcyx", plane, "u16", t * 2 + c);
        }
    }
    let msg = tiff_msg(read_image(&path));
    assert!(msg.contains("2 time points"), "{msg}");
    assert!(msg.contains("one image"), "{msg}");
}

#[test]
fn imagej_z_stack_is_a_stack_not_channels() {
    let path = fx("imagej_zyx_u8.tif");
    let stack = read_stack(&path).unwrap();
    assert_eq!(stack.data.dim(), (4, 1, 12, 16));
    for z in 0..4 {
        check_plane("zyx", stack.data.slice(ndarray::s![z, 0, .., ..]), "u8", z);
    }
    let msg = tiff_msg(read_image(&path));
    assert!(msg.contains("4 slices"), "{msg}");
}

/// ImageJ writes big stacks with one directory and the images back to back.
#[test]
fn imagej_single_directory_contiguous_stack() {
    let img = read_image(&fx("imagej_one_ifd_u16.tif")).unwrap();
    assert_eq!(img.data.dim(), (3, 12, 16));
    for c in 0..3 {
        check_plane("one ifd", img.data.index_axis(ndarray::Axis(0), c), "u16", c);
    }
}

#[test]
fn imagej_big_endian_float_with_utf16_labels() {
    let img = read_image(&fx("imagej_cyx_f32_bigendian.tif")).unwrap();
    assert_eq!(img.data.dim(), (2, 12, 16));
    assert_eq!(img.channel_names, vec!["nuclei", "membrane \u{b5}"]);
    for c in 0..2 {
        check_plane("be", img.data.index_axis(ndarray::Axis(0), c), "f32", c);
    }
}

// ---------------------------------------------------------------------------------------
// Masks
// ---------------------------------------------------------------------------------------

fn fixture_labels() -> Array2<u8> {
    Array2::from_shape_fn((12, 16), |(y, x)| ((y / 3 + x / 4) % 5) as u8)
}

#[test]
fn masks_from_integer_and_integral_float_files() {
    for name in ["mask_u8.tif", "mask_u16_small.tif", "mask_f32_integral.tif"] {
        let m = read_mask(&fx(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(m, fixture_labels(), "{name}");
    }
    // Palette indices are labels too (Fiji saves 8-bit masks with a colour LUT this way).
    let m = read_mask(&fx("palette_u8.tif")).unwrap();
    assert_eq!(m[[2, 3]], base(0, 2, 3) as u8);
}

#[test]
fn mask_errors_name_the_bad_value() {
    let msg = tiff_msg(read_mask(&fx("mask_u16_300.tif")));
    assert!(msg.contains("300") && msg.contains("row 2, column 3") && msg.contains("0..=255"), "{msg}");
    let msg = tiff_msg(read_mask(&fx("mask_i16_negative.tif")));
    assert!(msg.contains("-1") && msg.contains("0..=255"), "{msg}");
    let msg = tiff_msg(read_mask(&fx("mask_f32_fraction.tif")));
    assert!(msg.contains("1.5") && msg.contains("integers"), "{msg}");
    let msg = tiff_msg(read_mask(&fx("multipage_u16.tif")));
    assert!(msg.contains("3 pages") && msg.contains("single page"), "{msg}");
    let msg = tiff_msg(read_mask(&fx("rgb_u8.tif")));
    assert!(msg.contains("3 samples per pixel"), "{msg}");
}

// ---------------------------------------------------------------------------------------
// Errors on broken files
// ---------------------------------------------------------------------------------------

#[test]
fn missing_file_is_an_io_error_naming_the_path() {
    let p = fx("does_not_exist.tif");
    match read_image(&p) {
        Err(e @ Error::Io { .. }) => assert!(e.to_string().contains("does_not_exist.tif"), "{e}"),
        other => panic!("expected Error::Io, got {other:?}"),
    }
}

#[test]
fn broken_files_give_clear_tiff_errors() {
    let msg = tiff_msg(read_image(&fx("not_a_tiff.tif")));
    assert!(msg.contains("not a TIFF") && msg.contains("\"This is "), "{msg}");
    let msg = tiff_msg(read_image(&fx("empty.tif")));
    assert!(msg.contains("empty"), "{msg}");
    let msg = tiff_msg(read_image(&fx("truncated.tif")));
    assert!(msg.contains("truncated") && msg.contains("872 bytes"), "{msg}");
    let msg = tiff_msg(read_image(&fx("truncated_header.tif")));
    assert!(msg.contains("truncated"), "{msg}");
    let msg = tiff_msg(read_stack(&fx("mismatched_pages.tif")));
    assert!(msg.contains("page 2 is 8x8") && msg.contains("same size"), "{msg}");
    let msg = tiff_msg(read_stack(&fx("imagej_bad_count.tif")));
    assert!(msg.contains("3 images") && msg.contains("2 pages"), "{msg}");
    // A directory is not a TIFF either.
    let msg = tiff_msg(read_image(&fx("")));
    assert!(msg.contains("not a regular file"), "{msg}");
}

/// Corrupting or cutting valid files anywhere must give an error (or, by luck, an image),
/// never a panic or an abort.
#[test]
fn corrupted_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.tif");
    for name in
        ["u16_lzw.tif", "u16_tiled_partial_deflate.tif", "imagej_cyx_u16.tif", "palette_u8.tif", "bilevel_1bit.tif"]
    {
        let good = std::fs::read(fx(name)).unwrap();
        for i in (0..good.len()).step_by(3) {
            for v in [0x00u8, 0xff, 0x7f] {
                let mut bad = good.clone();
                bad[i] = v;
                std::fs::write(&p, &bad).unwrap();
                let _ = read_stack(&p);
                let _ = read_mask(&p);
            }
        }
        for cut in (0..good.len()).step_by(7) {
            std::fs::write(&p, &good[..cut]).unwrap();
            let r = read_stack(&p);
            // tifffile writes directories before pixel data, so losing the second half
            // always loses pixels; cuts near the end may only drop unused bytes.
            if cut < good.len() / 2 {
                assert!(r.is_err(), "{name} cut at {cut} should fail");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Writing and round trips
// ---------------------------------------------------------------------------------------

fn test_image(c: usize, h: usize, w: usize) -> Image {
    let data = Array3::from_shape_fn((c, h, w), |(c, y, x)| c as f32 * 100.0 - y as f32 * 0.5 + x as f32 * 0.125);
    let names = (0..c).map(|i| format!("stain {i} \u{b5}")).collect();
    Image::with_names(data, names).unwrap()
}

#[test]
fn write_image_f32_round_trip_multi_channel() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("img.tif");
    let mut img = test_image(3, 10, 7);
    img.data[[1, 2, 3]] = f32::NAN;
    img.data[[2, 0, 0]] = f32::INFINITY;
    write_image_f32(&p, &img).unwrap();

    let back = read_image(&p).unwrap();
    assert_eq!(back.channel_names, img.channel_names);
    assert_eq!(back.data.dim(), img.data.dim());
    for (a, b) in back.data.iter().zip(img.data.iter()) {
        assert!(a.to_bits() == b.to_bits(), "{a} vs {b}");
    }
    let stack = read_stack(&p).unwrap();
    assert_eq!(stack.data.dim(), (1, 3, 10, 7), "hyperstack: 3 channels, not 3 frames");
    assert_eq!(stack.source_dtype, "f32");
    assert_eq!(stack.channel_names.as_ref(), Some(&img.channel_names));
    // Only our temp dir's target remains: no temporary files are left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("img.tif")]);
}

#[test]
fn write_image_f32_single_channel_and_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("one.tif");
    write_image_f32(&p, &test_image(2, 4, 4)).unwrap();
    let img = Image::new(Array3::from_shape_fn((1, 5, 6), |(_, y, x)| (y * 6 + x) as f32 / 7.0));
    write_image_f32(&p, &img).unwrap();
    let back = read_image(&p).unwrap();
    assert_eq!(back, img);
}

/// ImageJ reads only the first directory of its own multi-image files and assumes the pages
/// are stored back to back, so our writer must lay them out that way.
#[test]
fn written_hyperstack_is_contiguous_with_imagej_description() {
    use tiff::decoder::Decoder;
    use tiff::tags::Tag;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ij.tif");
    write_image_f32(&p, &test_image(4, 9, 5)).unwrap();

    let mut dec = Decoder::new(std::fs::File::open(&p).unwrap()).unwrap();
    let desc = dec.get_tag_ascii_string(Tag::ImageDescription).unwrap();
    assert!(
        desc.starts_with("ImageJ=1.11a\nimages=4\nchannels=4\nslices=1\nframes=1\nhyperstack=true\nmode=grayscale\n"),
        "{desc}"
    );
    assert!(desc.contains("min=") && desc.contains("max="), "{desc}");
    let first = dec.get_tag_u64(Tag::StripOffsets).unwrap();
    for k in 1..4u64 {
        dec.next_image().unwrap();
        assert_eq!(dec.get_tag_u64(Tag::StripOffsets).unwrap(), first + k * 9 * 5 * 4);
    }
    assert!(!dec.more_images());
}

#[test]
fn mask_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let p8 = dir.path().join("m8.tif");
    let m = Array2::from_shape_fn((7, 9), |(y, x)| ((y * 9 + x) % 256) as u8);
    write_mask_u8(&p8, &m).unwrap();
    assert_eq!(read_mask(&p8).unwrap(), m);
    assert_eq!(read_stack(&p8).unwrap().source_dtype, "u8");

    let p16 = dir.path().join("m16.tif");
    let m16 = Array2::from_shape_fn((6, 5), |(y, x)| (y * 1000 + x) as u16);
    write_mask_u16(&p16, &m16).unwrap();
    let s = read_stack(&p16).unwrap();
    assert_eq!(s.source_dtype, "u16");
    assert_eq!(s.data.slice(ndarray::s![0, 0, .., ..]), m16.mapv(|v| v as f32));
    let msg = tiff_msg(read_mask(&p16));
    assert!(msg.contains("1000"), "{msg}");

    let small = Array2::from_shape_fn((6, 5), |(y, x)| (y + x) as u16);
    write_mask_u16(&p16, &small).unwrap();
    assert_eq!(read_mask(&p16).unwrap(), small.mapv(|v| v as u8));
}

#[test]
fn write_errors_leave_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("no_such_dir").join("x.tif");
    match write_mask_u8(&p, &Array2::zeros((2, 2))) {
        Err(e @ Error::Io { .. }) => {
            let s = e.to_string();
            assert!(s.contains("x.tif") && s.contains("does not exist"), "{s}");
        }
        other => panic!("expected Error::Io, got {other:?}"),
    }
    let q = dir.path().join("empty.tif");
    assert!(write_image_f32(&q, &Image::new(Array3::zeros((1, 0, 4)))).is_err());
    assert!(!q.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

// ---------------------------------------------------------------------------------------
// Cross-checks with tifffile and ImageJ. Skipped when they are missing, unless
// LUMOS_REQUIRE_TEST_TOOLS=1 (scripts/test.sh sets it: bootstrap installs both), which
// makes their absence a failure.
// ---------------------------------------------------------------------------------------

/// The interpreter with tifffile: LUMOS_TEST_PYTHON (scripts/test.sh: the locked .venv),
/// else python3 from PATH.
fn test_python() -> String {
    std::env::var("LUMOS_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn tool_missing(what: &str) {
    if std::env::var("LUMOS_REQUIRE_TEST_TOOLS").as_deref() == Ok("1") {
        panic!("{what} (LUMOS_REQUIRE_TEST_TOOLS=1: scripts/bootstrap.sh installs it)");
    }
    eprintln!("{what}; skipping the cross-check");
}

#[test]
fn tifffile_reads_our_files_when_available() {
    let python = test_python();
    match Command::new(&python).args(["-c", "import tifffile"]).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let last = err.lines().last().unwrap_or("").to_string();
            return tool_missing(&format!("tifffile does not import in {python}: {last}"));
        }
        Err(e) => return tool_missing(&format!("cannot run {python}: {e}")),
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.tif");
    let img = test_image(3, 4, 5);
    write_image_f32(&p, &img).unwrap();
    let script = r#"
import sys, json, tifffile
with tifffile.TiffFile(sys.argv[1]) as t:
    a = t.asarray()
    md = t.imagej_metadata or {}
    print(json.dumps({"shape": list(a.shape), "dtype": str(a.dtype), "axes": t.series[0].axes,
        "labels": md.get("Labels"), "channels": md.get("channels"), "ranges": list(md.get("Ranges", [])),
        "data": [float(v) for v in a.ravel()]}))
"#;
    let out = Command::new(&python).arg("-c").arg(script).arg(&p).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["shape"], serde_json::json!([3, 4, 5]));
    assert_eq!(v["dtype"], "float32");
    assert_eq!(v["axes"], "CYX");
    assert_eq!(v["channels"], 3);
    assert_eq!(v["labels"], serde_json::json!(img.channel_names));
    let data: Vec<f32> = v["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    assert_eq!(data, img.data.iter().copied().collect::<Vec<_>>());
    let ranges: Vec<f64> = v["ranges"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(ranges.len(), 6);
    assert_eq!(ranges[0], 0.0 - 3.0 * 0.5);
}

// ---------------------------------------------------------------------------------------
// Optional: ImageJ itself opens what we write (skipped unless java and ij.jar are present,
// e.g. Debian's `imagej` package; set LUMOS_IJ_JAR to point at another ij.jar)
// ---------------------------------------------------------------------------------------

const IJ_CHECK: &str = r#"
import ij.*;
public class IjCheck {
  static String esc(String s) {
    if (s == null) return "null";
    StringBuilder b = new StringBuilder();
    for (char ch : s.toCharArray()) b.append(ch < 128 ? String.valueOf(ch) : String.format("\\u%04x", (int) ch));
    return b.toString();
  }
  public static void main(String[] a) {
    ImagePlus imp = IJ.openImage(a[0]);
    int[] d = imp.getDimensions();
    System.out.println("dims " + d[2] + " " + d[3] + " " + d[4] + " " + imp.getBitDepth());
    for (int c = 1; c <= d[2]; c++) {
      imp.setPosition(c, 1, 1);
      double lo = imp.getDisplayRangeMin(), hi = imp.getDisplayRangeMax();
      if (imp.isComposite()) { ij.process.LUT l = ((CompositeImage) imp).getChannelLut(c); lo = l.min; hi = l.max; }
      String label = imp.getStack().getSliceLabel(imp.getStackIndex(c, 1, 1));
      System.out.println("ch|" + esc(label) + "|" + lo + "|" + hi + "|" + imp.getProcessor().getPixelValue(3, 2));
    }
  }
}
"#;

fn imagej_jar() -> Option<PathBuf> {
    let jar = std::env::var_os("LUMOS_IJ_JAR").map(PathBuf::from).unwrap_or_else(|| "/usr/share/java/ij.jar".into());
    let java = Command::new("java").arg("-version").output().map(|o| o.status.success()).unwrap_or(false);
    (java && jar.is_file()).then_some(jar)
}

fn imagej_open(jar: &Path, dir: &Path, file: &Path) -> Vec<String> {
    let src = dir.join("IjCheck.java");
    std::fs::write(&src, IJ_CHECK).unwrap();
    let out =
        Command::new("java").arg("-Djava.awt.headless=true").arg("-cp").arg(jar).arg(&src).arg(file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

#[test]
fn imagej_opens_our_files_when_available() {
    let Some(jar) = imagej_jar() else {
        return tool_missing("java or ij.jar (LUMOS_IJ_JAR, default /usr/share/java/ij.jar) not found");
    };
    let dir = tempfile::tempdir().unwrap();

    // Multi-channel float image: a 3-channel composite, with labels and per-channel ranges.
    let p = dir.path().join("img.tif");
    let img = test_image(3, 4, 5);
    write_image_f32(&p, &img).unwrap();
    let lines = imagej_open(&jar, dir.path(), &p);
    assert_eq!(lines[0], "dims 3 1 1 32", "{lines:?}");
    for c in 0..3 {
        let f: Vec<&str> = lines[1 + c].split('|').collect();
        assert_eq!(f[1], format!("stain {c} \\u00b5"), "{lines:?}");
        let plane = img.data.index_axis(ndarray::Axis(0), c);
        let (lo, hi) = plane.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        assert_eq!(f[2].parse::<f32>().unwrap(), lo, "{lines:?}");
        assert_eq!(f[3].parse::<f32>().unwrap(), hi, "{lines:?}");
        assert_eq!(f[4].parse::<f32>().unwrap(), img.data[[c, 2, 3]], "{lines:?}");
    }

    // Single channel and a u16 label image.
    let img1 = Image::new(Array3::from_shape_fn((1, 4, 5), |(_, y, x)| (y * 5 + x) as f32));
    write_image_f32(&p, &img1).unwrap();
    let lines = imagej_open(&jar, dir.path(), &p);
    assert_eq!(lines[0], "dims 1 1 1 32", "{lines:?}");
    assert!(lines[1].ends_with("|0.0|19.0|13.0"), "{lines:?}");

    let m = Array2::from_shape_fn((4, 5), |(y, x)| (y * 100 + x) as u16);
    write_mask_u16(&p, &m).unwrap();
    let lines = imagej_open(&jar, dir.path(), &p);
    assert_eq!(lines[0], "dims 1 1 1 16", "{lines:?}");
    assert!(lines[1].ends_with("|0.0|304.0|203.0"), "{lines:?}");
}

/// Found by fuzzing (fuzz/fuzz_targets/tiff_reader.rs): a 372-byte file whose header
/// claims gigabytes of pixels made the reader allocate 8 GB. It is refused up front now.
#[test]
fn a_header_claiming_more_pixels_than_the_file_holds_is_refused_before_allocating() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiff/fuzz_huge_header.tif");
    for e in [
        lumos::io::tiff::read_stack(&p).map(|_| ()).unwrap_err(),
        lumos::io::tiff::read_image(&p).map(|_| ()).unwrap_err(),
        lumos::io::tiff::read_mask(&p).map(|_| ()).unwrap_err(),
    ] {
        let m = e.to_string();
        assert!(matches!(e, lumos::Error::Tiff { .. }), "{e:?}");
        assert!(m.contains("more than a 372-byte file can hold"), "{m}");
    }
}

/// ImageJ stores a signed 16-bit image as unsigned + 32768 with the calibration
/// `cf=0 c0=-32768 c1=1`; the reader gives the signed values ImageJ shows (and hands the
/// Fiji plugin), and names the type i16.
#[test]
fn imagej_signed_16_bit_reads_signed_values() {
    let img = read_image(&fx("imagej_signed16.tif")).unwrap();
    for ((_, y, x), &v) in img.data.indexed_iter() {
        assert_eq!(v, (base(0, y, x) - 125) as f32, "pixel (row {y}, col {x})");
    }
    assert_eq!(read_stack(&fx("imagej_signed16.tif")).unwrap().source_dtype, "i16");
    // a plain unsigned 16-bit file is untouched
    let u = read_stack(&fx("u16_lzw.tif")).unwrap();
    assert_eq!(u.source_dtype, "u16");
}

/// A blank bilevel mask in CCITT Group 4 codes each row in one bit: 637 bytes hold
/// 4096 x 8192 pixels (4 MB of 1-bit data, 6500x), more than the expansion guard's
/// general bound (4096x). Fax codes get a bound of their row width, so the file reads.
#[test]
fn a_blank_fax_g4_mask_is_not_mistaken_for_a_corrupt_header() {
    let p = fx("blank_g4_mask.tif");
    assert!(std::fs::metadata(&p).unwrap().len() < 1024);
    let stack = read_stack(&p).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stack.data.dim(), (1, 1, 4096, 8192));
    assert_eq!(stack.source_dtype, "u1");
    // WhiteIsZero: the stored values are kept (white = 0), as ImageJ shows them
    assert!(stack.data.iter().all(|&v| v == 0.0));
}
