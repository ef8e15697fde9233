//! Exported functions. Each body runs under `guard` (no panic crosses the boundary).

use std::ffi::{CString, c_char, c_void};
use std::path::Path;

use ndarray::{ArrayView3, ArrayViewMut2, ArrayViewMut3};

use super::{Fail, LumosStatus, arg_str, guard, last_error_ptr, null};
use crate::engine::device::{cuda_available, parse_device};
use crate::engine::model::{Model, ModelKind, Precision, SegmentOptions, SegmentOutput};
use crate::engine::progress::{CancelToken, Monitor, Progress};
use crate::engine::train::{TrainConfig, train};
use crate::musplit::DecomposeOptions;
use crate::pgdiff::{DiffusionOptions, StartNoise};

/// The ABI version: bumped only when an existing function, struct or enum changes
/// incompatibly. Compare with `LUMOS_ABI_VERSION` from the header you compiled against.
pub const LUMOS_ABI_VERSION: u32 = 1;

/// Opaque handle to a loaded model.
///
/// Thread safety: a model may be used from several threads at once (segment, info,
/// save); calls on one handle are serialized internally. `lumos_model_free` must not run
/// concurrently with any other call on the same handle.
pub struct LumosModel {
    pub(super) model: Model,
    kind_name: CString,
    channel_names: Vec<CString>,
    class_names: Vec<CString>,
    metadata_json: CString,
}

impl LumosModel {
    fn new(model: Model) -> Self {
        let c = |s: &str| CString::new(s.replace('\0', " ")).unwrap_or_default();
        LumosModel {
            kind_name: c(model.meta.kind.name()),
            channel_names: model.meta.input_channels.iter().map(|s| c(s)).collect(),
            class_names: model.meta.classes.iter().map(|s| c(s)).collect(),
            metadata_json: c(&serde_json::to_string_pretty(&model.meta).unwrap_or_default()),
            model,
        }
    }
}

/// Opaque cancellation flag. Thread safety: `lumos_cancel_token_cancel` may be called
/// from any thread while another thread runs an operation that watches the token.
pub struct LumosCancelToken {
    token: CancelToken,
}

/// Model kinds (stable numbers).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LumosModelKind {
    /// 2D nnU-Net segmentation of N-channel images.
    Unet = 1,
    /// DM-QPMNet dual-modality ssQPM segmentation (5 input channels: I0, I45, I90,
    /// I135, phase), or one of its baselines.
    Dmqpm = 2,
    /// muSplit decomposition (1 input channel, the superimposed image; 2 output
    /// channels, one per structure): LC U-Net or LC hierarchical VAE.
    Musplit = 3,
    /// PG-DiffSeg latent-diffusion segmentation of QPI (1 input channel, the phase in
    /// radians; classes background / live / dead). Segments by diffusion sampling: see
    /// `lumos_segment_diffusion`.
    Pgdiff = 4,
}

/// Facts about a loaded model, filled by `lumos_model_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LumosModelInfo {
    /// The model kind.
    pub kind: LumosModelKind,
    /// Input channels the model expects (C in the (C, H, W) input).
    pub n_input_channels: usize,
    /// Output classes (K), background included; for decomposition models the number of
    /// output channels (2).
    pub n_classes: usize,
    /// Training patch height in pixels (the default tile height).
    pub patch_height: usize,
    /// Training patch width in pixels (the default tile width).
    pub patch_width: usize,
    /// Whether `lumos_segment*` works with this model.
    pub can_segment: bool,
    /// Whether `lumos_decompose` works with this model.
    pub can_decompose: bool,
}

/// Tiling and test-time options of the segmentation calls (`lumos_segment`,
/// `lumos_segment_probabilities`, `lumos_segment_region`, `lumos_segment_diffusion`;
/// decomposition has `LumosDecomposeOptions`). Fill with `lumos_tile_options_default`
/// first, then change fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LumosTileOptions {
    /// Tile height in pixels; 0 = the model's training patch height. Must be a multiple of
    /// the network's downsampling factor, at most 16384, and the tile at most 8192 x 8192
    /// pixels in area (INVALID_ARGUMENT otherwise).
    pub tile_height: usize,
    /// Tile width in pixels; 0 = the model's training patch width (same limits).
    pub tile_width: usize,
    /// Step between tiles as a fraction of the tile, in (0, 1] and at least one pixel
    /// (>= 1 / the smaller tile side); 0.5 by default.
    pub step_fraction: f64,
    /// Tiles per forward pass (>= 1); 4 by default.
    pub batch_size: usize,
    /// Test-time mirroring (average of 4 flips; 4x slower). false by default.
    pub mirror: bool,
}

impl Default for LumosTileOptions {
    fn default() -> Self {
        let d = SegmentOptions::default();
        LumosTileOptions {
            tile_height: 0,
            tile_width: 0,
            step_fraction: d.step_fraction,
            batch_size: d.batch_size,
            mirror: d.mirror,
        }
    }
}

/// Options of `lumos_decompose`. Fill with `lumos_decompose_options_default` first,
/// then change fields.
///
/// The frame is cut into a grid of `keep x keep` cells; each cell is predicted from a
/// `tile x tile` input centred on it (with its lateral context) and only the central
/// `keep x keep` of the prediction is kept ("inner padding" when `tile` is the training
/// patch, the default). A `tile` several times the training patch with `keep` close to it
/// is the prevalent "outer padding" scheme.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LumosDecomposeOptions {
    /// Square tile edge in pixels; 0 = the model's training patch. A multiple of the
    /// network's downsampling factor.
    pub tile: usize,
    /// Kept centre of each tile in pixels; 0 = half the tile. Even, <= tile.
    pub keep: usize,
    /// Tiles per forward pass (>= 1); 16 by default.
    pub batch_size: usize,
    /// Average over 4 flips (4x slower). false by default.
    pub mirror: bool,
    /// Hierarchical-VAE models: posterior samples averaged per tile (MMSE estimate),
    /// >= 1; 1 by default. Ignored by deterministic models.
    pub samples: usize,
    /// Hierarchical-VAE models: seed of the posterior samples; the same seed gives the
    /// same output. 0 by default.
    pub seed: u64,
}

impl Default for LumosDecomposeOptions {
    fn default() -> Self {
        let d = DecomposeOptions::default();
        LumosDecomposeOptions {
            tile: 0,
            keep: 0,
            batch_size: d.batch_size,
            mirror: d.mirror,
            samples: d.samples,
            seed: d.seed,
        }
    }
}

fn decompose_options(opts: *const LumosDecomposeOptions) -> DecomposeOptions {
    // SAFETY: the caller passes NULL or a valid LumosDecomposeOptions.
    let o = unsafe { opts.as_ref() }.copied().unwrap_or_default();
    DecomposeOptions {
        tile: (o.tile > 0).then_some(o.tile),
        keep: (o.keep > 0).then_some(o.keep),
        batch_size: o.batch_size,
        mirror: o.mirror,
        samples: o.samples,
        seed: o.seed,
        posterior_mean: false,
    }
}

/// `LumosDiffusionOptions.start`: the starting noise is LDM-P's DDIM inversion of the
/// image latent (PG-DiffSeg).
pub const LUMOS_START_PRIOR: u32 = 0;
/// `LumosDiffusionOptions.start`: random Gaussian starting noise (the diffusion baseline;
/// `samples > 1` votes by majority).
pub const LUMOS_START_RANDOM: u32 = 1;
/// `LumosDiffusionOptions.start`: the image latent diffused forward to `forward_t`.
pub const LUMOS_START_FORWARD: u32 = 2;

