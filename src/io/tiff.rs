//! TIFF input and output: images, label masks and ImageJ hyperstacks.
//!
//! Reading goes through the `tiff` crate, so every compression it decodes (none, LZW,
//! Deflate, PackBits, JPEG, fax) and both strip and tile layouts work. Pixels are grayscale
//! 1/2/4/8/16/32/64-bit unsigned, 8/16/32/64-bit signed, or 16/32/64-bit float. Pixels with
//! several samples (RGB, RGBA, multi-band), chunky or planar, are split into one channel
//! per sample, because a microscopy "RGB" file is usually three stains (RGB with further,
//! unspecified ExtraSamples: the three colour samples; the extras are not decoded, and a
//! warning says so). Palette (indexed)
//! images yield their index values, as ImageJ does, so label masks that Fiji saved with a
//! colour LUT load as labels. Reduced-resolution pages (thumbnails, NewSubfileType bit 0)
//! are skipped.
//!
//! ImageJ hyperstacks are recognised by their `ImageDescription`
//! (`ImageJ=...\nimages=..\nchannels=..\nslices=..\nframes=..`); their pages are stored
//! channel fastest, then slice, then frame. Channel labels come from the `IJMetadata` tag.
//!
//! Writing produces uncompressed single-strip pages whose pixel data lie back to back after
//! the header, because ImageJ reads multi-image files it recognises as its own by reading
//! the first directory only and assuming exactly that layout. Writes are atomic: a
//! temporary file in the target directory is renamed over the target once complete.
//!
//! Every failure on a broken, truncated or unsupported file is an [`Error::Tiff`] saying
//! what was found and what was expected; a panic inside the decoder is caught and turned
//! into such an error too.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use ndarray::{Array2, Array3, Array4};
use tiff::decoder::{ChunkType, Decoder, DecodingResult, Limits, ifd::Value};
use tiff::encoder::{DirectoryEncoder, TiffEncoder, TiffKind, TiffKindBig, TiffKindStandard};
use tiff::tags::{Tag, Type};
use tiff::{ColorType, TiffError};

use crate::error::{Error, Result};
use crate::image::{Image, Labels, Mask};

/// A stack of images read from one TIFF file, `(T, C, H, W)`.
#[derive(Debug, Clone, PartialEq)]
pub struct TiffStack {
    /// Pixel values as `(T, C, H, W)`: `T` = frames × slices (slice index fastest),
    /// `C` = channels. A plain multi-page file has one entry of `T` per page.
    pub data: Array4<f32>,
    /// Channel names from ImageJ slice labels, when the file has them.
    pub channel_names: Option<Vec<String>>,
    /// `(x, y)` pixel size in `unit` per pixel, from XResolution/YResolution.
    pub pixel_size: Option<(f64, f64)>,
    /// Length unit of `pixel_size`: ImageJ's `unit=` entry, else the TIFF ResolutionUnit
    /// ("inch" or "cm"); `None` when the file names no unit.
    pub unit: Option<String>,
    /// Sample type on disk: "u8", "u16", "u32", "u64", "i8", "i16", "i32", "i64", "f16",
    /// "f32", "f64", or "u1"/"u2"/"u4" for bit-packed data. 32/64-bit integers above 2^24
    /// lose precision in the f32 `data`.
    pub source_dtype: String,
}

/// Reads every page of a TIFF file as a `(T, C, H, W)` stack.
///
/// ImageJ hyperstacks are laid out by their description (C channels, T = frames × slices);
/// other files give one `T` entry per page, with `C` = samples per pixel (1, or 3 for RGB).
pub fn read_stack(path: &Path) -> Result<TiffStack> {
    guarded(path, READING, || {
        let (mut dec, plan) = open_and_plan(path)?;
        let data = decode_all(path, &mut dec, &plan)?;
        let shape = (plan.t, plan.c, plan.height, plan.width);
        let data =
            Array4::from_shape_vec(shape, data).map_err(|e| Error::tiff(path, format!("internal shape error: {e}")))?;
        Ok(TiffStack {
            data,
            channel_names: plan.labels,
            pixel_size: plan.pixel_size,
            unit: plan.unit,
            source_dtype: if plan.signed16 { "i16".to_string() } else { plan.dtype.name().to_string() },
        })
    })
}

/// Reads one `(C, H, W)` image.
///
/// Channels are: the channels of an ImageJ hyperstack with a single time point and slice;
/// the pages of a plain (non-ImageJ) multi-page file; or the samples of a single-page RGB
/// or multi-sample file. A hyperstack with several time points or slices is an error, as is
/// a multi-page file whose pages have several samples each (use [`read_stack`] for those).
/// Channel names are the ImageJ labels when present, else `ch0..chN`.
pub fn read_image(path: &Path) -> Result<Image> {
    guarded(path, READING, || {
        let (mut dec, plan) = open_and_plan(path)?;
        if let Some(ij) = &plan.imagej {
            if plan.t > 1 {
                return Err(Error::tiff(
                    path,
                    format!(
                        "ImageJ hyperstack holds {} time points x {} slices of {} channel(s) \
                         ({} images); one image (a single time point and slice) was expected. \
                         Read it with read_stack, or save one time point/slice from Fiji",
                        ij.frames, ij.slices, ij.channels, ij.images
                    ),
                ));
            }
        } else if plan.t > 1 && plan.c > 1 {
            return Err(Error::tiff(
                path,
                format!(
                    "file holds {} pages of {} samples per pixel each; one image was expected \
                     (a single multi-sample page, or grayscale pages used as channels). \
                     Read it with read_stack",
                    plan.t, plan.c
                ),
            ));
        }
        let data = decode_all(path, &mut dec, &plan)?;
        // At most one of T and C exceeds 1 here, so the flat page order is channel order.
        let channels = plan.t * plan.c;
        let data = Array3::from_shape_vec((channels, plan.height, plan.width), data)
            .map_err(|e| Error::tiff(path, format!("internal shape error: {e}")))?;
        let names = match plan.labels {
            Some(l) if l.len() == channels => l,
            _ => (0..channels).map(|i| format!("ch{i}")).collect(),
        };
        Image::with_names(data, names)
    })
}

/// The pixel size of a TIFF file in µm, when its metadata states one in a length unit
/// (ImageJ's `unit=`, or the TIFF resolution unit inch or cm). Non-square pixels give the
/// x size with a warning; a file without a pixel size or unit gives `None`.
pub fn pixel_size_um(path: &Path) -> Result<Option<f64>> {
    guarded(path, READING, || {
        let (_, plan) = open_and_plan(path)?;
        let (Some((x, y)), Some(unit)) = (plan.pixel_size, plan.unit.as_deref()) else {
            return Ok(None);
        };
        let Some(scale) = unit_in_um(unit) else {
            log::warn!("'{}': unknown length unit '{unit}'; its pixel size is not used", path.display());
            return Ok(None);
        };
        if !(x.is_finite() && x > 0.0) {
            return Ok(None);
        }
        if (x - y).abs() > 1e-6 * x.abs() {
            log::warn!("'{}': pixels are {x} x {y} {unit}; using the x size", path.display());
        }
        Ok(Some(x * scale))
    })
}

/// µm per `unit`, for the length units TIFF and ImageJ files name.
fn unit_in_um(unit: &str) -> Option<f64> {
    Some(match unit.trim() {
        "micron" | "microns" | "um" | "µm" | "\u{3bc}m" | "\\u00B5m" | "micrometer" | "micrometre" => 1.0,
        "nm" | "nanometer" | "nanometre" => 1e-3,
        "mm" | "millimeter" | "millimetre" => 1e3,
        "cm" | "centimeter" | "centimetre" => 1e4,
        "m" | "meter" | "metre" => 1e6,
        "inch" | "in" => 25_400.0,
        _ => return None,
    })
}

/// Reads a single-page integer label image as a mask.
///
/// Accepts 1–32-bit unsigned or signed integers, palette indices, and floats whose values
/// are all integral. Every value must be in 0..=255; anything else (negative, > 255,
/// fractional, NaN) is an error naming the first offending pixel.
pub fn read_mask(path: &Path) -> Result<Mask> {
    guarded(path, READING, || {
        let (plan, samples) = read_label_page(path)?;
        let labels = samples.to_labels().map_err(|(i, v)| {
            Error::tiff(
                path,
                format!(
                    "mask pixel (row {}, column {}) is {v}; mask labels must be integers \
                     in 0..=255 ({} data)",
                    i / plan.width,
                    i % plan.width,
                    plan.dtype.name()
                ),
            )
        })?;
        Array2::from_shape_vec((plan.height, plan.width), labels)
            .map_err(|e| Error::tiff(path, format!("internal shape error: {e}")))
    })
}

/// A label image as read from disk.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelImage {
    /// `(H, W)` labels, 0 = background.
    pub labels: Labels,
    /// Whether the file stores more than 8 bits per pixel (16- or 32-bit integers, or
    /// floats): instance label images (Cellpose, StarDist, lumos) are stored that way.
    pub wide: bool,
}

/// Reads a single-page label image of any integer width, for instance labels (one id
/// per object, any number of objects).
///
/// Accepts 1–64-bit unsigned or signed integers and floats whose values are all integral.
/// Every value must be in 0..=4294967295 (and at most 2^24 for 32-bit floats, the largest
/// range a float32 stores exactly); negative, fractional or non-finite values are an error
/// naming the first offending pixel.
pub fn read_labels(path: &Path) -> Result<LabelImage> {
    guarded(path, READING, || {
        let (plan, samples) = read_label_page(path)?;
        let wide = !matches!(samples, Samples::U8(_) | Samples::I8(_));
        let labels = samples.to_labels_u32().map_err(|(i, v, want)| {
            Error::tiff(
                path,
                format!(
                    "label pixel (row {}, column {}) is {v}; labels must be integers in {want} ({} data)",
                    i / plan.width,
                    i % plan.width,
                    plan.dtype.name()
                ),
            )
        })?;
        let labels = Array2::from_shape_vec((plan.height, plan.width), labels)
            .map_err(|e| Error::tiff(path, format!("internal shape error: {e}")))?;
        Ok(LabelImage { labels, wide })
    })
}

