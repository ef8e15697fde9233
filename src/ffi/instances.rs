//! The C API of instances: segmenting into one label per cell, and the per-object
//! measurement table.

use std::ffi::{CString, c_char};
use std::path::Path;

use ndarray::{Array3, ArrayView2};

use super::api::{
    LumosCancelToken, LumosDiffusionOptions, LumosModel, LumosTileOptions, cancel_of, check_out_len, diffusion_options,
    element_count, input_view, model_ref, segment_options,
};
use super::{Fail, LumosStatus, arg_str, guard, null};
use crate::engine::instances::InstanceOptions;
use crate::engine::measure::{MeasureOptions, Table, measure};
use crate::engine::progress::Monitor;
use crate::image::{Image, Labels};

/// What the measurements know about the pixels. Fill with
/// `lumos_measure_options_default`, then set what is known.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LumosMeasureOptions {
    /// Pixel size in micrometres (square pixels). NaN = unknown: the table then has no
    /// µm columns and no dry mass. Zero, negative or infinite is INVALID_ARGUMENT.
    pub pixel_size_um: f64,
    /// Illumination wavelength in nanometres, for the dry mass of a phase channel in
    /// radians. NaN = no dry mass. Zero, negative or infinite is INVALID_ARGUMENT.
    pub wavelength_nm: f64,
    /// Specific refraction increment α in µm³/pg (default 0.19).
    pub alpha_um3_per_pg: f64,
    /// The phase channel for the dry mass; -1 = the channel named "phase", or the only
    /// channel of a single-channel image.
    pub phase_channel: i32,
    /// Objects smaller than this many pixels are removed (segmenting only; default 10).
    pub min_size: usize,
}

impl Default for LumosMeasureOptions {
    fn default() -> Self {
        LumosMeasureOptions {
            pixel_size_um: f64::NAN,
            wavelength_nm: f64::NAN,
            alpha_um3_per_pg: crate::engine::measure::DEFAULT_ALPHA_UM3_PER_PG,
            phase_channel: -1,
            min_size: InstanceOptions::default().min_size,
        }
    }
}

impl LumosMeasureOptions {
    fn to_engine(self) -> Result<MeasureOptions, Fail> {
        let known = |v: f64| if v.is_nan() { None } else { Some(v) };
        let check = |what: &str, unit: &str, v: f64| {
            crate::engine::measure::check_positive(what, unit, v)
                .map_err(|e| Fail(LumosStatus::InvalidArgument, e.to_string()))
        };
        let pixel_size_um = known(self.pixel_size_um).map(|p| check("pixel_size_um", "µm", p)).transpose()?;
        let wavelength_um =
            known(self.wavelength_nm).map(|l| check("wavelength_nm", "nm", l).map(|l| l / 1000.0)).transpose()?;
        let phase_channel = match self.phase_channel {
            -1 => None,
            c if c >= 0 => Some(c as usize),
            c => {
                return Err(Fail(
                    LumosStatus::InvalidArgument,
                    format!("phase_channel is {c}; expected -1 or a channel index"),
                ));
            }
        };
        Ok(MeasureOptions { pixel_size_um, wavelength_um, alpha_um3_per_pg: self.alpha_um3_per_pg, phase_channel })
    }
}

/// Opaque per-object measurement table: one row per object, in increasing label order,
/// and named columns of doubles (see `lumos_table_column_name`).
///
/// Columns: `label`; `centroid_y`, `centroid_x` (pixels); `area_px` (and `area_um2` when
/// the pixel size is known); `perimeter_px` (`perimeter_um`); `equivalent_diameter_px`
/// (`equivalent_diameter_um`); `eccentricity` (0 = disc); `mean_NAME` and
/// `integrated_NAME` for each image channel NAME; `class` (the model's class index, >= 1;
/// segmenting only); `dry_mass_pg` (a phase image with a known wavelength and pixel size:
/// m = λ / (2π α) · Σ φ · pixel area).
///
/// Thread safety: a table is immutable; it may be read from several threads at once.
/// `lumos_table_free` must not run concurrently with any other call on the same table.
pub struct LumosTable {
    table: Table,
    names: Vec<CString>,
}

impl LumosTable {
    fn new(table: Table) -> Box<Self> {
        let names = table.columns.iter().map(|c| CString::new(c.replace('\0', " ")).unwrap_or_default()).collect();
        Box::new(LumosTable { table, names })
    }
}

/// Fills `*out_options` with the defaults: pixel size and wavelength unknown (NaN), α =
/// 0.19 µm³/pg, phase channel -1 (automatic), min_size 10 pixels.
///
/// Errors: NULL_POINTER. Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_measure_options_default(out_options: *mut LumosMeasureOptions) -> LumosStatus {
    guard(|| {
        if out_options.is_null() {
            return Err(null("out_options"));
        }
        unsafe { *out_options = LumosMeasureOptions::default() };
        Ok(())
    })
}

fn labels_into(out: &mut [u32], labels: &Labels) {
    for (o, &l) in out.iter_mut().zip(labels.iter()) {
        *o = l;
    }
}