/// Sampling options of PG-DiffSeg models (`lumos_segment_diffusion`). Fill with
/// `lumos_diffusion_options_default` or `lumos_model_diffusion_options` first, then
/// change fields. Network evaluations per tile: `inversion_steps` (prior start only)
/// plus `samples * sampling_steps`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LumosDiffusionOptions {
    /// `LUMOS_START_PRIOR` (0), `LUMOS_START_RANDOM` (1) or `LUMOS_START_FORWARD` (2).
    pub start: u32,
    /// DDIM inversion steps of LDM-P, 1..T-1 (T = 1000 diffusion steps); paper: 100.
    pub inversion_steps: usize,
    /// DDIM sampling steps of LDM-S, 1..T-1; paper: 200.
    pub sampling_steps: usize,
    /// DDIM eta in [0, 1]; 0 = deterministic sampling.
    pub eta: f64,
    /// Samples per tile, 1..=64, combined by majority voting.
    pub samples: usize,
    /// Timestep of the forward-diffusion start, 0..T-1 (0 = the latent itself).
    pub forward_t: usize,
    /// Seed of every random draw; the same seed, input and options give the same labels.
    pub seed: u64,
    /// Clip each step's predicted clean mask to [-1, 1] (true by default).
    pub clip_denoised: bool,
}

impl From<DiffusionOptions> for LumosDiffusionOptions {
    fn from(d: DiffusionOptions) -> Self {
        LumosDiffusionOptions {
            start: match d.start {
                StartNoise::Prior => LUMOS_START_PRIOR,
                StartNoise::Random => LUMOS_START_RANDOM,
                StartNoise::Forward => LUMOS_START_FORWARD,
            },
            inversion_steps: d.inversion_steps,
            sampling_steps: d.sampling_steps,
            eta: d.eta,
            samples: d.samples,
            forward_t: d.forward_t,
            seed: d.seed,
            clip_denoised: d.clip_denoised,
        }
    }
}

pub(super) fn diffusion_options(o: &LumosDiffusionOptions) -> Result<DiffusionOptions, Fail> {
    let start = match o.start {
        LUMOS_START_PRIOR => StartNoise::Prior,
        LUMOS_START_RANDOM => StartNoise::Random,
        LUMOS_START_FORWARD => StartNoise::Forward,
        other => {
            return Err(Fail(
                LumosStatus::InvalidArgument,
                format!(
                    "start = {other}; expected LUMOS_START_PRIOR (0), LUMOS_START_RANDOM (1) or LUMOS_START_FORWARD (2)"
                ),
            ));
        }
    };
    Ok(DiffusionOptions {
        start,
        inversion_steps: o.inversion_steps,
        sampling_steps: o.sampling_steps,
        eta: o.eta,
        samples: o.samples,
        forward_t: o.forward_t,
        seed: o.seed,
        clip_denoised: o.clip_denoised,
    })
}

/// What a long operation reports (see `LumosProgressCallback`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LumosProgress {
    /// 0 preparing, 1 training iteration done, 2 validation done, 3 checkpoint written,
    /// 4 inference tiles done, 5 finished.
    pub stage: u32,
    /// Current epoch (0-based).
    pub epoch: usize,
    /// Total epochs.
    pub epochs: usize,
    /// Current iteration within the epoch, or tiles done (0-based).
    pub iteration: usize,
    /// Iterations per epoch, or total tiles.
    pub iterations: usize,
    /// Training loss of this iteration (mean over the epoch for stage 2); NaN if none.
    pub loss: f64,
    /// Validation mean foreground Dice (stage 2); NaN otherwise.
    pub val_metric: f64,
}

impl From<&Progress> for LumosProgress {
    fn from(p: &Progress) -> Self {
        LumosProgress {
            stage: p.stage as u32,
            epoch: p.epoch,
            epochs: p.epochs,
            iteration: p.iteration,
            iterations: p.iterations,
            loss: p.loss,
            val_metric: p.val_metric,
        }
    }
}

/// Progress callback: called on the thread that runs the operation, with a pointer valid
/// only during the call, and the `user_data` given to the operation. It must not call
/// `lumos_model_free` on a model in use; to stop, cancel the token instead. It must
/// return normally: no C++ exception may propagate out of it and it must not `longjmp`
/// past the library's frames (catch everything inside; to stop, cancel the token).
pub type LumosProgressCallback = Option<unsafe extern "C" fn(progress: *const LumosProgress, user_data: *mut c_void)>;

/// Largest number of elements accepted in one input buffer (guards against overflowed
/// or garbage shapes).
const MAX_ELEMENTS: usize = 1 << 36;

pub(super) fn element_count(dims: &[usize], what: &str) -> Result<usize, Fail> {
    if dims.contains(&0) {
        return Err(Fail(
            LumosStatus::ShapeMismatch,
            format!("{what} shape {dims:?} has a zero dimension; every dimension must be >= 1"),
        ));
    }
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match n {
        Some(n) if n <= MAX_ELEMENTS => Ok(n),
        _ => Err(Fail(
            LumosStatus::ShapeMismatch,
            format!("{what} shape {dims:?} is too large (more than 2^36 elements)"),
        )),
    }
}

/// # Safety
/// `p` must be NULL or point to a live `LumosModel`.
pub(super) unsafe fn model_ref<'a>(p: *const LumosModel) -> Result<&'a LumosModel, Fail> {
    // SAFETY: per the caller's contract.
    unsafe { p.as_ref() }.ok_or_else(|| null("model"))
}

pub(super) fn segment_options(opts: *const LumosTileOptions) -> Result<SegmentOptions, Fail> {
    // SAFETY: the caller passes NULL or a valid LumosTileOptions.
    let o = unsafe { opts.as_ref() }.copied().unwrap_or_default();
    let tile = match (o.tile_height, o.tile_width) {
        (0, 0) => None,
        (0, _) | (_, 0) => {
            return Err(Fail(
                LumosStatus::InvalidArgument,
                "tile_height and tile_width must both be 0 (model default) or both > 0".into(),
            ));
        }
        (h, w) => Some([h, w]),
    };
    Ok(SegmentOptions {
        tile,
        step_fraction: o.step_fraction,
        batch_size: o.batch_size,
        mirror: o.mirror,
        diffusion: None,
    })
}

pub(super) fn cancel_of(c: *const LumosCancelToken) -> Option<CancelToken> {
    // SAFETY: the caller passes NULL or a live token.
    unsafe { c.as_ref() }.map(|t| t.token.clone())
}

// ---------------------------------------------------------------------------------------
// Library

/// The library version as a static NUL-terminated string ("MAJOR.MINOR.PATCH").
/// Never free it. Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn lumos_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The ABI version of the library (see `LUMOS_ABI_VERSION`). Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn lumos_abi_version() -> u32 {
    LUMOS_ABI_VERSION
}

/// The message of the last failed lumos call on the calling thread, or "" if the last
/// call that returns a `LumosStatus` succeeded (calls without a status, such as the
/// `*_free` functions, `lumos_version` or `lumos_cuda_available`, leave it unchanged).
/// The string is owned by the library and valid until the next lumos call on this thread;
/// copy it to keep it. Never NULL. Thread-safe (per-thread storage).
#[unsafe(no_mangle)]
pub extern "C" fn lumos_last_error_message() -> *const c_char {
    last_error_ptr()
}