/// The single page of a label image, decoded; refuses several pages or samples.
fn read_label_page(path: &Path) -> Result<(Plan, Samples)> {
    let (mut dec, plan) = open_and_plan(path)?;
    if plan.pages.len() != 1 {
        return Err(Error::tiff(
            path,
            format!("file holds {} pages; a mask or label image must be a single page", plan.pages.len()),
        ));
    }
    if plan.samples != 1 {
        return Err(Error::tiff(
            path,
            format!(
                "mask has {} samples per pixel (e.g. RGB); a mask or label image must be a single-sample \
                 integer image",
                plan.samples
            ),
        ));
    }
    let samples = decode_page(path, &mut dec, &plan, 0)?;
    Ok((plan, samples))
}

/// Writes a `(C, H, W)` image as float32, one page per channel.
///
/// The ImageJ description makes Fiji open `C > 1` as a grayscale-mode hyperstack of `C`
/// channels; `min`/`max` (and per-channel display ranges) are set from the finite data so
/// the image is visible on opening. Channel names are stored as ImageJ slice labels.
pub fn write_image_f32(path: &Path, img: &Image) -> Result<()> {
    let (c, h, w) = img.data.dim();
    check_write_dims(c, h, w)?;
    let data = img.data.as_standard_layout();
    let flat = data.as_slice().ok_or_else(|| Error::InvalidInput("image data is not contiguous".into()))?;
    let planes: Vec<&[f32]> = flat.chunks_exact(h * w).collect();

    // Display ranges ignore NaN/Inf so one bad pixel does not blank the display.
    let ranges: Vec<(f64, f64)> = planes.iter().map(|p| finite_range(p)).collect();
    let lo = ranges.iter().map(|r| r.0).fold(f64::INFINITY, f64::min);
    let hi = ranges.iter().map(|r| r.1).fold(f64::NEG_INFINITY, f64::max);
    let mut desc = String::from("ImageJ=1.11a\n");
    if c > 1 {
        desc += &format!("images={c}\nchannels={c}\nslices=1\nframes=1\nhyperstack=true\nmode=grayscale\n");
    }
    desc += &format!("min={lo}\nmax={hi}\n");

    let labels = if img.channel_names.len() == c {
        Some(img.channel_names.as_slice())
    } else {
        log::warn!(
            "writing '{}': {} channel names for {c} channels; names not stored",
            path.display(),
            img.channel_names.len()
        );
        None
    };
    let ij_meta = ij_metadata(labels, if c > 1 { Some(&ranges) } else { None });
    let pages: Vec<Pixels> = planes.into_iter().map(Pixels::F32).collect();
    write_pages(path, w as u32, h as u32, &pages, &desc, ij_meta.as_ref())
}

/// Writes an `(H, W)` u8 mask as a single uncompressed page.
///
/// ImageJ `min`/`max` are set to 0..max label so labels are visible when opened in Fiji.
pub fn write_mask_u8(path: &Path, mask: &Mask) -> Result<()> {
    let (h, w) = mask.dim();
    check_write_dims(1, h, w)?;
    let data = mask.as_standard_layout();
    let flat = data.as_slice().ok_or_else(|| Error::InvalidInput("mask is not contiguous".into()))?;
    let max = flat.iter().copied().max().unwrap_or(0).max(1);
    let desc = format!("ImageJ=1.11a\nmin=0\nmax={max}\n");
    write_pages(path, w as u32, h as u32, &[Pixels::U8(flat)], &desc, None)
}

/// Writes an `(H, W)` u16 label image (for example instance labels) as a single page.
///
/// ImageJ `min`/`max` are set to 0..max label so labels are visible when opened in Fiji.
pub fn write_mask_u16(path: &Path, mask: &Array2<u16>) -> Result<()> {
    let (h, w) = mask.dim();
    check_write_dims(1, h, w)?;
    let data = mask.as_standard_layout();
    let flat = data.as_slice().ok_or_else(|| Error::InvalidInput("mask is not contiguous".into()))?;
    let max = flat.iter().copied().max().unwrap_or(0).max(1);
    let desc = format!("ImageJ=1.11a\nmin=0\nmax={max}\n");
    write_pages(path, w as u32, h as u32, &[Pixels::U16(flat)], &desc, None)
}

/// Writes an `(H, W)` label image as a single page: uint16 when every label fits
/// (at most 65,535), else uint32, so that no label is ever truncated.
///
/// ImageJ `min`/`max` are set to 0..max label so labels are visible when opened in Fiji.
/// Returns the bits per sample written (16 or 32).
pub fn write_labels(path: &Path, labels: &Labels) -> Result<u16> {
    let (h, w) = labels.dim();
    check_write_dims(1, h, w)?;
    let data = labels.as_standard_layout();
    let flat = data.as_slice().ok_or_else(|| Error::InvalidInput("label image is not contiguous".into()))?;
    let max = flat.iter().copied().max().unwrap_or(0);
    let desc = format!("ImageJ=1.11a\nmin=0\nmax={}\n", max.max(1));
    if max <= u32::from(u16::MAX) {
        let narrow: Vec<u16> = flat.iter().map(|&v| v as u16).collect();
        write_pages(path, w as u32, h as u32, &[Pixels::U16(&narrow)], &desc, None)?;
        Ok(16)
    } else {
        write_pages(path, w as u32, h as u32, &[Pixels::U32(flat)], &desc, None)?;
        Ok(32)
    }
}

// ---------------------------------------------------------------------------------------
// Reading: limits and error mapping
// ---------------------------------------------------------------------------------------

/// Upper bound on samples in one read (8 GiB of f32): a corrupt header must not make us
/// allocate absurd buffers, and nothing this engine processes is larger.
const MAX_TOTAL_SAMPLES: u64 = 1 << 31;
/// Largest ratio of decoded to stored pixel bytes a real file can have (see open_and_plan).
const MAX_EXPANSION: u64 = 4096;
/// Widest row whose full expansion the guard allows for fax-compressed (bilevel) pages:
/// then a 4 kB file can still ask for at most 1 GB of f32 samples (the fuzzer's inputs).
const MAX_FAX_ROW: u64 = 8192;
/// Upper bound on pages, so a hostile directory chain cannot exhaust memory.
const MAX_PAGES: usize = 1 << 20;
/// ImageJ's private tags: byte counts of the entries in, and the blob of, IJMetadata.
const TAG_IJ_BYTE_COUNTS: u16 = 50838;
const TAG_IJ_METADATA: u16 = 50839;
/// Largest tag value we read (IJMetadata with LUTs/ROIs, big strip tables).
const MAX_TAG_BYTES: usize = 64 << 20;

const READING: &str = "reading this file; the file is corrupt or uses a layout this reader does not support";
const WRITING: &str = "writing this file";

/// Runs a reader or writer, turning a panic inside the `tiff` crate into `Error::Tiff`,
/// since hostile input may hit an `assert!` or an out-of-bounds index there.
fn guarded<T>(path: &Path, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::tiff(path, format!("the TIFF library panicked while {what} ({msg})")))
        }
    }
}

/// Says in words what a `tiff` crate error means for the user.
fn describe(e: &TiffError) -> String {
    match e {
        TiffError::IoError(io) if io.kind() == io::ErrorKind::UnexpectedEof => {
            "unexpected end of file: the file is truncated (expected more data)".into()
        }
        TiffError::IoError(io) => format!("read error: {io}"),
        TiffError::FormatError(f) => format!("malformed TIFF: {f}"),
        TiffError::UnsupportedError(u) => format!("unsupported TIFF feature: {u}"),
        TiffError::LimitsExceeded => {
            "a size in the file exceeds the decoder's limits (corrupt file, or an image or tag \
             too large to read)"
                .into()
        }
        other => format!("TIFF decoding error: {other}"),
    }
}

fn tiff_err(path: &Path, context: &str, e: TiffError) -> Error {
    Error::tiff(path, format!("{context}: {}", describe(&e)))
}

// ---------------------------------------------------------------------------------------
// Reading: sample types and decoded data
// ---------------------------------------------------------------------------------------

/// Sample type of the pixels on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dtype {
    U1,
    U2,
    U4,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    F32,
    F64,
}