/// Segments one frame into instances: one label per cell, and optionally its
/// measurement table.
///
/// The model's class map of the whole frame (as `lumos_segment` computes it) is turned
/// into objects. Models trained from instance masks separate touching cells through their
/// predicted boundaries (seeded growth from the cell interiors); models trained on class
/// masks give the connected regions of each class. The objects are labelled over the whole
/// frame, so a cell that crosses a tile seam keeps one label. Each object's class is the
/// class most of its pixels were predicted as.
///
/// - `input`, `channels`, `height`, `width`, `options`, `cancel`: as for `lumos_segment`.
/// - `diffusion`: PG-DiffSeg sampling as for `lumos_segment_diffusion`; NULL = the model's
///   saved sampling. Ignored by other kinds.
/// - `measure_options`: NULL = defaults (`lumos_measure_options_default`); its `min_size`
///   applies to the objects. Measurements use the input's channels, named as the model's.
/// - `out_labels`: caller-owned buffer of `out_len >= height * width` uint32 values; gets
///   each pixel's object label (0 = background, objects 1..N in raster order of their
///   first pixel), `(H, W)` row-major. Unspecified on failure.
/// - `out_count`: NULL, or receives N, the number of objects.
/// - `out_table`: NULL (no table), or receives a new table owned by the caller; release
///   it with `lumos_table_free`. Untouched on failure.
///
/// Errors: as `lumos_segment`, and INVALID_ARGUMENT (bad measure options, such as a zero
/// pixel size, or a wavelength with no phase channel). Thread-safe: concurrent calls on one
/// model are serialized.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_segment_instances(
    model: *const LumosModel,
    input: *const f32,
    channels: usize,
    height: usize,
    width: usize,
    options: *const LumosTileOptions,
    diffusion: *const LumosDiffusionOptions,
    measure_options: *const LumosMeasureOptions,
    cancel: *const LumosCancelToken,
    out_labels: *mut u32,
    out_len: usize,
    out_count: *mut usize,
    out_table: *mut *mut LumosTable,
) -> LumosStatus {
    guard(|| {
        let m = unsafe { model_ref(model) }?;
        let x = unsafe { input_view(input, channels, height, width) }?;
        if out_labels.is_null() {
            return Err(null("out_labels"));
        }
        check_out_len(out_len, height * width, "out_labels")?;
        let mut opts = segment_options(options)?;
        // SAFETY: the caller passes NULL or a valid LumosDiffusionOptions.
        if let Some(d) = unsafe { diffusion.as_ref() } {
            opts.diffusion = Some(diffusion_options(d)?);
        }
        // SAFETY: the caller passes NULL or a valid LumosMeasureOptions.
        let mo = unsafe { measure_options.as_ref() }.copied().unwrap_or_default();
        let engine_mo = mo.to_engine()?;
        let mut mon = Monitor { progress: None, cancel: cancel_of(cancel) };
        let inst = m.model.segment_instances(x, &opts, &InstanceOptions { min_size: mo.min_size }, &mut mon)?;
        let table = if out_table.is_null() {
            None
        } else {
            let img = Image::with_names(x.to_owned(), m.model.meta.input_channels.clone())?;
            Some(measure(&inst.labels, Some(&img), Some(&inst.classes), &m.model.meta.classes, &engine_mo)?)
        };
        // SAFETY: checked non-NULL and at least height * width long.
        let out = unsafe { std::slice::from_raw_parts_mut(out_labels, height * width) };
        labels_into(out, &inst.labels);
        if !out_count.is_null() {
            unsafe { *out_count = inst.count() };
        }
        if let Some(t) = table {
            unsafe { *out_table = Box::into_raw(LumosTable::new(t)) };
        }
        Ok(())
    })
}

/// Measures the objects of a label image (for example one corrected by hand).
///
/// - `labels`: `height * width` uint32 values, `(H, W)` row-major; 0 = background, any
///   other value an object (labels need not be consecutive). Not modified.
/// - `image`: NULL (shape measurements only), or `channels * height * width` floats,
///   `(C, H, W)`, on which intensities and dry mass are measured; channels are named
///   `ch0`, `ch1`, ... in the table.
/// - `options`: NULL = defaults. Dry mass needs the wavelength, the pixel size and
///   `phase_channel` (or a single-channel image).
/// - `out_table`: receives a new table owned by the caller (`lumos_table_free`).
///   Untouched on failure.
///
/// Errors: NULL_POINTER, SHAPE_MISMATCH (zero or absurd sizes), INVALID_ARGUMENT (bad
/// options), INVALID_INPUT (NaN or Inf pixels). Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_measure(
    labels: *const u32,
    height: usize,
    width: usize,
    image: *const f32,
    channels: usize,
    options: *const LumosMeasureOptions,
    out_table: *mut *mut LumosTable,
) -> LumosStatus {
    guard(|| {
        if labels.is_null() {
            return Err(null("labels"));
        }
        if out_table.is_null() {
            return Err(null("out_table"));
        }
        let n = element_count(&[height, width], "labels")?;
        // SAFETY: the caller guarantees `labels` holds height * width values.
        let l = unsafe { std::slice::from_raw_parts(labels, n) };
        let l = ArrayView2::from_shape((height, width), l).expect("length checked").to_owned();
        let img = if image.is_null() {
            None
        } else {
            let x = unsafe { input_view(image, channels, height, width) }?;
            let img = Image::new(Array3::from(x.to_owned()));
            img.check_finite()?;
            Some(img)
        };
        // SAFETY: the caller passes NULL or a valid LumosMeasureOptions.
        let mo = unsafe { options.as_ref() }.copied().unwrap_or_default().to_engine()?;
        let t = measure(&l, img.as_ref(), None, &[], &mo)?;
        unsafe { *out_table = Box::into_raw(LumosTable::new(t)) };
        Ok(())
    })
}