/// A static name for a status code ("LUMOS_STATUS_OK", ...); "unknown" for numbers this
/// version does not define. Never free it. Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn lumos_status_name(status: u32) -> *const c_char {
    let s: &'static str = match status {
        0 => "LUMOS_STATUS_OK\0",
        1 => "LUMOS_STATUS_NULL_POINTER\0",
        2 => "LUMOS_STATUS_INVALID_ARGUMENT\0",
        3 => "LUMOS_STATUS_SHAPE_MISMATCH\0",
        4 => "LUMOS_STATUS_INVALID_INPUT\0",
        5 => "LUMOS_STATUS_IO\0",
        6 => "LUMOS_STATUS_TIFF\0",
        7 => "LUMOS_STATUS_MODEL_FORMAT\0",
        8 => "LUMOS_STATUS_UNSUPPORTED\0",
        9 => "LUMOS_STATUS_CANCELLED\0",
        10 => "LUMOS_STATUS_DEVICE\0",
        11 => "LUMOS_STATUS_INVALID_CONFIG\0",
        12 => "LUMOS_STATUS_TORCH\0",
        13 => "LUMOS_STATUS_BUFFER_TOO_SMALL\0",
        14 => "LUMOS_STATUS_INTERNAL\0",
        _ => "unknown\0",
    };
    s.as_ptr() as *const c_char
}

/// Whether a CUDA GPU is usable (libtorch_cuda loaded and a device visible). Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn lumos_cuda_available() -> bool {
    catch_bool(cuda_available)
}

fn catch_bool(f: impl FnOnce() -> bool) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(false)
}

/// Sets libtorch's intra-op CPU threads for threads that have not yet run any tensor
/// operation (call it first). `n_threads` in 1..=4096.
/// Errors: INVALID_ARGUMENT for 0 or more than 4096. The setting is process-wide (all
/// models and threads share libtorch's thread pool); calling it while other threads run
/// lumos operations is allowed but changes their thread count too.
#[unsafe(no_mangle)]
pub extern "C" fn lumos_set_num_threads(n_threads: u32) -> LumosStatus {
    guard(|| {
        if n_threads == 0 || n_threads > 4096 {
            return Err(Fail(LumosStatus::InvalidArgument, format!("n_threads = {n_threads}; expected 1..=4096")));
        }
        tch::set_num_threads(n_threads as i32);
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Models

/// Loads a model file.
///
/// - `path`: UTF-8 path of a lumos model file (or training checkpoint).
/// - `device`: "cpu", "cuda", "cuda:N" or "auto" (CUDA when available, else CPU); NULL = "auto".
/// - `out_model`: receives a new handle on success; free it with `lumos_model_free`.
///
/// Errors: NULL_POINTER, INVALID_ARGUMENT (non-UTF-8 path), IO (missing or unreadable
/// file), MODEL_FORMAT (not a lumos model, corrupt or truncated, newer format, or another
/// kind's weights), DEVICE. Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_model_load(
    path: *const c_char,
    device: *const c_char,
    out_model: *mut *mut LumosModel,
) -> LumosStatus {
    guard(|| {
        // SAFETY: per this function's contract.
        let path = unsafe { arg_str(path, "path") }?;
        let dev = if device.is_null() { "auto" } else { unsafe { arg_str(device, "device") }? };
        if out_model.is_null() {
            return Err(null("out_model"));
        }
        let model = Model::load(Path::new(path), parse_device(dev)?)?;
        let h = Box::into_raw(Box::new(LumosModel::new(model)));
        // SAFETY: out_model is non-null and writable per the contract.
        unsafe { *out_model = h };
        Ok(())
    })
}

/// Frees a model handle. NULL is ignored. Must not race with other calls on the handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_model_free(model: *mut LumosModel) {
    if !model.is_null() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: the handle came from Box::into_raw in this library.
            drop(unsafe { Box::from_raw(model) });
        }));
    }
}

/// Saves a model to `path` (UTF-8), atomically: a temporary file in the same folder is
/// renamed over `path` only when complete, so a failure never leaves a partial file.
///
/// Errors: NULL_POINTER, INVALID_ARGUMENT, IO (missing or read-only folder, full disk).
/// Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_model_save(model: *const LumosModel, path: *const c_char) -> LumosStatus {
    guard(|| {
        let m = unsafe { model_ref(model) }?;
        let path = unsafe { arg_str(path, "path") }?;
        m.model.save(Path::new(path))?;
        Ok(())
    })
}

/// Fills `out_info` with the model's kind, channel and class counts and patch size.
/// Errors: NULL_POINTER. Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_model_info(model: *const LumosModel, out_info: *mut LumosModelInfo) -> LumosStatus {
    guard(|| {
        let m = unsafe { model_ref(model) }?;
        if out_info.is_null() {
            return Err(null("out_info"));
        }
        let meta = &m.model.meta;
        let info = LumosModelInfo {
            kind: match meta.kind {
                ModelKind::Unet => LumosModelKind::Unet,
                ModelKind::Dmqpm => LumosModelKind::Dmqpm,
                ModelKind::Musplit => LumosModelKind::Musplit,
                ModelKind::Pgdiff => LumosModelKind::Pgdiff,
            },
            n_input_channels: meta.input_channels.len(),
            n_classes: meta.classes.len(),
            patch_height: meta.patch_size[0],
            patch_width: meta.patch_size[1],
            can_segment: meta.kind.can_segment(),
            can_decompose: meta.kind.can_decompose(),
        };
        unsafe { *out_info = info };
        Ok(())
    })
}

/// `lumos_model_set_precision`: float32 arithmetic (the default).
pub const LUMOS_PRECISION_FLOAT32: u32 = 0;
/// `lumos_model_set_precision`: bfloat16 autocast.
pub const LUMOS_PRECISION_BFLOAT16: u32 = 1;

/// Sets the arithmetic of the model's later inference calls (`lumos_segment*`,
/// `lumos_decompose`): `LUMOS_PRECISION_FLOAT32` (0, the default) or
/// `LUMOS_PRECISION_BFLOAT16` (1): bfloat16 autocast, where convolutions, matrix products
/// and attention run in bfloat16 and normalizations in float32; on a CUDA GPU with tensor
/// cores (Ampere or newer) the fast path. Outputs stay float32 / uint8; probabilities
/// change at the level of bfloat16 rounding (about 1e-2), labels only where classes were
/// nearly tied. On a CPU it is allowed but seldom faster. Training is unaffected.
///
/// Errors: NULL_POINTER, INVALID_ARGUMENT (another value). Thread-safe: calls that start
/// after it returns use the new precision.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_model_set_precision(model: *const LumosModel, precision: u32) -> LumosStatus {
    guard(|| {
        let m = unsafe { model_ref(model) }?;
        let p = i32::try_from(precision).ok().and_then(|c| Precision::from_code(c).ok()).ok_or_else(|| {
            Fail(
                LumosStatus::InvalidArgument,
                format!(
                    "precision = {precision}; expected LUMOS_PRECISION_FLOAT32 (0) or LUMOS_PRECISION_BFLOAT16 (1)"
                ),
            )
        })?;
        m.model.set_precision(p);
        Ok(())
    })
}