impl Dtype {
    /// From the SampleFormat (1 uint, 2 int, 3 float) and BitsPerSample tags.
    fn from_tags(format: u16, bits: u16) -> Option<Dtype> {
        use Dtype::*;
        Some(match (format, bits) {
            (1, 1) => U1,
            (1, 2) => U2,
            (1, 4) => U4,
            (1, 8) => U8,
            (1, 16) => U16,
            (1, 32) => U32,
            (1, 64) => U64,
            (2, 8) => I8,
            (2, 16) => I16,
            (2, 32) => I32,
            (2, 64) => I64,
            (3, 16) => F16,
            (3, 32) => F32,
            (3, 64) => F64,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        use Dtype::*;
        match self {
            U1 => "u1",
            U2 => "u2",
            U4 => "u4",
            U8 => "u8",
            U16 => "u16",
            U32 => "u32",
            U64 => "u64",
            I8 => "i8",
            I16 => "i16",
            I32 => "i32",
            I64 => "i64",
            F16 => "f16",
            F32 => "f32",
            F64 => "f64",
        }
    }

    fn bits(self) -> usize {
        use Dtype::*;
        match self {
            U1 => 1,
            U2 => 2,
            U4 => 4,
            U8 | I8 => 8,
            U16 | I16 | F16 => 16,
            U32 | I32 | F32 => 32,
            U64 | I64 | F64 => 64,
        }
    }
}

/// Decoded samples of one page, in the on-disk type (f16 widened to f32).
enum Samples {
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// Copies `src` into `out` as f32; interleaved multi-sample pixels go to `(S, H, W)` planes.
fn scatter<T: Copy>(src: &[T], out: &mut [f32], s: usize, interleaved: bool, f: impl Fn(T) -> f32) {
    if s == 1 || !interleaved {
        for (o, &v) in out.iter_mut().zip(src) {
            *o = f(v);
        }
    } else {
        let plane = out.len() / s;
        for (i, px) in src.chunks_exact(s).enumerate() {
            for (k, &v) in px.iter().enumerate() {
                out[k * plane + i] = f(v);
            }
        }
    }
}

/// Checks integer labels against 0..=255; returns the index and value of the first bad one.
fn int_labels<T: Copy + Into<i128> + std::fmt::Display>(v: &[T]) -> std::result::Result<Vec<u8>, (usize, String)> {
    v.iter().enumerate().map(|(i, &x)| u8::try_from(x.into()).map_err(|_| (i, x.to_string()))).collect()
}

/// Checks integer labels against 0..=u32::MAX; returns the index, value and wanted range
/// of the first bad one.
fn int_labels_u32<T: Copy + Into<i128> + std::fmt::Display>(
    v: &[T],
) -> std::result::Result<Vec<u32>, (usize, String, &'static str)> {
    v.iter()
        .enumerate()
        .map(|(i, &x)| u32::try_from(x.into()).map_err(|_| (i, x.to_string(), "0..=4294967295")))
        .collect()
}

/// Float labels must be integral, non-negative and at most `max` (exactly representable).
fn float_labels_u32(
    v: impl Iterator<Item = f64>,
    max: f64,
    want: &'static str,
) -> std::result::Result<Vec<u32>, (usize, String, &'static str)> {
    v.enumerate()
        .map(
            |(i, x)| {
                if x.fract() == 0.0 && (0.0..=max).contains(&x) { Ok(x as u32) } else { Err((i, x.to_string(), want)) }
            },
        )
        .collect()
}

fn float_labels(v: impl Iterator<Item = f64>) -> std::result::Result<Vec<u8>, (usize, String)> {
    v.enumerate()
        .map(
            |(i, x)| {
                if x.fract() == 0.0 && (0.0..=255.0).contains(&x) { Ok(x as u8) } else { Err((i, x.to_string())) }
            },
        )
        .collect()
}

impl Samples {
    fn to_labels_u32(&self) -> std::result::Result<Vec<u32>, (usize, String, &'static str)> {
        match self {
            Samples::U8(v) => Ok(v.iter().map(|&x| u32::from(x)).collect()),
            Samples::U16(v) => Ok(v.iter().map(|&x| u32::from(x)).collect()),
            Samples::U32(v) => Ok(v.clone()),
            Samples::U64(v) => int_labels_u32(v),
            Samples::I8(v) => int_labels_u32(v),
            Samples::I16(v) => int_labels_u32(v),
            Samples::I32(v) => int_labels_u32(v),
            Samples::I64(v) => int_labels_u32(v),
            Samples::F32(v) => {
                float_labels_u32(v.iter().map(|&x| f64::from(x)), 16_777_216.0, "0..=16777216 (float32)")
            }
            Samples::F64(v) => float_labels_u32(v.iter().copied(), f64::from(u32::MAX), "0..=4294967295"),
        }
    }

    fn from_decoded(r: DecodingResult) -> Samples {
        match r {
            DecodingResult::U8(v) => Samples::U8(v),
            DecodingResult::U16(v) => Samples::U16(v),
            DecodingResult::U32(v) => Samples::U32(v),
            DecodingResult::U64(v) => Samples::U64(v),
            DecodingResult::I8(v) => Samples::I8(v),
            DecodingResult::I16(v) => Samples::I16(v),
            DecodingResult::I32(v) => Samples::I32(v),
            DecodingResult::I64(v) => Samples::I64(v),
            // f16 -> f32 is exact, and keeps the half type out of this module's API.
            DecodingResult::F16(v) => Samples::F32(v.into_iter().map(|x| x.to_f32()).collect()),
            DecodingResult::F32(v) => Samples::F32(v),
            DecodingResult::F64(v) => Samples::F64(v),
        }
    }

    /// Interprets raw uncompressed bytes (used where we bypass the decoder).
    fn from_bytes(b: &[u8], dtype: Dtype, le: bool) -> Option<Samples> {
        macro_rules! conv {
            ($t:ty, $n:expr, $variant:ident) => {
                Samples::$variant(
                    b.chunks_exact($n)
                        .map(|c| {
                            let a: [u8; $n] = c.try_into().unwrap();
                            if le { <$t>::from_le_bytes(a) } else { <$t>::from_be_bytes(a) }
                        })
                        .collect(),
                )
            };
        }
        Some(match dtype {
            Dtype::U8 => Samples::U8(b.to_vec()),
            Dtype::I8 => Samples::I8(b.iter().map(|&x| x as i8).collect()),
            Dtype::U16 => conv!(u16, 2, U16),
            Dtype::I16 => conv!(i16, 2, I16),
            Dtype::U32 => conv!(u32, 4, U32),
            Dtype::I32 => conv!(i32, 4, I32),
            Dtype::U64 => conv!(u64, 8, U64),
            Dtype::I64 => conv!(i64, 8, I64),
            Dtype::F32 => conv!(f32, 4, F32),
            Dtype::F64 => conv!(f64, 8, F64),
            Dtype::U1 | Dtype::U2 | Dtype::U4 | Dtype::F16 => return None,
        })
    }

    /// Undoes the `tiff` crate's WhiteIsZero inversion of unsigned data (`max - v`, exact).
    fn invert_unsigned(&mut self, bits: usize) {
        match self {
            Samples::U8(v) => {
                let max = if bits < 8 { (1u8 << bits) - 1 } else { u8::MAX };
                v.iter_mut().for_each(|x| *x = max - *x);
            }
            Samples::U16(v) => v.iter_mut().for_each(|x| *x = !*x),
            Samples::U32(v) => v.iter_mut().for_each(|x| *x = !*x),
            Samples::U64(v) => v.iter_mut().for_each(|x| *x = !*x),
            _ => {}
        }
    }

    fn len(&self) -> usize {
        match self {
            Samples::U8(v) => v.len(),
            Samples::U16(v) => v.len(),
            Samples::U32(v) => v.len(),
            Samples::U64(v) => v.len(),
            Samples::I8(v) => v.len(),
            Samples::I16(v) => v.len(),
            Samples::I32(v) => v.len(),
            Samples::I64(v) => v.len(),
            Samples::F32(v) => v.len(),
            Samples::F64(v) => v.len(),
        }
    }

    /// Writes the page into `out` as `(S, H, W)` f32.
    fn write_f32(&self, out: &mut [f32], s: usize, interleaved: bool) {
        match self {
            Samples::U8(v) => scatter(v, out, s, interleaved, |x| x as f32),
            Samples::U16(v) => scatter(v, out, s, interleaved, |x| x as f32),
            Samples::U32(v) => scatter(v, out, s, interleaved, |x| x as f32),
            Samples::U64(v) => scatter(v, out, s, interleaved, |x| x as f32),
            Samples::I8(v) => scatter(v, out, s, interleaved, |x| x as f32),
            Samples::I16(v) => scatter(v, out, s, interleaved, |x| x as f32),
            Samples::I32(v) => scatter(v, out, s, interleaved, |x| x as f32),
            Samples::I64(v) => scatter(v, out, s, interleaved, |x| x as f32),
            Samples::F32(v) => scatter(v, out, s, interleaved, |x| x),
            Samples::F64(v) => scatter(v, out, s, interleaved, |x| x as f32),
        }
    }

    /// Exact conversion to u8 labels, checked on the on-disk values (not their f32 image).
    fn to_labels(&self) -> std::result::Result<Vec<u8>, (usize, String)> {
        match self {
            Samples::U8(v) => Ok(v.clone()),
            Samples::U16(v) => int_labels(v),
            Samples::U32(v) => int_labels(v),
            Samples::U64(v) => int_labels(v),
            Samples::I8(v) => int_labels(v),
            Samples::I16(v) => int_labels(v),
            Samples::I32(v) => int_labels(v),
            Samples::I64(v) => int_labels(v),
            Samples::F32(v) => float_labels(v.iter().map(|&x| x as f64)),
            Samples::F64(v) => float_labels(v.iter().copied()),
        }
    }
}

/// Expands bit-packed rows (1/2/4 bits, most significant bits first, rows padded to a
/// byte) to one byte per pixel.
fn unpack_bits(packed: &[u8], width: usize, height: usize, bits: usize) -> Option<Vec<u8>> {
    let row_bytes = (width * bits).div_ceil(8);
    if packed.len() < row_bytes * height {
        return None;
    }
    let mask = (1u8 << bits) - 1;
    let mut out = Vec::with_capacity(width * height);
    for row in packed.chunks_exact(row_bytes).take(height) {
        for x in 0..width {
            let bit = x * bits;
            let shift = 8 - bits - (bit % 8);
            out.push((row[bit / 8] >> shift) & mask);
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------
// Reading: scanning the file and planning the layout
// ---------------------------------------------------------------------------------------

type Dec = Decoder<BufReader<File>>;

/// Where a page's pixel bytes come from.
#[derive(Clone, Debug)]
enum Source {
    /// Decoded by the `tiff` crate from the IFD at this index of the chain.
    Decoder { ifd: usize },
    /// Uncompressed bytes read directly, as `(offset, length)` runs: palette images (which
    /// the `tiff` crate refuses) and ImageJ files whose later pages have no directory.
    Raw { runs: Vec<(u64, u64)> },
}

/// What the first scan learns about one page, before any pixel data is read.
#[derive(Clone, Debug)]
struct PageInfo {
    width: usize,
    height: usize,
    /// Output samples per pixel (channels this page contributes).
    samples: usize,
    /// Samples are interleaved per pixel (chunky) rather than in separate planes.
    interleaved: bool,
    dtype: Dtype,
    source: Source,
    /// Uncompressed, stripped, no predictor: pixel bytes can be read directly.
    raw_ok: bool,
    /// WhiteIsZero unsigned data: the crate inverted it, and we restore the stored values.
    undo_invert: bool,
    /// Strip offsets and byte counts, kept for the raw paths.
    strips: Vec<(u64, u64)>,
    rows_per_strip: usize,
    /// Largest ratio of decoded to stored pixel bytes this page's compression allows.
    max_expansion: u64,
}

/// The parsed ImageJ dimensions of a hyperstack.
#[derive(Clone, Debug)]
struct ImageJ {
    images: usize,
    channels: usize,
    slices: usize,
    frames: usize,
}

/// Everything needed to decode a file into `(T, C, H, W)`.
struct Plan {
    pages: Vec<PageInfo>,
    t: usize,
    c: usize,
    height: usize,
    width: usize,
    samples: usize,
    dtype: Dtype,
    little_endian: bool,
    imagej: Option<ImageJ>,
    labels: Option<Vec<String>>,
    pixel_size: Option<(f64, f64)>,
    unit: Option<String>,
    /// An ImageJ signed 16-bit image (unsigned + 32768 on disk): values are shifted back.
    signed16: bool,
}

/// Opens the file, checks the header by hand (for a clear "not a TIFF" message) and
/// returns the decoder positioned on the first page, the file length and the byte order.
fn open(path: &Path) -> Result<(Dec, u64, bool)> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::tiff(path, "not a regular file; expected a TIFF image file"));
    }
    let len = meta.len();
    if len == 0 {
        return Err(Error::tiff(path, "file is empty (0 bytes); expected a TIFF image"));
    }
    let mut head = [0u8; 8];
    let got = read_up_to(&mut file, &mut head).map_err(|e| Error::io(path, e))?;
    let head = &head[..got];
    let little_endian = match head.get(..2) {
        Some(b"II") => true,
        Some(b"MM") => false,
        _ => {
            return Err(Error::tiff(
                path,
                format!(
                    "not a TIFF file: it starts with {}, but a TIFF starts with \"II\" \
                     (little-endian) or \"MM\" (big-endian) followed by the number 42",
                    show_bytes(head)
                ),
            ));
        }
    };
    if len < 8 {
        return Err(Error::tiff(
            path,
            format!(
                "file is only {len} bytes, shorter than the 8-byte TIFF header; it is \
                 truncated"
            ),
        ));
    }
    let magic =
        if little_endian { u16::from_le_bytes([head[2], head[3]]) } else { u16::from_be_bytes([head[2], head[3]]) };
    if magic != 42 && magic != 43 {
        return Err(Error::tiff(
            path,
            format!(
                "not a TIFF file: byte-order mark found but the version number is {magic}; \
                 expected 42 (TIFF) or 43 (BigTIFF)"
            ),
        ));
    }
    let mut reader = BufReader::new(file);
    validate_structure(path, &mut reader, len, little_endian, magic == 43)?;
    reader.seek(SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;

    // We bound sizes ourselves (MAX_TOTAL_SAMPLES before decoding, tag and chunk extents
    // checked against the file length), so the crate's default per-image limit (256 MiB)
    // would only refuse large valid pages. The crate also sizes tag vectors by this limit,
    // so it stays finite.
    let mut limits = Limits::default();
    limits.decoding_buffer_size = usize::try_from(MAX_TOTAL_SAMPLES * 8).unwrap_or(usize::MAX);
    limits.intermediate_buffer_size = usize::MAX;
    limits.ifd_value_size = MAX_TAG_BYTES;
    let dec =
        Decoder::new(reader).map_err(|e| tiff_err(path, "reading the first image directory", e))?.with_limits(limits);
    Ok((dec, len, little_endian))
}

/// Walks the directory chain and checks that every directory and every tag value lies
/// inside the file, before the `tiff` crate sees it. The crate sizes its buffers from the
/// counts in the file, so a corrupt count would otherwise become a huge allocation (and an
/// abort, which no `catch_unwind` can stop); it also gives "truncated" a clear message.
fn validate_structure(path: &Path, r: &mut BufReader<File>, len: u64, le: bool, big: bool) -> Result<()> {
    // Directories are read as whole blocks: one seek per page, not per entry.
    let mut read = |off: u64, n: usize| -> Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        r.seek(SeekFrom::Start(off)).map_err(|e| Error::io(path, e))?;
        r.read_exact(&mut b).map_err(|e| Error::io(path, e))?;
        Ok(b)
    };
    // An unsigned integer of any width in the file's byte order.
    let uint = |b: &[u8]| -> u64 {
        let fold = |a: u64, &x: &u8| (a << 8) | u64::from(x);
        if le { b.iter().rev().fold(0, fold) } else { b.iter().fold(0, fold) }
    };
    let (count_size, entry_size, ptr_size, inline): (u64, u64, usize, u64) =
        if big { (8, 20, 8, 8) } else { (2, 12, 4, 4) };
    let header = if big { 16 } else { 8 };
    if len < header {
        return Err(Error::tiff(
            path,
            format!("file is only {len} bytes, shorter than the {header}-byte TIFF header; it is truncated"),
        ));
    }
    let truncated = |what: String| {
        Error::tiff(path, format!("{what} but the file is only {len} bytes long; the file is truncated or corrupt"))
    };
    let mut off = uint(&read(if big { 8 } else { 4 }, ptr_size)?);
    if off == 0 {
        return Err(Error::tiff(path, "the file contains no image directory; expected at least one image"));
    }
    let mut seen = std::collections::HashSet::new();
    let mut page = 1usize;
    while off != 0 {
        if !seen.insert(off) {
            return Err(Error::tiff(
                path,
                format!("the directory chain loops back on itself at page {page}; the file is corrupt"),
            ));
        }
        if page > MAX_PAGES {
            return Err(Error::tiff(path, format!("file has more than {MAX_PAGES} pages; refusing to read it")));
        }
        if off.saturating_add(count_size) > len {
            return Err(truncated(format!("the directory of page {page} starts at byte {off}")));
        }
        let n = uint(&read(off, count_size as usize)?);
        let block = n.checked_mul(entry_size).and_then(|b| b.checked_add(ptr_size as u64)).unwrap_or(u64::MAX);
        let end = (off + count_size).saturating_add(block);
        if end > len {
            return Err(truncated(format!("the directory of page {page} ({n} entries) ends at byte {end}")));
        }
        // Bounded by the file length just checked.
        let ifd = read(off + count_size, block as usize)?;
        for e in ifd[..ifd.len() - ptr_size].chunks_exact(entry_size as usize) {
            let tag = uint(&e[0..2]);
            let count = uint(&e[4..4 + ptr_size]);
            // Unknown types are skipped by the decoder, so they cannot hurt.
            let unit: u64 = match uint(&e[2..4]) {
                1 | 2 | 6 | 7 => 1,
                3 | 8 => 2,
                4 | 9 | 11 | 13 => 4,
                5 | 10 | 12 | 16 | 17 | 18 => 8,
                _ => continue,
            };
            let size = count.saturating_mul(unit);
            if size > inline {
                let at = uint(&e[4 + ptr_size..]);
                if at.saturating_add(size) > len {
                    return Err(truncated(format!("page {page}: tag {tag} holds {size} bytes from byte {at}")));
                }
            }
        }
        off = uint(&ifd[ifd.len() - ptr_size..]);
        page += 1;
    }
    Ok(())
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Shows leading bytes as text when printable, else hex, for "not a TIFF" messages.
fn show_bytes(b: &[u8]) -> String {
    let b = &b[..b.len().min(8)];
    if !b.is_empty() && b.iter().all(|c| c.is_ascii_graphic() || *c == b' ') {
        format!("\"{}\"", String::from_utf8_lossy(b))
    } else {
        let hex: Vec<String> = b.iter().map(|c| format!("{c:02x}")).collect();
        format!("bytes [{}]", hex.join(" "))
    }
}

fn find_u64s(dec: &mut Dec, tag: Tag) -> std::result::Result<Option<Vec<u64>>, TiffError> {
    dec.find_tag_unsigned_vec::<u64>(tag)
}

/// The sample type of a page from its SampleFormat and BitsPerSample tags.
fn sample_dtype(path: &Path, ctx: &str, format: u64, bits: u64) -> Result<Dtype> {
    u16::try_from(format).ok().zip(u16::try_from(bits).ok()).and_then(|(f, b)| Dtype::from_tags(f, b)).ok_or_else(
        || {
            let kind = match format {
                1 => "unsigned integer",
                2 => "signed integer",
                3 => "floating point",
                4 => "untyped",
                5 | 6 => "complex",
                _ => "unknown-format",
            };
            Error::tiff(
                path,
                format!(
                    "{ctx}: {bits}-bit {kind} samples are not supported; expected 8/16/32/64-bit \
                 integers (or 1/2/4-bit unsigned) or 16/32/64-bit floats"
                ),
            )
        },
    )
}

/// Checks that every chunk lies inside the file, before anything is allocated for it:
/// this is the usual symptom of a truncated copy and gives a much clearer message than EOF.
fn check_chunks_in_file(
    path: &Path,
    ctx: &str,
    tiled: bool,
    offsets: &[u64],
    counts: &[u64],
    file_len: u64,
) -> Result<()> {
    let chunk = if tiled { "tile" } else { "strip" };
    for (i, (&o, &n)) in offsets.iter().zip(counts).enumerate() {
        if o.checked_add(n).is_none_or(|end| end > file_len) {
            return Err(Error::tiff(
                path,
                format!(
                    "{ctx}: pixel data ({chunk} {i}) spans bytes {o}..{} but the file is only \
                     {file_len} bytes long; the file is truncated (cut off while copying or \
                     writing?)",
                    o.saturating_add(n)
                ),
            ));
        }
    }
    Ok(())
}

/// The storage tags of a page that decide how its samples are read.
struct Layout {
    spp: u16,
    photometric: Option<u16>,
    compression: u16,
    predictor: u16,
    tiled: bool,
    /// Uncompressed strips of whole bytes: readable without the decoder.
    raw_ok: bool,
    dtype: Dtype,
}

/// Where an uncompressed page's strips are.
struct Strips<'a> {
    offsets: &'a [u64],
    counts: &'a [u64],
    rows_per_strip: usize,
    width: usize,
    height: usize,
}

impl Strips<'_> {
    fn raw_source(&self, path: &Path, ctx: &str, dtype: Dtype) -> Result<Source> {
        Ok(Source::Raw {
            runs: strip_runs(
                path,
                ctx,
                self.offsets,
                self.counts,
                self.rows_per_strip,
                self.width,
                self.height,
                dtype,
            )?,
        })
    }
}

/// The number of channels a page's pixels give, where its samples are read from (the
/// decoder, or raw strips for what the decoder refuses), and whether the decoder's
/// WhiteIsZero inversion must be undone.
fn channel_source(
    path: &Path,
    ctx: &str,
    dec: &mut Dec,
    ifd: usize,
    l: &Layout,
    strips: &Strips,
) -> Result<(usize, Source, bool)> {
    let Layout { spp, photometric, compression, predictor, tiled, raw_ok, dtype } = *l;
    let mut source = Source::Decoder { ifd };
    let samples = match dec.colortype() {
        Ok(ColorType::Gray(_)) => 1,
        Ok(ColorType::Multiband { num_samples, .. }) => usize::from(num_samples),
        Ok(c @ (ColorType::RGB(_) | ColorType::RGBA(_) | ColorType::GrayA(_))) => {
            // The decoder hands over the colour samples (and alpha) only, chunky or planar
            // alike: further ExtraSamples are not decoded, so they are not channels here.
            let n = usize::from(c.num_samples());
            if usize::from(spp) > n {
                log::warn!(
                    "{}: {ctx}: {} extra sample(s) per pixel beyond {c:?} are not read; the \
                     image has {n} channels",
                    path.display(),
                    usize::from(spp) - n
                );
            }
            n
        }
        Ok(other) => {
            return Err(Error::tiff(
                path,
                format!(
                    "{ctx}: colour type {other:?} ({spp} samples per pixel) is not supported; \
                     expected grayscale, or RGB/multi-sample pixels (split into channels)"
                ),
            ));
        }
        Err(_) if photometric == Some(3) => {
            // Palette: the crate refuses it, but the indices are the data we want.
            if !(raw_ok && spp == 1) {
                return Err(Error::tiff(
                    path,
                    format!(
                        "{ctx}: palette (indexed colour) image with compression {compression}, \
                         predictor {predictor}, {} and {spp} samples per pixel is not \
                         supported; expected uncompressed strips of one 8/16-bit sample",
                        if tiled { "tiles" } else { "strips" }
                    ),
                ));
            }
            source = strips.raw_source(path, ctx, dtype)?;
            1
        }
        Err(e) => return Err(tiff_err(path, ctx, e)),
    };
    // WhiteIsZero: keep the stored values, as ImageJ and tifffile do. Fiji saves binary
    // masks with an inverting LUT this way, and inverting them would swap object and
    // background. The crate inverts unsigned data exactly (so we undo it) and refuses
    // signed data (so we read it raw when uncompressed).
    let mut undo_invert = false;
    if photometric == Some(0) {
        let unsigned =
            matches!(dtype, Dtype::U1 | Dtype::U2 | Dtype::U4 | Dtype::U8 | Dtype::U16 | Dtype::U32 | Dtype::U64);
        if unsigned && samples == 1 {
            undo_invert = true;
        } else if raw_ok && spp == 1 {
            source = strips.raw_source(path, ctx, dtype)?;
        } else {
            return Err(Error::tiff(
                path,
                format!(
                    "{ctx}: WhiteIsZero {} data with compression {compression} and {spp} samples \
                     per pixel is not supported; expected unsigned integers, or uncompressed \
                     single-sample strips",
                    dtype.name()
                ),
            ));
        }
    }
    Ok((samples, source, undo_invert))
}

/// Reads the current page's directory into a `PageInfo`; `None` for a reduced-resolution
/// page (thumbnail/pyramid level), which is not part of the image data.
fn page_info(path: &Path, dec: &mut Dec, ifd: usize, file_len: u64) -> Result<Option<PageInfo>> {
    let ctx = format!("page {}", ifd + 1);
    let terr = |e: TiffError| tiff_err(path, &ctx, e);

    let subfile = dec.find_tag_unsigned::<u32>(Tag::NewSubfileType).ok().flatten().unwrap_or(0);
    if ifd > 0 && subfile & 1 != 0 {
        log::debug!("{}: skipping reduced-resolution page {}", path.display(), ifd + 1);
        return Ok(None);
    }

    let (w, h) = dec.dimensions().map_err(terr)?;
    let (width, height) = (w as usize, h as usize);
    // FillOrder 2 (least significant bit first within a byte) is not undone by the decoder:
    // bit-packed data would come out bit-reversed, so refuse it
    let fill_order = dec.find_tag_unsigned::<u16>(Tag::FillOrder).ok().flatten().unwrap_or(1);
    if fill_order != 1 {
        return Err(Error::tiff(
            path,
            format!(
                "{ctx} has FillOrder {fill_order} (bits stored least significant first); only FillOrder 1 is supported: re-save the file (e.g. with Fiji)"
            ),
        ));
    }
    let spp = dec.find_tag_unsigned::<u16>(Tag::SamplesPerPixel).map_err(terr)?.unwrap_or(1);
    let bits = find_u64s(dec, Tag::BitsPerSample).map_err(terr)?.and_then(|v| v.first().copied()).unwrap_or(1);
    let format = find_u64s(dec, Tag::SampleFormat).map_err(terr)?.and_then(|v| v.first().copied()).unwrap_or(1);
    let photometric = dec.find_tag_unsigned::<u16>(Tag::PhotometricInterpretation).map_err(terr)?;
    let compression = dec.find_tag_unsigned::<u16>(Tag::Compression).map_err(terr)?.unwrap_or(1);
    let predictor = dec.find_tag_unsigned::<u16>(Tag::Predictor).map_err(terr)?.unwrap_or(1);
    let planar = dec.find_tag_unsigned::<u16>(Tag::PlanarConfiguration).map_err(terr)?.unwrap_or(1) == 2;
    let tiled = dec.get_chunk_type() == ChunkType::Tile;

    let dtype = sample_dtype(path, &ctx, format, bits)?;

    let (otag, ctag) =
        if tiled { (Tag::TileOffsets, Tag::TileByteCounts) } else { (Tag::StripOffsets, Tag::StripByteCounts) };
    let offsets = find_u64s(dec, otag).map_err(terr)?.unwrap_or_default();
    let counts = find_u64s(dec, ctag).map_err(terr)?.unwrap_or_default();
    check_chunks_in_file(path, &ctx, tiled, &offsets, &counts, file_len)?;
    let rows_per_strip =
        dec.find_tag_unsigned::<u64>(Tag::RowsPerStrip).map_err(terr)?.unwrap_or(h as u64).clamp(1, h as u64) as usize;
    let raw_ok = compression == 1 && predictor == 1 && !tiled && dtype.bits() >= 8;

    let layout = Layout { spp, photometric, compression, predictor, tiled, raw_ok, dtype };
    let strips = Strips { offsets: &offsets, counts: &counts, rows_per_strip, width, height };
    let (samples, source, undo_invert) = channel_source(path, &ctx, dec, ifd, &layout, &strips)?;
    if samples == 0 {
        return Err(Error::tiff(path, format!("{ctx}: zero samples per pixel")));
    }
    if samples > 1 && dtype.bits() < 8 {
        return Err(Error::tiff(
            path,
            format!("{ctx}: {}-bit data with {samples} samples per pixel is not supported", dtype.bits()),
        ));
    }
    Ok(Some(PageInfo {
        width,
        height,
        samples,
        interleaved: !planar,
        dtype,
        source,
        raw_ok,
        undo_invert,
        strips: offsets.into_iter().zip(counts).collect(),
        rows_per_strip,
        // CCITT fax codes (RLE, T.4, T.6) spend as little as one bit on a blank row of
        // bilevel pixels, so a blank mask expands up to its width in pixels per stored bit
        // (up to MAX_FAX_ROW, so a corrupt header still cannot ask for many gigabytes)
        max_expansion: if matches!(compression, 2..=4) {
            MAX_EXPANSION.max((width as u64).min(MAX_FAX_ROW))
        } else {
            MAX_EXPANSION
        },
    }))
}

/// The `(offset, length)` runs holding exactly the pixel bytes of an uncompressed,
/// single-sample stripped page.
#[allow(clippy::too_many_arguments)]
fn strip_runs(
    path: &Path,
    ctx: &str,
    offsets: &[u64],
    counts: &[u64],
    rows_per_strip: usize,
    width: usize,
    height: usize,
    dtype: Dtype,
) -> Result<Vec<(u64, u64)>> {
    let row_bytes = (width * dtype.bits() / 8) as u64;
    let n = height.div_ceil(rows_per_strip);
    if offsets.len() < n || counts.len() < n {
        return Err(Error::tiff(
            path,
            format!("{ctx}: {} strips listed but {n} needed for {height} rows", offsets.len()),
        ));
    }
    (0..n)
        .map(|i| {
            let rows = rows_per_strip.min(height - i * rows_per_strip) as u64;
            let need = rows * row_bytes;
            if counts[i] < need {
                return Err(Error::tiff(path, format!("{ctx}: strip {i} holds {} bytes; expected {need}", counts[i])));
            }
            Ok((offsets[i], need))
        })
        .collect()
}

/// Parses an ImageJ description; `None` if the text is not one.
fn parse_imagej(desc: &str) -> Option<(ImageJRaw, Option<String>)> {
    if !desc.starts_with("ImageJ=") {
        return None;
    }
    let mut raw = ImageJRaw::default();
    let mut unit = None;
    for line in desc.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim();
        // Zero or unparsable counts are treated as absent rather than trusted.
        let n = v.parse::<usize>().ok().filter(|&n| n > 0);
        match k.trim() {
            "images" => raw.images = n,
            "channels" => raw.channels = n,
            "slices" => raw.slices = n,
            "frames" => raw.frames = n,
            // ImageJ's density calibration: function (0 = straight line) and coefficients
            "cf" => raw.cf = v.parse::<i32>().ok(),
            "c0" => raw.c0 = v.parse::<f64>().ok(),
            "c1" => raw.c1 = v.parse::<f64>().ok(),
            "unit" if !v.is_empty() => unit = Some(v.replace("\\u00B5", "\u{b5}").replace("\\u00b5", "\u{b5}")),
            _ => {}
        }
    }
    Some((raw, unit))
}

/// ImageJ description counts as written, before defaults.
#[derive(Default, Debug)]
struct ImageJRaw {
    images: Option<usize>,
    channels: Option<usize>,
    slices: Option<usize>,
    frames: Option<usize>,
    cf: Option<i32>,
    c0: Option<f64>,
    c1: Option<f64>,
}

impl ImageJRaw {
    /// ImageJ stores a signed 16-bit image as unsigned values + 32768 with the calibration
    /// `cf=0 c0=-32768 c1=1` that removes the offset again.
    fn signed16(&self) -> bool {
        self.cf == Some(0) && self.c0 == Some(-32768.0) && self.c1 == Some(1.0)
    }
}

/// Extracts the slice labels ('labl' entries) from ImageJ's IJMetadata blob. Returns
/// `None` for anything malformed: labels are a nicety, never a reason to fail a read.
fn parse_ij_labels(data: &[u8], counts: &[u64]) -> Option<Vec<String>> {
    let le = match data.get(..4)? {
        b"IJIJ" => false,
        b"JIJI" => true,
        _ => return None,
    };
    let u32_at = |pos: usize| -> Option<u32> {
        let a: [u8; 4] = data.get(pos..pos + 4)?.try_into().ok()?;
        Some(if le { u32::from_le_bytes(a) } else { u32::from_be_bytes(a) })
    };
    let header = usize::try_from(*counts.first()?).ok()?;
    if header < 12 || header > data.len() || (header - 4) % 8 != 0 {
        return None;
    }
    let labl = u32::from_be_bytes(*b"labl");
    let mut pos = header;
    let mut entry = 1;
    let mut labels = None;
    for t in 0..(header - 4) / 8 {
        let ty = u32_at(4 + 8 * t)?;
        let n = u32_at(8 + 8 * t)?;
        let mut these = Vec::new();
        for _ in 0..n {
            let len = usize::try_from(*counts.get(entry)?).ok()?;
            entry += 1;
            let bytes = data.get(pos..pos.checked_add(len)?)?;
            pos += len;
            if ty == labl {
                let units: Vec<u16> = bytes
                    .chunks_exact(2)
                    .map(|c| if le { u16::from_le_bytes([c[0], c[1]]) } else { u16::from_be_bytes([c[0], c[1]]) })
                    .collect();
                // ImageJ may append extra info after a newline; the first line is the label.
                let s = String::from_utf16_lossy(&units);
                these.push(s.lines().next().unwrap_or("").trim().to_string());
            }
        }
        if ty == labl {
            labels = Some(these);
        }
    }
    labels
}

/// Reads the raw bytes of a byte-typed tag (ASCII, BYTE, UNDEFINED), capped at
/// `MAX_TAG_BYTES`, without the crate's UTF-8 check or its per-byte `Value` vector.
fn tag_bytes(dec: &mut Dec, tag: Tag) -> Option<Vec<u8>> {
    let mut ifd = dec.image_ifd();
    let entry = ifd.find_entry(tag)?;
    // Only byte-sized types: that is what text and ImageJ's blob are stored as.
    if !matches!(entry.field_type(), Type::BYTE | Type::ASCII | Type::UNDEFINED | Type::SBYTE) {
        return None;
    }
    let size = usize::try_from(entry.count()).ok().filter(|&s| s <= MAX_TAG_BYTES)?;
    let mut buf = vec![0u8; size];
    let got = ifd.find_tag_bytes(tag, &mut buf, 0).ok()??;
    buf.truncate(got);
    Some(buf)
}

/// The first page's ImageDescription, decoded as UTF-8 or, failing that, Latin-1: some
/// writers store "µ" as a single byte, which the crate rejects, and losing the description
/// would silently lose the hyperstack layout.
fn description(dec: &mut Dec) -> Option<String> {
    if let Ok(Some(Value::Ascii(s))) = dec.find_tag(Tag::ImageDescription) {
        return Some(s);
    }
    let mut b = tag_bytes(dec, Tag::ImageDescription)?;
    if let Some(nul) = b.iter().position(|&c| c == 0) {
        b.truncate(nul);
    }
    Some(match String::from_utf8(b) {
        Ok(s) => s,
        Err(e) => e.into_bytes().iter().map(|&c| c as char).collect(),
    })
}

/// A RATIONAL (or float) tag as f64; `None` if absent, zero or not a number.
fn rational(dec: &mut Dec, tag: Tag) -> Option<f64> {
    let v = match dec.find_tag(tag).ok()?? {
        Value::Rational(n, d) if d != 0 => f64::from(n) / f64::from(d),
        Value::Float(f) => f64::from(f),
        Value::Double(f) => f,
        Value::Short(n) => f64::from(n),
        Value::Unsigned(n) => f64::from(n),
        _ => return None,
    };
    (v.is_finite() && v > 0.0).then_some(v)
}

/// Every full-resolution page's `PageInfo`, in file order.
fn read_pages(path: &Path, dec: &mut Dec, file_len: u64) -> Result<Vec<PageInfo>> {
    let mut pages = Vec::new();
    let mut ifd = 0usize;
    loop {
        if let Some(p) = page_info(path, dec, ifd, file_len)? {
            pages.push(p);
        }
        if !dec.more_images() {
            break;
        }
        ifd += 1;
        if ifd >= MAX_PAGES {
            return Err(Error::tiff(path, format!("file has more than {MAX_PAGES} pages; refusing to read it")));
        }
        dec.next_image().map_err(|e| tiff_err(path, &format!("reading the directory of page {}", ifd + 1), e))?;
    }
    Ok(pages)
}

/// All pages must agree with the first, or no (T, C, H, W) array can hold them.
fn check_pages_agree(path: &Path, pages: &[PageInfo]) -> Result<()> {
    let first = &pages[0];
    for (i, p) in pages.iter().enumerate().skip(1) {
        if (p.width, p.height) != (first.width, first.height) {
            return Err(Error::tiff(
                path,
                format!(
                    "page {} is {}x{} pixels but page 1 is {}x{}; all pages must have the same \
                     size",
                    i + 1,
                    p.width,
                    p.height,
                    first.width,
                    first.height
                ),
            ));
        }
        if p.samples != first.samples || p.dtype != first.dtype {
            return Err(Error::tiff(
                path,
                format!(
                    "page {} holds {} x {} samples per pixel but page 1 holds {} x {}; all \
                     pages must share one sample type",
                    i + 1,
                    p.samples,
                    p.dtype.name(),
                    first.samples,
                    first.dtype.name()
                ),
            ));
        }
    }
    Ok(())
}

/// The hyperstack layout an ImageJ description gives, checked against the pages; a large
/// stack written with one directory gets its missing pages rebuilt in `pages`.
fn imagej_layout(path: &Path, raw: &ImageJRaw, pages: &mut Vec<PageInfo>, file_len: u64) -> Result<ImageJ> {
    let n = pages.len();
    let s = pages[0].samples;
    let images = raw.images.unwrap_or(n);
    let has_dims = raw.channels.is_some() || raw.slices.is_some() || raw.frames.is_some();
    // Without dimensions ImageJ treats the images as a plain stack of slices.
    let (ch, sl, fr) = if has_dims {
        (raw.channels.unwrap_or(1), raw.slices.unwrap_or(1), raw.frames.unwrap_or(1))
    } else {
        (1, images, 1)
    };
    let product = ch.checked_mul(sl).and_then(|x| x.checked_mul(fr));
    if product != Some(images) {
        return Err(Error::tiff(
            path,
            format!(
                "ImageJ description is inconsistent: channels={ch} x slices={sl} x \
                 frames={fr} does not equal images={images}"
            ),
        ));
    }
    if images != n {
        match contiguous_pages(&pages[0], pages, images, file_len) {
            Some(virt) => *pages = virt,
            None => {
                return Err(Error::tiff(
                    path,
                    format!(
                        "ImageJ description says the file holds {images} images \
                         (channels={ch} x slices={sl} x frames={fr}) but it has {n} \
                         pages; expected pages == channels x slices x frames"
                    ),
                ));
            }
        }
    }
    if s > 1 && ch > 1 {
        return Err(Error::tiff(
            path,
            format!(
                "ImageJ hyperstack with {ch} channels of {s}-sample (RGB) pixels is not \
                 supported; expected grayscale channels"
            ),
        ));
    }
    Ok(ImageJ { images, channels: ch, slices: sl, frames: fr })
}

/// Refuses a header that asks for more samples than allowed, or than the file's bytes
/// could hold.
fn check_size(path: &Path, t: usize, c: usize, pages: &[PageInfo], file_len: u64) -> Result<()> {
    let first = &pages[0];
    let total = (t as u64) * (c as u64) * (first.width as u64) * (first.height as u64);
    if total > MAX_TOTAL_SAMPLES {
        return Err(Error::tiff(
            path,
            format!(
                "image too large: {t} x {c} x {} x {} = {total} samples exceeds the limit of \
                 {MAX_TOTAL_SAMPLES} (2^31); the file is corrupt or must be read in parts",
                first.height, first.width
            ),
        ));
    }
    // Compressed pixel data expands at most about 2730x (LZW with 12-bit codes; Deflate
    // about 1032x, PackBits 64x; fax codes: see max_expansion). A header that claims more
    // pixels than the file's bytes could hold is corrupt: refuse it before allocating (a
    // 400-byte file once asked for 8 GB here, found by fuzzing).
    let stored_bits = total.saturating_mul(first.dtype.bits() as u64);
    let max_expansion = pages.iter().map(|p| p.max_expansion).max().unwrap_or(MAX_EXPANSION);
    if stored_bits / 8 > file_len.saturating_mul(max_expansion).saturating_add(1 << 20) {
        return Err(Error::tiff(
            path,
            format!(
                "the header describes {t} x {c} x {} x {} samples of {} bits, more than a \
                 {file_len}-byte file can hold even compressed (at most {max_expansion}x); the \
                 file is corrupt or truncated",
                first.height,
                first.width,
                first.dtype.bits() as u64
            ),
        ));
    }
    Ok(())
}

/// ImageJ's channel labels, when every channel is a single-sample plane and some label is
/// set (unset ones become `ch{i}`). Labels are per page in CZT order: the first C belong
/// to the first time point / slice.
fn channel_labels(imagej: Option<&ImageJ>, labels: Option<Vec<String>>, samples: usize) -> Option<Vec<String>> {
    match (imagej, labels) {
        (Some(ij), Some(l))
            if samples == 1 && l.len() >= ij.channels && l[..ij.channels].iter().any(|x| !x.is_empty()) =>
        {
            Some(
                l[..ij.channels]
                    .iter()
                    .enumerate()
                    .map(|(i, x)| if x.is_empty() { format!("ch{i}") } else { x.clone() })
                    .collect(),
            )
        }
        _ => None,
    }
}

/// The pixel size `(x, y)` from the resolution tags (pixels per unit, so the size is the
/// inverse), and its unit: ImageJ's, else the ResolutionUnit's.
fn pixel_size_and_unit(
    xres: Option<f64>,
    yres: Option<f64>,
    res_unit: Option<u16>,
    unit_ij: Option<String>,
) -> (Option<(f64, f64)>, Option<String>) {
    let pixel_size = match (xres, yres) {
        (Some(x), Some(y)) => Some((1.0 / x, 1.0 / y)),
        (Some(x), None) => Some((1.0 / x, 1.0 / x)),
        _ => None,
    };
    let unit = unit_ij.or(match (pixel_size, res_unit) {
        (None, _) | (_, Some(1)) => None,
        (_, Some(3)) => Some("cm".to_string()),
        // TIFF's default ResolutionUnit is inch.
        (_, Some(2) | None) => Some("inch".to_string()),
        (_, Some(_)) => None,
    });
    (pixel_size, unit)
}

/// Scans all directories, validates them against each other and decides the layout.
fn open_and_plan(path: &Path) -> Result<(Dec, Plan)> {
    let (mut dec, file_len, little_endian) = open(path)?;

    // First-page metadata: ImageJ description and labels, resolution.
    let ij = description(&mut dec).and_then(|d| parse_imagej(&d));
    let labels = match (
        tag_bytes(&mut dec, Tag::Unknown(TAG_IJ_METADATA)),
        dec.find_tag_unsigned_vec::<u64>(Tag::Unknown(TAG_IJ_BYTE_COUNTS)).ok().flatten(),
    ) {
        (Some(data), Some(counts)) => parse_ij_labels(&data, &counts),
        _ => None,
    };
    let xres = rational(&mut dec, Tag::XResolution);
    let yres = rational(&mut dec, Tag::YResolution);
    let res_unit = dec.find_tag_unsigned::<u16>(Tag::ResolutionUnit).ok().flatten();

    let mut pages = read_pages(path, &mut dec, file_len)?;
    check_pages_agree(path, &pages)?;
    let (height, width, s, dtype) = (pages[0].height, pages[0].width, pages[0].samples, pages[0].dtype);
    let signed16 = dtype == Dtype::U16 && ij.as_ref().is_some_and(|(raw, _)| raw.signed16());

    let (t, c, imagej, unit_ij) = match ij {
        Some((raw, unit)) => {
            let ij = imagej_layout(path, &raw, &mut pages, file_len)?;
            (ij.slices * ij.frames, ij.channels * s, Some(ij), unit)
        }
        None => (pages.len(), s, None, None),
    };
    check_size(path, t, c, &pages, file_len)?;
    let labels = channel_labels(imagej.as_ref(), labels, s);
    let (pixel_size, unit) = pixel_size_and_unit(xres, yres, res_unit, unit_ij);

    let plan = Plan {
        height,
        width,
        samples: s,
        dtype,
        pages,
        t,
        c,
        little_endian,
        imagej,
        labels,
        pixel_size,
        unit,
        signed16,
    };
    Ok((dec, plan))
}

/// ImageJ writes large stacks with a directory for the first image only and the pixel
/// data of all images back to back; rebuild the missing pages when that is what we see.
fn contiguous_pages(first: &PageInfo, pages: &[PageInfo], images: usize, file_len: u64) -> Option<Vec<PageInfo>> {
    if images <= pages.len() || !first.raw_ok || !matches!(first.source, Source::Decoder { .. }) {
        return None;
    }
    let page_bytes = (first.width * first.height * first.samples * first.dtype.bits() / 8) as u64;
    let start = first.strips.first()?.0;
    // The first page's strips must themselves be contiguous from `start`.
    let mut pos = start;
    for (i, &(o, n)) in first.strips.iter().enumerate() {
        let rows = first.rows_per_strip.min(first.height.saturating_sub(i * first.rows_per_strip)) as u64;
        let need = rows * (first.width * first.samples * first.dtype.bits() / 8) as u64;
        if o != pos || n < need {
            return None;
        }
        pos += need;
    }
    let end = start.checked_add(page_bytes.checked_mul(images as u64)?)?;
    if end > file_len {
        return None;
    }
    // Any directories that do exist must point where the contiguous layout says.
    for (k, p) in pages.iter().enumerate() {
        if p.strips.first()?.0 != start + k as u64 * page_bytes {
            return None;
        }
    }
    Some(
        (0..images as u64)
            .map(|k| PageInfo {
                source: Source::Raw { runs: vec![(start + k * page_bytes, page_bytes)] },
                ..first.clone()
            })
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------
// Reading: decoding pixel data
// ---------------------------------------------------------------------------------------

/// Decodes page `idx` of the plan into its on-disk sample type.
fn decode_page(path: &Path, dec: &mut Dec, plan: &Plan, idx: usize) -> Result<Samples> {
    let page = &plan.pages[idx];
    let ctx = format!("reading the pixel data of page {} of {}", idx + 1, plan.pages.len());
    let samples = match &page.source {
        Source::Decoder { ifd } => {
            dec.seek_to_image(*ifd).map_err(|e| tiff_err(path, &ctx, e))?;
            let mut res = DecodingResult::U8(Vec::new());
            dec.read_image_to_buffer(&mut res).map_err(|e| tiff_err(path, &ctx, e))?;
            let bits = page.dtype.bits();
            let mut samples = match (bits < 8, res) {
                (true, DecodingResult::U8(packed)) => Samples::U8(
                    unpack_bits(&packed, page.width, page.height, bits)
                        .ok_or_else(|| Error::tiff(path, format!("{ctx}: too few bytes of {bits}-bit data")))?,
                ),
                (_, res) => Samples::from_decoded(res),
            };
            if page.undo_invert {
                samples.invert_unsigned(bits);
            }
            samples
        }
        Source::Raw { runs } => {
            let total: u64 = runs.iter().map(|r| r.1).sum();
            let mut bytes = Vec::with_capacity(total as usize);
            let r = dec.inner();
            for &(off, n) in runs {
                r.seek(SeekFrom::Start(off)).map_err(|e| Error::io(path, e))?;
                let got = r.by_ref().take(n).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
                if got as u64 != n {
                    return Err(Error::tiff(
                        path,
                        format!("{ctx}: the file is truncated (expected {n} bytes at offset {off})"),
                    ));
                }
            }
            Samples::from_bytes(&bytes, page.dtype, plan.little_endian).ok_or_else(|| {
                Error::tiff(path, format!("{ctx}: {} data cannot be read in this layout", page.dtype.name()))
            })?
        }
    };
    let expected = page.width * page.height * page.samples;
    if samples.len() != expected {
        return Err(Error::tiff(
            path,
            format!(
                "{ctx}: decoded {} samples but expected {} x {} x {} = {expected}; the file is \
                 corrupt or uses an unsupported layout",
                samples.len(),
                page.width,
                page.height,
                page.samples
            ),
        ));
    }
    Ok(samples)
}

/// Decodes all pages into one flat f32 buffer in page order, each page as `(S, H, W)`.
fn decode_all(path: &Path, dec: &mut Dec, plan: &Plan) -> Result<Vec<f32>> {
    let page_len = plan.width * plan.height * plan.samples;
    // Size was bounded in the plan by MAX_TOTAL_SAMPLES and by what the file's bytes can
    // hold (MAX_EXPANSION), so this allocation is sane.
    let mut out = vec![0f32; page_len * plan.pages.len()];
    for (i, chunk) in out.chunks_exact_mut(page_len).enumerate() {
        let samples = decode_page(path, dec, plan, i)?;
        samples.write_f32(chunk, plan.samples, plan.pages[i].interleaved);
    }
    if plan.signed16 {
        // the signed values ImageJ shows (and Fiji hands to the plugins)
        out.iter_mut().for_each(|v| *v -= 32768.0);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------

/// One page of pixels to write.
enum Pixels<'a> {
    F32(&'a [f32]),
    U8(&'a [u8]),
    U16(&'a [u16]),
    U32(&'a [u32]),
}

impl Pixels<'_> {
    /// (BitsPerSample, SampleFormat, bytes per sample)
    fn format(&self) -> (u16, u16, u64) {
        match self {
            Pixels::F32(_) => (32, 3, 4),
            Pixels::U8(_) => (8, 1, 1),
            Pixels::U16(_) => (16, 1, 2),
            Pixels::U32(_) => (32, 1, 4),
        }
    }
}

fn check_write_dims(c: usize, h: usize, w: usize) -> Result<()> {
    if c == 0 || h == 0 || w == 0 {
        return Err(Error::InvalidInput(format!(
            "cannot write an empty image ({c} channels, {h}x{w} pixels); every dimension must \
             be at least 1"
        )));
    }
    if h > u32::MAX as usize || w > u32::MAX as usize {
        return Err(Error::InvalidArgument(format!("image of {h}x{w} pixels is too large for TIFF")));
    }
    Ok(())
}

/// (min, max) of the finite values, or (0, 1) when there are none.
fn finite_range(v: &[f32]) -> (f64, f64) {
    let (lo, hi) = v
        .iter()
        .filter(|x| x.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    if lo > hi { (0.0, 1.0) } else { (f64::from(lo), f64::from(hi)) }
}

/// Builds ImageJ's IJMetadata blob and byte counts (native byte order, matching the file
/// that `TiffEncoder` writes): 'labl' one UTF-16 label per page, 'rang' display ranges.
fn ij_metadata(labels: Option<&[String]>, ranges: Option<&[(f64, f64)]>) -> Option<(Vec<u8>, Vec<u32>)> {
    let ne32 = |x: u32| x.to_ne_bytes();
    let mut header = ne32(u32::from_be_bytes(*b"IJIJ")).to_vec();
    let mut body = Vec::new();
    let mut counts = vec![0u32];
    if let Some(labels) = labels {
        header.extend(ne32(u32::from_be_bytes(*b"labl")));
        header.extend(ne32(labels.len() as u32));
        for l in labels {
            let bytes: Vec<u8> = l.encode_utf16().flat_map(|u| u.to_ne_bytes()).collect();
            counts.push(bytes.len() as u32);
            body.extend(bytes);
        }
    }
    if let Some(ranges) = ranges {
        // One entry holding min,max per channel, as ImageJ writes it.
        header.extend(ne32(u32::from_be_bytes(*b"rang")));
        header.extend(ne32(1));
        let bytes: Vec<u8> = ranges.iter().flat_map(|&(a, b)| [a, b]).flat_map(|x| x.to_ne_bytes()).collect();
        counts.push(bytes.len() as u32);
        body.extend(bytes);
    }
    if counts.len() == 1 {
        return None;
    }
    counts[0] = header.len() as u32;
    header.extend(body);
    Some((header, counts))
}

/// Writes pages atomically: a temporary file in the target directory, renamed into place.
fn write_pages(
    path: &Path,
    width: u32,
    height: u32,
    pages: &[Pixels],
    desc: &str,
    ij_meta: Option<&(Vec<u8>, Vec<u32>)>,
) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(Error::io(
            path,
            io::Error::new(io::ErrorKind::NotFound, format!("parent directory '{}' does not exist", parent.display())),
        ));
    }
    if path.is_dir() {
        return Err(Error::io(path, io::Error::other("a directory exists at this path")));
    }
    let mut builder = tempfile::Builder::new();
    builder.prefix(".lumos-").suffix(".tif.tmp");
    // NamedTempFile defaults to 0600; a saved image should get ordinary permissions
    // (0666 minus the umask), like any file the user creates.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let tmp = builder.tempfile_in(parent).map_err(|e| Error::io(path, e))?;

    let data_bytes: u64 = pages.iter().map(|p| u64::from(width) * u64::from(height) * p.format().2).sum();
    let meta_bytes = ij_meta.map_or(0, |m| m.0.len() as u64 + 4 * m.1.len() as u64);
    // Classic TIFF offsets are 32-bit; leave room for directories and tag data.
    let big = data_bytes + meta_bytes + desc.len() as u64 + 512 * pages.len() as u64 + 4096 > u64::from(u32::MAX);

    let enc_err = |e: TiffError| match e {
        TiffError::IoError(io) => Error::io(path, io),
        other => Error::tiff(path, format!("encoding failed: {other}")),
    };
    guarded(path, WRITING, || {
        let mut w = BufWriter::new(tmp.as_file());
        if big {
            let mut enc = TiffEncoder::new_big(&mut w).map_err(enc_err)?;
            encode_pages::<_, TiffKindBig>(&mut enc, width, height, pages, desc, ij_meta).map_err(enc_err)?;
        } else {
            let mut enc = TiffEncoder::new(&mut w).map_err(enc_err)?;
            encode_pages::<_, TiffKindStandard>(&mut enc, width, height, pages, desc, ij_meta).map_err(enc_err)?;
        }
        w.flush().map_err(|e| Error::io(path, e))?;
        Ok(())
    })?;
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Writes all pixel data first (back to back, as ImageJ expects), then one directory per
/// page pointing into it. The first directory carries the description and IJMetadata.
fn encode_pages<W: Write + Seek, K: TiffKind>(
    enc: &mut TiffEncoder<W, K>,
    width: u32,
    height: u32,
    pages: &[Pixels],
    desc: &str,
    ij_meta: Option<&(Vec<u8>, Vec<u32>)>,
) -> tiff::TiffResult<()> {
    let mut dir = enc.image_directory()?;
    let mut offsets = Vec::with_capacity(pages.len());
    for p in pages {
        offsets.push(match p {
            Pixels::F32(s) => dir.write_data(*s)?,
            Pixels::U8(s) => dir.write_data(*s)?,
            Pixels::U16(s) => dir.write_data(*s)?,
            Pixels::U32(s) => dir.write_data(*s)?,
        });
    }
    page_tags::<W, K>(&mut dir, width, height, &pages[0], offsets[0])?;
    dir.write_tag(Tag::ImageDescription, desc)?;
    if let Some((data, counts)) = ij_meta {
        dir.write_tag(Tag::Unknown(TAG_IJ_BYTE_COUNTS), &counts[..])?;
        dir.write_tag(Tag::Unknown(TAG_IJ_METADATA), &data[..])?;
    }
    dir.finish()?;
    for (p, &offset) in pages.iter().zip(&offsets).skip(1) {
        let mut dir = enc.image_directory()?;
        page_tags::<W, K>(&mut dir, width, height, p, offset)?;
        dir.finish()?;
    }
    Ok(())
}

/// The tags every page carries: one uncompressed grayscale strip at `offset`.
fn page_tags<W: Write + Seek, K: TiffKind>(
    dir: &mut DirectoryEncoder<'_, W, K>,
    width: u32,
    height: u32,
    page: &Pixels,
    offset: u64,
) -> tiff::TiffResult<()> {
    let (bits, format, bytes) = page.format();
    dir.write_tag(Tag::NewSubfileType, 0u32)?;
    dir.write_tag(Tag::ImageWidth, width)?;
    dir.write_tag(Tag::ImageLength, height)?;
    dir.write_tag(Tag::BitsPerSample, bits)?;
    dir.write_tag(Tag::Compression, 1u16)?;
    dir.write_tag(Tag::PhotometricInterpretation, 1u16)?; // BlackIsZero
    dir.write_tag(Tag::StripOffsets, K::convert_offset(offset)?)?;
    dir.write_tag(Tag::SamplesPerPixel, 1u16)?;
    dir.write_tag(Tag::RowsPerStrip, height)?;
    let count = u64::from(width) * u64::from(height) * bytes;
    dir.write_tag(Tag::StripByteCounts, K::convert_offset(count)?)?;
    dir.write_tag(Tag::SampleFormat, format)?;
    Ok(())
}