/// # Safety
/// `p` must be NULL or point to a live `LumosTable`.
unsafe fn table_ref<'a>(p: *const LumosTable) -> Result<&'a LumosTable, Fail> {
    unsafe { p.as_ref() }.ok_or_else(|| null("table"))
}

/// The number of rows (objects) and columns of a table, in `*out_rows` and `*out_columns`
/// (either may be NULL).
///
/// Errors: NULL_POINTER (table). Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_table_shape(
    table: *const LumosTable,
    out_rows: *mut usize,
    out_columns: *mut usize,
) -> LumosStatus {
    guard(|| {
        let t = unsafe { table_ref(table) }?;
        if !out_rows.is_null() {
            unsafe { *out_rows = t.table.n_rows() };
        }
        if !out_columns.is_null() {
            unsafe { *out_columns = t.table.columns.len() };
        }
        Ok(())
    })
}

/// The name of column `index` (0-based) in `*out_name`: a NUL-terminated UTF-8 string
/// owned by the table, valid until `lumos_table_free`.
///
/// Errors: NULL_POINTER, INVALID_ARGUMENT (index out of range). Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_table_column_name(
    table: *const LumosTable,
    index: usize,
    out_name: *mut *const c_char,
) -> LumosStatus {
    guard(|| {
        let t = unsafe { table_ref(table) }?;
        if out_name.is_null() {
            return Err(null("out_name"));
        }
        let name = t.names.get(index).ok_or_else(|| {
            Fail(LumosStatus::InvalidArgument, format!("column {index}; the table has {} columns", t.names.len()))
        })?;
        unsafe { *out_name = name.as_ptr() };
        Ok(())
    })
}

/// The table's values in `*out_values`: `rows * columns` doubles, row-major (row r,
/// column c at `r * columns + c`), owned by the table and valid until `lumos_table_free`.
/// An empty table gives a non-NULL pointer to no values.
///
/// Errors: NULL_POINTER. Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_table_values(table: *const LumosTable, out_values: *mut *const f64) -> LumosStatus {
    guard(|| {
        let t = unsafe { table_ref(table) }?;
        if out_values.is_null() {
            return Err(null("out_values"));
        }
        unsafe { *out_values = t.table.values.as_ptr() };
        Ok(())
    })
}

/// Writes the table as CSV (a header row, then one row per object; with a `class` column
/// also `class_name`), atomically: a temporary file renamed into place.
///
/// Errors: NULL_POINTER, INVALID_ARGUMENT (path not UTF-8), IO. Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_table_write_csv(table: *const LumosTable, path: *const c_char) -> LumosStatus {
    guard(|| {
        let t = unsafe { table_ref(table) }?;
        let p = unsafe { arg_str(path, "path") }?;
        t.table.save_csv(Path::new(p))?;
        Ok(())
    })
}

/// Releases a table. NULL is ignored. The table and every pointer read from it become
/// invalid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_table_free(table: *mut LumosTable) {
    let _ = guard(|| {
        if !table.is_null() {
            // SAFETY: the table came from Box::into_raw in this module.
            drop(unsafe { Box::from_raw(table) });
        }
        Ok(())
    });
}

/// Writes an instance label image `(H, W)` (`height * width` uint32 values, row-major) as
/// a TIFF: uint16 when every label is at most 65,535, else uint32 (never truncated).
/// Atomic: a temporary file renamed into place.
///
/// Errors: NULL_POINTER, INVALID_ARGUMENT (path not UTF-8), SHAPE_MISMATCH (zero or absurd
/// size), IO. Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_labels_write_tiff(
    path: *const c_char,
    labels: *const u32,
    height: usize,
    width: usize,
) -> LumosStatus {
    guard(|| {
        let p = unsafe { arg_str(path, "path") }?;
        if labels.is_null() {
            return Err(null("labels"));
        }
        let n = element_count(&[height, width], "labels")?;
        // SAFETY: the caller guarantees `labels` holds height * width values.
        let s = unsafe { std::slice::from_raw_parts(labels, n) };
        let l = Labels::from_shape_vec((height, width), s.to_vec()).expect("length checked");
        crate::io::tiff::write_labels(Path::new(p), &l)?;
        Ok(())
    })
}