/// The model's inference precision (`LUMOS_PRECISION_*`) in `*out_precision`.
/// Errors: NULL_POINTER. Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_model_precision(model: *const LumosModel, out_precision: *mut u32) -> LumosStatus {
    guard(|| {
        let m = unsafe { model_ref(model) }?;
        if out_precision.is_null() {
            return Err(null("out_precision"));
        }
        unsafe { *out_precision = m.model.precision().code() as u32 };
        Ok(())
    })
}

/// The model kind's name ("unet", ...) in `*out_name`: a NUL-terminated UTF-8 string owned
/// by the model, valid until `lumos_model_free`. Errors: NULL_POINTER. Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_model_kind_name(model: *const LumosModel, out_name: *mut *const c_char) -> LumosStatus {
    guard(|| {
        let m = unsafe { model_ref(model) }?;
        if out_name.is_null() {
            return Err(null("out_name"));
        }
        unsafe { *out_name = m.kind_name.as_ptr() };
        Ok(())
    })
}

/// The name of input channel `index` (0-based, < n_input_channels) in `*out_name`, owned
/// by the model and valid until `lumos_model_free`.
/// Errors: NULL_POINTER, INVALID_ARGUMENT (index out of range). Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_model_channel_name(
    model: *const LumosModel,
    index: usize,
    out_name: *mut *const c_char,
) -> LumosStatus {
    guard(|| {
        let m = unsafe { model_ref(model) }?;
        if out_name.is_null() {
            return Err(null("out_name"));
        }
        let s = m.channel_names.get(index).ok_or_else(|| {
            Fail(
                LumosStatus::InvalidArgument,
                format!("channel index {index}; the model has {} input channels", m.channel_names.len()),
            )
        })?;
        unsafe { *out_name = s.as_ptr() };
        Ok(())
    })
}

/// The name of class `index` (0-based, < n_classes; 0 is background) in `*out_name`,
/// owned by the model and valid until `lumos_model_free`.
/// Errors: NULL_POINTER, INVALID_ARGUMENT (index out of range). Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_model_class_name(
    model: *const LumosModel,
    index: usize,
    out_name: *mut *const c_char,
) -> LumosStatus {
    guard(|| {
        let m = unsafe { model_ref(model) }?;
        if out_name.is_null() {
            return Err(null("out_name"));
        }
        let s = m.class_names.get(index).ok_or_else(|| {
            Fail(
                LumosStatus::InvalidArgument,
                format!("class index {index}; the model has {} classes", m.class_names.len()),
            )
        })?;
        unsafe { *out_name = s.as_ptr() };
        Ok(())
    })
}

/// The model's full metadata (architecture, normalization statistics, channels, classes,
/// training provenance) as a JSON document in `*out_json`, owned by the model and valid
/// until `lumos_model_free`. Errors: NULL_POINTER. Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_model_metadata_json(
    model: *const LumosModel,
    out_json: *mut *const c_char,
) -> LumosStatus {
    guard(|| {
        let m = unsafe { model_ref(model) }?;
        if out_json.is_null() {
            return Err(null("out_json"));
        }
        unsafe { *out_json = m.metadata_json.as_ptr() };
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Segment and decompose

/// Fills `out_options` with the defaults: model patch as tile, step 0.5, batch 4, no mirroring.
/// Errors: NULL_POINTER. Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_tile_options_default(out_options: *mut LumosTileOptions) -> LumosStatus {
    guard(|| {
        if out_options.is_null() {
            return Err(null("out_options"));
        }
        unsafe { *out_options = LumosTileOptions::default() };
        Ok(())
    })
}

/// Borrows the caller's input as a `(C, H, W)` view after checking pointer and shape.
pub(super) unsafe fn input_view<'a>(
    input: *const f32,
    c: usize,
    h: usize,
    w: usize,
) -> Result<ArrayView3<'a, f32>, Fail> {
    if input.is_null() {
        return Err(null("input"));
    }
    let n = element_count(&[c, h, w], "input")?;
    // SAFETY: the caller guarantees `input` holds c*h*w floats.
    let s = unsafe { std::slice::from_raw_parts(input, n) };
    Ok(ArrayView3::from_shape((c, h, w), s).expect("length checked"))
}

pub(super) fn check_out_len(len: usize, need: usize, what: &str) -> Result<(), Fail> {
    if len < need {
        return Err(Fail(LumosStatus::BufferTooSmall, format!("{what} holds {len} elements; {need} are needed")));
    }
    Ok(())
}

/// Segments one frame into class labels.
///
/// - `input`: `channels * height * width` floats, channel-major `(C, H, W)`, row-major
///   within a channel, in the units the model was trained on (for ssQPM: the four
///   polarized intensities in camera counts, then phase in radians). Not modified.
///   Frames of any size are processed tile by tile. Memory beyond the caller's buffers is
///   bounded: on the CPU by one row of tiles; on a CUDA device by about 1 GiB of device
///   memory or one row of tiles, whichever is larger, plus at most 16 MiB of page-locked
///   host memory per device, which the library keeps until the process ends.
/// - `options`: tiling and mirroring; NULL = defaults (`lumos_tile_options_default`).
/// - `cancel`: NULL or a token; cancelling stops at the next tile (CANCELLED).
/// - `out_labels`: caller-owned buffer of `out_len >= height * width` bytes; receives the
///   class index (0 = background) of each pixel, `(H, W)` row-major. On failure its
///   contents are unspecified.
///
/// Errors: NULL_POINTER, SHAPE_MISMATCH (channels differ from the model's, zero or absurd
/// sizes), INVALID_INPUT (NaN or Inf pixels), INVALID_ARGUMENT (bad options),
/// BUFFER_TOO_SMALL, UNSUPPORTED (model kind cannot segment), CANCELLED, TORCH.
/// Thread-safe: concurrent calls on one model are serialized.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_segment(
    model: *const LumosModel,
    input: *const f32,
    channels: usize,
    height: usize,
    width: usize,
    options: *const LumosTileOptions,
    cancel: *const LumosCancelToken,
    out_labels: *mut u8,
    out_len: usize,
) -> LumosStatus {
    guard(|| {
        let m = unsafe { model_ref(model) }?;
        let x = unsafe { input_view(input, channels, height, width) }?;
        if out_labels.is_null() {
            return Err(null("out_labels"));
        }
        check_out_len(out_len, height * width, "out_labels")?;
        let opts = segment_options(options)?;
        unsafe { segment_labels_into(m, x, &opts, cancel, out_labels, height, width) }
    })
}

/// Segments into the caller's label buffer (checked non-NULL and long enough).
unsafe fn segment_labels_into(
    m: &LumosModel,
    x: ArrayView3<f32>,
    opts: &SegmentOptions,
    cancel: *const LumosCancelToken,
    out_labels: *mut u8,
    height: usize,
    width: usize,
) -> Result<(), Fail> {
    // SAFETY: the caller checked that out_labels holds height * width bytes.
    let out = unsafe { std::slice::from_raw_parts_mut(out_labels, height * width) };
    let view = ArrayViewMut2::from_shape((height, width), out).expect("length checked");
    let mut mon = Monitor { progress: None, cancel: cancel_of(cancel) };
    m.model.segment(x, opts, SegmentOutput::Labels(view), &mut mon)?;
    Ok(())
}

/// Segments one frame into class probabilities (softmax, blended across tiles).
///
/// Same as `lumos_segment`, but `out_probabilities` is a caller-owned buffer of
/// `out_len >= n_classes * height * width` floats that receives `(K, H, W)` probabilities
/// in [0, 1], class-major.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_segment_probabilities(
    model: *const LumosModel,
    input: *const f32,
    channels: usize,
    height: usize,
    width: usize,
    options: *const LumosTileOptions,
    cancel: *const LumosCancelToken,
    out_probabilities: *mut f32,
    out_len: usize,
) -> LumosStatus {
    guard(|| {
        let m = unsafe { model_ref(model) }?;
        let x = unsafe { input_view(input, channels, height, width) }?;
        if out_probabilities.is_null() {
            return Err(null("out_probabilities"));
        }
        let k = m.model.n_classes();
        let need = element_count(&[k, height, width], "output")?;
        check_out_len(out_len, need, "out_probabilities")?;
        let opts = segment_options(options)?;
        let out = unsafe { std::slice::from_raw_parts_mut(out_probabilities, need) };
        let view = ArrayViewMut3::from_shape((k, height, width), out).expect("length checked");
        let mut mon = Monitor { progress: None, cancel: cancel_of(cancel) };
        m.model.segment(x, &opts, SegmentOutput::Probabilities(view), &mut mon)?;
        Ok(())
    })
}

/// Segments one region (a chunk) of a larger frame into class probabilities, normalized
/// with the whole frame's statistics: what a tiled or distributed caller (Dask, an
/// acquisition loop working on stripes) uses so that every chunk of a frame is treated
/// alike.
///
/// - `input`, `channels`, `height`, `width`, `options`, `cancel`: as `lumos_segment`;
///   `input` is the region, including whatever overlap (halo) the caller chose.
/// - `frame_mean`, `frame_std`: NULL, or each `channels` floats: the mean and population
///   standard deviation (ddof 0) of every channel over the whole frame, in the input's
///   units. They replace the region's own statistics for channels the model normalizes
///   per image (z-score per image, nnU-Net's default); channels with statistics fitted
///   at training ignore them. Both NULL = the region's own statistics (then this is
///   `lumos_segment_probabilities`, plus `diffusion`). One NULL and not the other is an
///   error. A std of 0 is treated as 1 (constant channel).
/// - `diffusion`: PG-DiffSeg sampling, NULL = the model's saved sampling; ignored by
///   other kinds.
/// - `out_probabilities`: caller-owned, `out_len >= n_classes * height * width` floats;
///   receives `(K, H, W)` probabilities, class-major. The labels `lumos_segment` would
///   give are their argmax over K (first maximum on ties).
///
/// Errors: as `lumos_segment_probabilities`, plus SHAPE_MISMATCH / INVALID_ARGUMENT
/// (statistics not finite, negative std, only one of the two given).
/// Thread-safe: concurrent calls on one model are serialized.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_segment_region(
    model: *const LumosModel,
    input: *const f32,
    channels: usize,
    height: usize,
    width: usize,
    frame_mean: *const f32,
    frame_std: *const f32,
    options: *const LumosTileOptions,
    diffusion: *const LumosDiffusionOptions,
    cancel: *const LumosCancelToken,
    out_probabilities: *mut f32,
    out_len: usize,
) -> LumosStatus {
    guard(|| {
        let m = unsafe { model_ref(model) }?;
        let x = unsafe { input_view(input, channels, height, width) }?;
        if out_probabilities.is_null() {
            return Err(null("out_probabilities"));
        }
        let k = m.model.n_classes();
        let need = element_count(&[k, height, width], "output")?;
        check_out_len(out_len, need, "out_probabilities")?;
        let stats: Option<Vec<(f32, f32)>> = match (frame_mean.is_null(), frame_std.is_null()) {
            (true, true) => None,
            (false, false) => {
                // SAFETY: the caller passes `channels` floats in each.
                let (mu, sd) = unsafe {
                    (std::slice::from_raw_parts(frame_mean, channels), std::slice::from_raw_parts(frame_std, channels))
                };
                Some(mu.iter().copied().zip(sd.iter().copied()).collect())
            }
            (true, false) | (false, true) => {
                return Err(Fail(
                    LumosStatus::InvalidArgument,
                    "frame_mean and frame_std: one is NULL and the other is not; pass both (the whole frame's statistics) or neither".into(),
                ));
            }
        };
        let mut opts = segment_options(options)?;
        if m.model.meta.kind == ModelKind::Pgdiff {
            // SAFETY: the caller passes NULL or a valid LumosDiffusionOptions.
            opts.diffusion = Some(match unsafe { diffusion.as_ref() } {
                Some(d) => diffusion_options(d)?,
                None => m.model.diffusion_defaults()?,
            });
        }
        let out = unsafe { std::slice::from_raw_parts_mut(out_probabilities, need) };
        let view = ArrayViewMut3::from_shape((k, height, width), out).expect("length checked");
        let mut mon = Monitor { progress: None, cancel: cancel_of(cancel) };
        m.model.segment_region(x, stats.as_deref(), &opts, SegmentOutput::Probabilities(view), &mut mon)?;
        Ok(())
    })
}

/// Fills `out_options` with the paper's sampling: prior start, 100 inversion steps, 200
/// sampling steps, eta 0, 1 sample, forward_t 300, seed 0, clipping on.
/// Errors: NULL_POINTER. Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_diffusion_options_default(out_options: *mut LumosDiffusionOptions) -> LumosStatus {
    guard(|| {
        if out_options.is_null() {
            return Err(null("out_options"));
        }
        unsafe { *out_options = DiffusionOptions::default().into() };
        Ok(())
    })
}

/// Fills `out_options` with the sampling a PG-DiffSeg model was saved with (what
/// `lumos_segment` uses for it).
/// Errors: NULL_POINTER, UNSUPPORTED (not a PG-DiffSeg model). Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_model_diffusion_options(
    model: *const LumosModel,
    out_options: *mut LumosDiffusionOptions,
) -> LumosStatus {
    guard(|| {
        let m = unsafe { model_ref(model) }?;
        if out_options.is_null() {
            return Err(null("out_options"));
        }
        let d = m.model.diffusion_defaults()?;
        unsafe { *out_options = d.into() };
        Ok(())
    })
}

/// Segments one phase frame with a PG-DiffSeg model, with explicit sampling options.
///
/// Same contract as `lumos_segment` (input `(C, H, W)` floats in the training units, for
/// QPI the phase in radians; `out_labels` caller-owned, `out_len >= height * width`
/// bytes, class indices row-major), plus `diffusion`: NULL = the model's saved sampling
/// (`lumos_model_diffusion_options`). Each tile is encoded, its starting noise made
/// (prior / random / forward), the mask sampled by DDIM, resized to the tile and blended
/// across tiles; cancelling stops between diffusion steps (CANCELLED). Cost grows with
/// `inversion_steps + samples * sampling_steps` network evaluations per tile.
///
/// Errors: as `lumos_segment`, plus INVALID_ARGUMENT (steps out of range, eta outside
/// [0, 1], samples outside 1..=64, unknown start) and UNSUPPORTED (not a PG-DiffSeg
/// model). Thread-safe: concurrent calls on one model are serialized. Deterministic for
/// a given seed, input and options.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_segment_diffusion(
    model: *const LumosModel,
    input: *const f32,
    channels: usize,
    height: usize,
    width: usize,
    options: *const LumosTileOptions,
    diffusion: *const LumosDiffusionOptions,
    cancel: *const LumosCancelToken,
    out_labels: *mut u8,
    out_len: usize,
) -> LumosStatus {
    guard(|| {
        let m = unsafe { model_ref(model) }?;
        let x = unsafe { input_view(input, channels, height, width) }?;
        if out_labels.is_null() {
            return Err(null("out_labels"));
        }
        check_out_len(out_len, height * width, "out_labels")?;
        let mut opts = segment_options(options)?;
        let defaults = m.model.diffusion_defaults()?;
        // SAFETY: the caller passes NULL or a valid LumosDiffusionOptions.
        opts.diffusion = Some(match unsafe { diffusion.as_ref() } {
            Some(d) => diffusion_options(d)?,
            None => defaults,
        });
        unsafe { segment_labels_into(m, x, &opts, cancel, out_labels, height, width) }
    })
}

/// Fills `out_options` with the defaults: inner padding with the training patch as tile
/// and half of it kept, 16 tiles per pass, no mirroring, 1 sample, seed 0.
/// Errors: NULL_POINTER. Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_decompose_options_default(out_options: *mut LumosDecomposeOptions) -> LumosStatus {
    guard(|| {
        if out_options.is_null() {
            return Err(null("out_options"));
        }
        unsafe { *out_options = LumosDecomposeOptions::default() };
        Ok(())
    })
}

/// Decomposes a single-channel `(H, W)` frame of two superimposed structures into two
/// channels (muSplit models).
///
/// - `input`: `height * width` floats, row-major, in the units the model was trained on
///   (for the simulator: photo-electrons). Not modified. Frames of any size are processed
///   tile by tile; memory beyond the caller's buffers is bounded by one batch of tiles and
///   its lateral context, independent of the frame size.
/// - `options`: tiling, mirroring and sampling; NULL = defaults
///   (`lumos_decompose_options_default`).
/// - `cancel`: NULL or a token; cancelling stops at the next batch of tiles (CANCELLED).
/// - `out`: caller-owned buffer of `out_len >= 2 * height * width` floats; receives the
///   structures as `(2, H, W)`, channel-major, in the targets' units. On failure its
///   contents are unspecified.
///
/// Errors: NULL_POINTER, SHAPE_MISMATCH (zero or absurd sizes), INVALID_INPUT (NaN or Inf
/// pixels), INVALID_ARGUMENT (bad options), BUFFER_TOO_SMALL, UNSUPPORTED (the model
/// does not decompose: all segmentation models), CANCELLED, TORCH.
/// Thread-safe: concurrent calls on one model are serialized. Deterministic for a given
/// `seed` (stochastic models hold a process-wide lock on libtorch's generator meanwhile).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_decompose(
    model: *const LumosModel,
    input: *const f32,
    height: usize,
    width: usize,
    options: *const LumosDecomposeOptions,
    cancel: *const LumosCancelToken,
    out: *mut f32,
    out_len: usize,
) -> LumosStatus {
    guard(|| {
        let m = unsafe { model_ref(model) }?;
        let x = unsafe { input_view(input, 1, height, width) }?;
        if out.is_null() {
            return Err(null("out"));
        }
        m.model.check_decompose()?;
        let k = m.model.n_classes();
        let need = element_count(&[k, height, width], "output")?;
        check_out_len(out_len, need, "out")?;
        let opts = decompose_options(options);
        let o = unsafe { std::slice::from_raw_parts_mut(out, need) };
        let view = ArrayViewMut3::from_shape((k, height, width), o).expect("length checked");
        let mut mon = Monitor { progress: None, cancel: cancel_of(cancel) };
        m.model.decompose(x.index_axis(ndarray::Axis(0), 0), &opts, view, &mut mon)?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Cancellation

/// Creates a cancel token in `*out_token`; free it with `lumos_cancel_token_free`.
/// Errors: NULL_POINTER. Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_cancel_token_new(out_token: *mut *mut LumosCancelToken) -> LumosStatus {
    guard(|| {
        if out_token.is_null() {
            return Err(null("out_token"));
        }
        unsafe { *out_token = Box::into_raw(Box::new(LumosCancelToken { token: CancelToken::new() })) };
        Ok(())
    })
}

/// Requests cancellation: operations watching the token stop at their next check
/// (next training iteration or tile) and return CANCELLED. Callable from any thread.
/// Errors: NULL_POINTER.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_cancel_token_cancel(token: *const LumosCancelToken) -> LumosStatus {
    guard(|| {
        let t = unsafe { token.as_ref() }.ok_or_else(|| null("token"))?;
        t.token.cancel();
        Ok(())
    })
}

/// Clears a cancellation so the token can be reused. Errors: NULL_POINTER. Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_cancel_token_reset(token: *const LumosCancelToken) -> LumosStatus {
    guard(|| {
        let t = unsafe { token.as_ref() }.ok_or_else(|| null("token"))?;
        t.token.reset();
        Ok(())
    })
}

/// Frees a cancel token. NULL is ignored. No operation may still be using it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_cancel_token_free(token: *mut LumosCancelToken) {
    if !token.is_null() {
        // SAFETY: the token came from Box::into_raw in this library.
        drop(unsafe { Box::from_raw(token) });
    }
}

// ---------------------------------------------------------------------------------------
// Training

thread_local! {
    static RECIPE_JSON: std::cell::RefCell<std::ffi::CString> = std::cell::RefCell::new(std::ffi::CString::default());
}

thread_local! {
    static EXPORT_JSON: std::cell::RefCell<std::ffi::CString> = std::cell::RefCell::new(std::ffi::CString::default());
}

/// Exports a model file to the bioimage.io model format (rdf.yaml format_version 0.5,
/// TorchScript weights traced from the engine, test tensors with sha256, cover, README),
/// so that bioimageio.core, deepImageJ and other consumers run it.
/// - `model_path`: UTF-8 path of a lumos model file.
/// - `out_path`: UTF-8 path of the package: a folder, or a `.zip` file when it ends in
///   `.zip`. Written atomically (staged, then renamed); an existing folder is replaced
///   only if it is an earlier export (holds `rdf.yaml`) or empty.
/// - `options_json`: NULL / "" or a JSON object, all fields optional: `name`,
///   `description`, `authors` / `maintainers` (lists of `{"name", "affiliation", "email",
///   "orcid", "github_user"}`; maintainers need `github_user`), `license` (SPDX, default
///   "CC-BY-4.0"), `tags`, `git_repo`, `version`, `tile` (`[height, width]` of the
///   exported input, segmentation models; default the training patch), `sample` (path of a
///   `(C, H, W)` TIFF to cut the test tile from; default simulated data of the model's
///   modality), `sample_seed`. Unknown fields are rejected.
/// - `out_report_json`: NULL, or receives a NUL-terminated UTF-8 JSON report (`path`,
///   `input_shape`, `output_shape`, `self_check` = largest difference between the exported
///   graph and the engine on the test tile, `files` with sha256) owned by the library,
///   valid until the next `lumos_export_bioimageio` call on the same thread.
///
/// Fixed spatial size: the graph is traced on one tile. Per-image z-score is declared as
/// rdf preprocessing; fitted normalization is inside the graph. PG-DiffSeg exports only
/// deterministic sampling (prior start, eta 0); muSplit takes one lateral-context window.
/// The export reloads the written TorchScript and compares it with the engine's own
/// output; it fails (writing nothing) when they differ by more than 1e-3.
/// Errors: NULL_POINTER, INVALID_ARGUMENT (bad options, name not allowed by bioimage.io,
/// existing non-export folder), IO, MODEL_FORMAT, UNSUPPORTED (random PG-DiffSeg
/// sampling, mixed per-image and fitted normalization), SHAPE_MISMATCH (sample too small
/// or with other channels), INVALID_INPUT (self-check failed), TORCH. CPU only; may take
/// minutes for large diffusion models. Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_export_bioimageio(
    model_path: *const c_char,
    out_path: *const c_char,
    options_json: *const c_char,
    out_report_json: *mut *const c_char,
) -> LumosStatus {
    guard(|| {
        let mp = unsafe { arg_str(model_path, "model_path") }?;
        let op = unsafe { arg_str(out_path, "out_path") }?;
        let opts: crate::export::ExportOptions = if options_json.is_null() {
            Default::default()
        } else {
            let j = unsafe { arg_str(options_json, "options_json") }?;
            if j.trim().is_empty() {
                Default::default()
            } else {
                serde_json::from_str(j).map_err(|e| Fail(LumosStatus::InvalidArgument, format!("options_json: {e}")))?
            }
        };
        let report = crate::export::export_bioimageio(std::path::Path::new(mp), std::path::Path::new(op), &opts)?;
        if !out_report_json.is_null() {
            let json = serde_json::to_string(&report).expect("a report serializes");
            let c = std::ffi::CString::new(json).expect("JSON has no NUL");
            EXPORT_JSON.with(|r| {
                *r.borrow_mut() = c;
                // SAFETY: out_report_json checked non-NULL; the string lives in this thread's slot.
                unsafe { *out_report_json = r.borrow().as_ptr() };
            });
        }
        Ok(())
    })
}

/// The training configuration (JSON for `lumos_train`) of a named recipe: a method of the
/// papers at a size. Hosts start from it and change what the user chose (epochs, device,
/// seed...), so a model trained from a plugin follows the recipe the results were
/// measured with.
///
/// - `method`: "dm-qpmnet", "early-fusion", "angles-only", "phase-only" (ssQPM data:
///   five channels I0, I45, I90, I135, phase), "nnunet" (any channels), "pg-diffseg"
///   (one phase channel, live / dead / background masks), "musplit-unet" or
///   "musplit-hvae" (two-structure decomposition; `DIR/targets`).
/// - `size`: "tiny" (seconds; for trying things out), "cpu" (the docs/results CPU
///   recipes) or "paper" (the papers' sizes; a GPU job).
/// - `out_json`: receives a NUL-terminated UTF-8 string owned by the library, valid until
///   the next `lumos_train_recipe` call on the same thread. Untouched on failure.
///
/// Errors: NULL_POINTER, INVALID_ARGUMENT (unknown method or size, text not UTF-8).
/// Thread-safe (each thread has its own string).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_train_recipe(
    method: *const c_char,
    size: *const c_char,
    out_json: *mut *const c_char,
) -> LumosStatus {
    guard(|| {
        let m = unsafe { arg_str(method, "method") }?;
        let z = unsafe { arg_str(size, "size") }?;
        if out_json.is_null() {
            return Err(null("out_json"));
        }
        let cfg = crate::recipes::recipe(m, z)?;
        let json = serde_json::to_string_pretty(&cfg).expect("a TrainConfig serializes");
        let c = std::ffi::CString::new(json).expect("JSON has no NUL");
        RECIPE_JSON.with(|r| {
            *r.borrow_mut() = c;
            // SAFETY: out_json checked non-NULL; the string lives in this thread's slot.
            unsafe { *out_json = r.borrow().as_ptr() };
        });
        Ok(())
    })
}

/// Trains a model and writes it to `output_path`.
///
/// - `config_json`: UTF-8 JSON training configuration (see README "Training config");
///   NULL or "" = all defaults. Unknown fields are rejected. The config and seed are
///   written to `OUTPUT.train.json` before training starts.
/// - `data_dir`: folder with `images/NAME.tif` and `masks/NAME.tif` (or `train/images`).
/// - `output_path`: where the model file is written (atomically) at the end. A checkpoint
///   `OUTPUT.ckpt` is written atomically after every epoch; with `"resume": true` a later
///   call continues from it.
/// - `progress`, `user_data`: optional callback, called on this thread.
/// - `cancel`: NULL or a token another thread may cancel; training then stops at the
///   next iteration, returns CANCELLED and keeps the last checkpoint.
/// - `out_model`: NULL, or receives the trained model (free with `lumos_model_free`).
///
/// Blocks until done. Errors: NULL_POINTER, INVALID_ARGUMENT, INVALID_CONFIG, IO, TIFF,
/// SHAPE_MISMATCH, INVALID_INPUT, DEVICE, CANCELLED, TORCH. Thread-safe (separate
/// trainings may run in separate threads; they share libtorch's process-wide thread pool,
/// and a config with `threads` > 0 sets that pool's size for the whole process, as
/// `lumos_set_num_threads` does).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_train(
    config_json: *const c_char,
    data_dir: *const c_char,
    output_path: *const c_char,
    progress: LumosProgressCallback,
    user_data: *mut c_void,
    cancel: *const LumosCancelToken,
    out_model: *mut *mut LumosModel,
) -> LumosStatus {
    guard(|| {
        let cfg_s = if config_json.is_null() { "" } else { unsafe { arg_str(config_json, "config_json") }? };
        let cfg = if cfg_s.trim().is_empty() { TrainConfig::default() } else { TrainConfig::from_json(cfg_s)? };
        let data = unsafe { arg_str(data_dir, "data_dir") }?;
        let out = unsafe { arg_str(output_path, "output_path") }?;
        let mut cb = |p: &Progress| {
            if let Some(f) = progress {
                let lp = LumosProgress::from(p);
                // SAFETY: the caller supplied a valid callback and user_data.
                unsafe { f(&lp, user_data) };
            }
        };
        let mut mon = Monitor { progress: Some(&mut cb), cancel: cancel_of(cancel) };
        let outcome = train(&cfg, Path::new(data), Path::new(out), &mut mon)?;
        if !out_model.is_null() {
            unsafe { *out_model = Box::into_raw(Box::new(LumosModel::new(outcome.model))) };
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// TIFF files (for C/C++ hosts without their own TIFF reader)

/// A `(C, H, W)` float32 image allocated by the library (`lumos_image_read_tiff`,
/// `lumos_simulate`).
#[repr(C)]
#[derive(Debug)]
pub struct LumosImage {
    /// `channels * height * width` floats, channel-major, row-major within a channel.
    /// Owned by the library: release with `lumos_image_free`.
    pub data: *mut f32,
    /// Number of channels C (TIFF pages or ImageJ channels; >= 1).
    pub channels: usize,
    /// Image height H in pixels (rows).
    pub height: usize,
    /// Image width W in pixels (columns).
    pub width: usize,
}

/// Reads a TIFF file into a float32 `(C, H, W)` image: 8/16/32-bit integer or 32-bit
/// float samples, single- or multi-page (each page a channel), ImageJ hyperstacks
/// (channels in ImageJ order), uncompressed / LZW / Deflate / PackBits, stripped or tiled.
/// Values are the stored sample values converted to float (no rescaling).
///
/// - `path`: UTF-8 file path.
/// - `out_image`: receives the image on success; its `data` is owned by the library and
///   must be released with `lumos_image_free`. Untouched on failure.
///
/// Errors: NULL_POINTER, INVALID_ARGUMENT (path not UTF-8), IO (missing or unreadable
/// file), TIFF (malformed or unsupported file). Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_image_read_tiff(path: *const c_char, out_image: *mut LumosImage) -> LumosStatus {
    guard(|| {
        let p = unsafe { arg_str(path, "path") }?;
        if out_image.is_null() {
            return Err(null("out_image"));
        }
        let img = crate::io::tiff::read_image(Path::new(p))?;
        unsafe { *out_image = image_into_c(img) };
        Ok(())
    })
}

/// Releases the pixels of an image from `lumos_image_read_tiff` or `lumos_simulate` and
/// zeroes the struct.
/// NULL, or an image whose `data` is NULL, is ignored. Calling it twice on the same struct
/// is safe (the second call sees NULL data). Not thread-safe for the same struct.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_image_free(image: *mut LumosImage) {
    let _ = guard(|| {
        if image.is_null() {
            return Ok(());
        }
        // SAFETY: the caller passes a struct filled by lumos_image_read_tiff (or zeroed).
        let im = unsafe { &mut *image };
        if !im.data.is_null() {
            let n = im.channels * im.height * im.width;
            // SAFETY: data came from Box<[f32]> of exactly n elements.
            drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(im.data, n)) });
        }
        *im = LumosImage { data: std::ptr::null_mut(), channels: 0, height: 0, width: 0 };
        Ok(())
    });
}

fn image_into_c(img: crate::image::Image) -> LumosImage {
    let (c, h, w) = img.data.dim();
    let v: Vec<f32> = img.data.iter().copied().collect(); // standard (C, H, W) order
    LumosImage { data: Box::into_raw(v.into_boxed_slice()) as *mut f32, channels: c, height: h, width: w }
}

/// Simulates one labelled frame with the engine's physically grounded simulators (sample
/// data for plugins, test input for acquisition software).
///
/// - `modality`: "ssqpm" (single-shot QPM: `image` is `(5, H, W)`, the intensities I0,
///   I45, I90, I135 in camera ADU then the phase in radians; `truth` is `(1, H, W)`, 0
///   background / 1 cell), "qpi" (live/dead QPI: `image` `(1, H, W)` phase in radians;
///   `truth` `(1, H, W)`, 0 background / 1 live / 2 dead) or "fluo" (two superimposed
///   fluorescent structures: `image` `(1, H, W)` in photo-electrons; `truth` `(2, H, W)`,
///   the two structures in photons).
/// - `config_json`: the simulator's settings as a JSON object, as for `lumos simulate
///   --config` (for example `{"size": 512}`; the edge length is `size` pixels); NULL or ""
///   for the defaults (256 px for ssqpm and qpi, 512 px for fluo). Unknown fields are an error.
/// - `seed`: the same seed gives the same frame.
/// - `out_image`, `out_truth`: receive library-owned images; release each with
///   `lumos_image_free`. Both untouched on failure.
///
/// Errors: NULL_POINTER, INVALID_ARGUMENT (unknown modality, text not UTF-8),
/// INVALID_CONFIG (bad JSON or out-of-range settings). Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_simulate(
    modality: *const c_char,
    config_json: *const c_char,
    seed: u64,
    out_image: *mut LumosImage,
    out_truth: *mut LumosImage,
) -> LumosStatus {
    guard(|| {
        let m = unsafe { arg_str(modality, "modality") }?;
        let cfg = if config_json.is_null() { "" } else { unsafe { arg_str(config_json, "config_json") }? };
        if out_image.is_null() {
            return Err(null("out_image"));
        }
        if out_truth.is_null() {
            return Err(null("out_truth"));
        }
        let frame = crate::sim::simulate_frame(m, cfg, seed)?;
        unsafe {
            *out_image = image_into_c(frame.image);
            *out_truth = image_into_c(frame.truth);
        }
        Ok(())
    })
}

/// Writes a float32 `(C, H, W)` image (`channels * height * width` floats, channel-major)
/// as a TIFF, one page per channel, with ImageJ metadata (a `C > 1` image opens in Fiji as
/// a C-channel hyperstack), atomically (temporary file renamed into place). Training data
/// for `lumos_train` can be written with it.
///
/// - `channel_names`: NULL (names "ch0", "ch1", ...) or `channels` UTF-8 strings, stored
///   as the ImageJ slice labels. Models remember the channel names they were trained on,
///   and ssQPM names ("I0", "I45", "I90", "I135", "phase") select the ssQPM normalization.
///
/// Errors: NULL_POINTER, INVALID_ARGUMENT (path or a name not UTF-8), SHAPE_MISMATCH (a
/// zero or absurd size), IO (missing folder, read-only folder, full disk). Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_image_write_tiff(
    path: *const c_char,
    data: *const f32,
    channels: usize,
    height: usize,
    width: usize,
    channel_names: *const *const c_char,
) -> LumosStatus {
    guard(|| {
        let p = unsafe { arg_str(path, "path") }?;
        if data.is_null() {
            return Err(null("data"));
        }
        let n = element_count(&[channels, height, width], "image")?;
        // SAFETY: the caller guarantees `data` holds channels*height*width floats.
        let s = unsafe { std::slice::from_raw_parts(data, n) };
        let arr = ndarray::Array3::from_shape_vec((channels, height, width), s.to_vec()).expect("length checked");
        let mut img = crate::image::Image::new(arr);
        if !channel_names.is_null() {
            // SAFETY: the caller guarantees `channels` string pointers.
            let names = unsafe { std::slice::from_raw_parts(channel_names, channels) };
            img.channel_names = names
                .iter()
                .enumerate()
                .map(|(i, &q)| unsafe { arg_str(q, &format!("channel_names[{i}]")) }.map(str::to_string))
                .collect::<Result<_, _>>()?;
        }
        crate::io::tiff::write_image_f32(Path::new(p), &img)?;
        Ok(())
    })
}

/// Writes a label image `(H, W)` (`height * width` bytes, row-major) as an 8-bit TIFF
/// with ImageJ metadata, atomically (a temporary file renamed into place: a failed write
/// leaves no partial file).
///
/// Errors: NULL_POINTER, INVALID_ARGUMENT (path not UTF-8), SHAPE_MISMATCH (a zero or
/// absurd size), IO (missing folder, read-only folder, full disk). Thread-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lumos_mask_write_tiff(
    path: *const c_char,
    labels: *const u8,
    height: usize,
    width: usize,
) -> LumosStatus {
    guard(|| {
        let p = unsafe { arg_str(path, "path") }?;
        if labels.is_null() {
            return Err(null("labels"));
        }
        let n = element_count(&[height, width], "labels")?;
        // SAFETY: the caller guarantees `labels` holds height*width bytes.
        let s = unsafe { std::slice::from_raw_parts(labels, n) };
        let m = crate::image::Mask::from_shape_vec((height, width), s.to_vec()).expect("length checked");
        crate::io::tiff::write_mask_u8(Path::new(p), &m)?;
        Ok(())
    })
}
