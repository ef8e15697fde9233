//! Models: one self-describing file per model, and the runtime that segments with it.
//!
//! A model file is a safetensors file: the weights as float32 tensors (names as in a
//! PyTorch state_dict) plus one metadata entry, `lumos`, holding a JSON document with the
//! format name and version, the model kind, the architecture config, the normalization
//! statistics, the channel and class names, the patch size and the training provenance.
//! A training checkpoint is a model file with extra `optimizer.*` tensors and a
//! `lumos.checkpoint` metadata entry, so the last checkpoint is also a usable model.

use std::collections::HashMap;
use std::path::Path;

use ndarray::{ArrayView3, ArrayViewMut2, ArrayViewMut3};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

pub use crate::backend::precision::Precision;
use crate::backend::precision::{to_float, with_precision};
use crate::engine::normalize::{DeviceAffine, Normalizer};
use crate::engine::progress::Monitor;
use crate::engine::tiling::{SlidingWindow, mirrored, sliding_window};
use crate::engine::weights;
use crate::error::{Error, Result};
use crate::image::check_finite;
use crate::pgdiff::DiffusionOptions;

pub const FORMAT: &str = "lumos-model";
/// Bumped when a file written by this version cannot be read by older versions.
pub const FORMAT_VERSION: u32 = 1;
pub const METADATA_KEY: &str = "lumos";

/// libtorch's random generator is process-wide: whoever seeds it and then draws from it
/// (seeded model construction, stochastic decomposition) holds this lock meanwhile.
pub(crate) static TORCH_RNG: Mutex<()> = Mutex::new(());

/// The model kinds this engine knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// 2D nnU-Net segmentation of N-channel images (early fusion for ssQPM).
    Unet,
    /// DM-QPMNet: dual-encoder ssQPM segmentation (4 polarized intensities + phase),
    /// or one of its baselines (see `nn::dmqpm`).
    Dmqpm,
    /// muSplit: decomposition of one fluorescence image into two structures (LC U-Net
    /// or LC hierarchical VAE, see `nn::musplit`).
    Musplit,
    /// PG-DiffSeg: prior-guided latent-diffusion segmentation of QPI (autoencoder,
    /// LDM-P and LDM-S, see `diffseg`).
    Pgdiff,
}

impl ModelKind {
    pub fn name(&self) -> &'static str {
        match self {
            ModelKind::Unet => "unet",
            ModelKind::Dmqpm => "dmqpm",
            ModelKind::Musplit => "musplit",
            ModelKind::Pgdiff => "pgdiff",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "unet" | "nnunet" => Ok(ModelKind::Unet),
            "dmqpm" | "dm-qpmnet" | "dm_qpmnet" | "dmqpmnet" => Ok(ModelKind::Dmqpm),
            "musplit" | "usplit" | "mu_split" | "microsplit" => Ok(ModelKind::Musplit),
            "pgdiff" | "pg-diffseg" | "pgdiffseg" | "pg_diffseg" | "diffseg" => Ok(ModelKind::Pgdiff),
            other => Err(Error::Config(format!(
                "unknown model kind '{other}'; expected one of: unet, dmqpm, musplit, pgdiff"
            ))),
        }
    }
    pub fn can_segment(&self) -> bool {
        !matches!(self, ModelKind::Musplit)
    }
    pub fn can_decompose(&self) -> bool {
        matches!(self, ModelKind::Musplit)
    }
}

/// Where a model came from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Provenance {
    pub lumos_version: String,
    /// Seconds since the Unix epoch when training started.
    pub created_unix: u64,
    pub seed: u64,
    /// The training configuration as run (JSON).
    pub train_config: serde_json::Value,
    pub data: String,
    pub train_images: Vec<String>,
    pub val_images: Vec<String>,
    pub epochs_completed: usize,
    /// Mean foreground Dice on the validation images after the last epoch.
    pub val_dice: Option<f64>,
    pub device: String,
    pub wall_seconds: f64,
    pub history: Vec<EpochRecord>,
}

/// One epoch of training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub learning_rate: f64,
    pub train_loss: f64,
    /// Mean foreground Dice on the validation images (NaN without validation; JSON null).
    #[serde(deserialize_with = "nan_if_null")]
    pub val_dice: f64,
    /// Decomposition models: mean PSNR (dB) over channels and validation images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_psnr: Option<f64>,
    pub seconds: f64,
}

/// JSON has no NaN: serde_json writes it as null, and this reads null back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// The JSON document stored under the `lumos` metadata key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    pub format: String,
    pub format_version: u32,
    pub kind: ModelKind,
    pub architecture: serde_json::Value,
    pub input_channels: Vec<String>,
    pub classes: Vec<String>,
    /// Training patch `[height, width]`, the default inference tile.
    pub patch_size: [usize; 2],
    pub normalization: Normalizer,
    /// Decomposition models: the statistics the targets were normalized with during
    /// training (one per output channel); predictions are mapped back with them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_normalization: Option<Normalizer>,
    /// Segmentation models trained from instance masks: how the classes map to objects
    /// (see `engine::instances`). `None` for models trained on class masks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<crate::engine::instances::InstanceSpec>,
    pub provenance: Provenance,
}

impl ModelMeta {
    pub fn new(
        kind: ModelKind,
        architecture: serde_json::Value,
        input_channels: Vec<String>,
        classes: Vec<String>,
        patch_size: [usize; 2],
        normalization: Normalizer,
    ) -> Self {
        ModelMeta {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            kind,
            architecture,
            input_channels,
            classes,
            patch_size,
            normalization,
            target_normalization: None,
            instances: None,
            provenance: Provenance::default(),
        }
    }

    /// Parses and checks the metadata of a file.
    pub fn from_metadata(path: &Path, md: &HashMap<String, String>) -> Result<Self> {
        let js = md.get(METADATA_KEY).ok_or_else(|| {
            Error::ModelFormat(format!(
                "'{}' is a safetensors file without lumos metadata; expected a model written by lumos",
                path.display()
            ))
        })?;
        let v: serde_json::Value = serde_json::from_str(js)
            .map_err(|e| Error::ModelFormat(format!("'{}': corrupt lumos metadata ({e})", path.display())))?;
        if v.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            return Err(Error::ModelFormat(format!("'{}' is not a {FORMAT} file", path.display())));
        }
        let ver = v.get("format_version").and_then(|f| f.as_u64()).unwrap_or(0);
        if ver > FORMAT_VERSION as u64 {
            // the engine that wrote it, from its provenance (absent from hand-made files)
            let writer = v.pointer("/provenance/lumos_version").and_then(|w| w.as_str()).filter(|w| !w.is_empty());
            let (by, fix) = match writer {
                Some(w) => (format!("lumos {w}"), format!("install lumos {w} or newer")),
                None => ("a newer lumos".to_string(), "update lumos".to_string()),
            };
            return Err(Error::ModelFormat(format!(
                "'{}' was written by {by} in model format version {ver}; this lumos ({}) reads format versions up to \
                 {FORMAT_VERSION}: {fix}",
                path.display(),
                env!("CARGO_PKG_VERSION")
            )));
        }
        if let Some(k) = v.get("kind").and_then(|k| k.as_str()) {
            ModelKind::parse(k).map_err(|_| {
                Error::ModelFormat(format!(
                    "'{}' holds a model of kind '{k}', which this lumos does not know",
                    path.display()
                ))
            })?;
        }
        serde_json::from_value(v)
            .map_err(|e| Error::ModelFormat(format!("'{}': invalid lumos metadata ({e})", path.display())))
    }
}

/// What the engine needs from a method's network. Each method folder implements it for
/// its network; the engine holds the network as a [`Net`] and never names the type.
pub trait Network: std::fmt::Debug + Send + std::any::Any {
    /// `(N, C, H, W)` -> outputs, full resolution first (deep supervision outputs follow
    /// where the network has them). A network without a single forward pass (PG-DiffSeg
    /// samples) returns [`Error::Unsupported`].
    fn forward(&self, x: &Tensor, deep_supervision: bool) -> Result<Vec<Tensor>>;
    /// Whether inference runs on channels-last (NHWC-strided) inputs. The same function
    /// either way; the layout only decides which kernels run.
    fn infers_channels_last(&self) -> bool {
        true
    }
    /// The segment verb's per-batch predictor: normalized tiles `(N, C, T, T)` -> class
    /// probabilities `(N, K, T, T)`. By default the softmax of [`Net::infer`];
    /// `monitor` only carries cancellation.
    fn tile_predictor<'a>(&'a self, opts: &SegmentOptions, monitor: &'a Monitor) -> Result<TilePredictor<'a>> {
        let _ = (opts, monitor);
        Ok(Box::new(move |x: &Tensor| -> Result<Tensor> { Ok(infer_with(self, x)?.f_softmax(1, Kind::Float)?) }))
    }
    /// The input window `[height, width]` that gives an output tile of `tile`: the tile
    /// itself, unless the network reads context around it (muSplit's lateral context).
    fn input_window(&self, tile: [usize; 2]) -> [usize; 2] {
        tile
    }
    /// The deterministic function that export traces: a normalized input window
    /// `(1, C, H, W)` -> the output tile in normalized units (class probabilities for a
    /// segmentation network). By default the softmax of the plain (NCHW) forward.
    fn export_forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward(x, false)?.swap_remove(0).f_softmax(1, Kind::Float)?)
    }
}

/// See [`Network::tile_predictor`].
pub type TilePredictor<'a> = Box<dyn FnMut(&Tensor) -> Result<Tensor> + 'a>;

/// The network behind a model, whatever its method.
#[derive(Debug)]
pub struct Net(Box<dyn Network>);

impl Net {
    pub fn new(net: impl Network) -> Self {
        Net(Box::new(net))
    }
    fn build(meta: &ModelMeta, p: &nn::Path) -> Result<Self> {
        crate::methods::method(meta.kind).build(meta, p)
    }
    /// The method's own network type, when it is `T`.
    pub fn downcast<T: Network>(&self) -> Option<&T> {
        let any: &dyn std::any::Any = self.0.as_ref();
        any.downcast_ref::<T>()
    }
    /// `(N, C, H, W)` -> outputs, full resolution first (deep supervision outputs follow).
    /// A PG-DiffSeg model has no single forward pass (it samples; see `pgdiff`).
    pub fn forward(&self, x: &Tensor, deep_supervision: bool) -> Result<Vec<Tensor>> {
        self.0.forward(x, deep_supervision)
    }
    /// Inference forward (call inside `tch::no_grad`): the full-resolution output only,
    /// `(N, K, H, W)` logits for `unet` / `dmqpm`, the predicted structures `(N, 2, T, T)`
    /// for `musplit`, as a contiguous tensor. The convolutional segmentation networks and
    /// the muSplit networks run channels-last here (NHWC strides; oneDNN's native layout,
    /// so no per-conv reorders, and the GroupNorm kernel keeps it): the same function as
    /// [`Net::forward`], faster on the CPU (docs/benchmarks.md). Training keeps NCHW,
    /// where channels-last backward passes measured slower.
    pub fn infer(&self, x: &Tensor) -> Result<Tensor> {
        infer_with(self.0.as_ref(), x)
    }
    /// See [`Network::tile_predictor`].
    pub fn tile_predictor<'a>(&'a self, opts: &SegmentOptions, monitor: &'a Monitor) -> Result<TilePredictor<'a>> {
        self.0.tile_predictor(opts, monitor)
    }
    /// See [`Network::input_window`].
    pub fn input_window(&self, tile: [usize; 2]) -> [usize; 2] {
        self.0.input_window(tile)
    }
    /// See [`Network::export_forward`].
    pub fn export_forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0.export_forward(x)
    }
    /// Height and width must be multiples of this.
    pub fn divisor(meta: &ModelMeta) -> usize {
        crate::methods::method(meta.kind).divisor(meta)
    }
}

fn infer_with<N: Network + ?Sized>(net: &N, x: &Tensor) -> Result<Tensor> {
    if net.infers_channels_last() {
        Ok(net.forward(&channels_last(x), false)?.swap_remove(0).contiguous())
    } else {
        Ok(net.forward(x, false)?.swap_remove(0))
    }
}

/// The same `(N, C, H, W)` tensor with channels-last (NHWC) strides.
pub fn channels_last(x: &Tensor) -> Tensor {
    x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

pub(crate) struct Inner {
    pub vs: nn::VarStore,
    pub net: Net,
}

/// A loaded model. `Send + Sync`: calls from several threads are serialized on an
/// internal lock around the network (libtorch tensors are not `Sync`); for parallel
/// inference load one model per thread.
pub struct Model {
    pub meta: ModelMeta,
    device: Device,
    /// Inference precision ([`Precision::code`]); float32 unless set.
    precision: std::sync::atomic::AtomicI32,
    inner: Mutex<Inner>,
}

/// How a frame is segmented.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SegmentOptions {
    /// Tile size; `None` = the model's training patch size.
    pub tile: Option<[usize; 2]>,
    pub step_fraction: f64,
    pub batch_size: usize,
    /// Test-time mirroring (4 flips averaged): better, 4x slower.
    pub mirror: bool,
    /// PG-DiffSeg sampling; `None` = the model's defaults. Ignored by other kinds.
    pub diffusion: Option<DiffusionOptions>,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        SegmentOptions { tile: None, step_fraction: 0.5, batch_size: 4, mirror: false, diffusion: None }
    }
}

/// Where segmentation results go: labels `(H, W)` or class probabilities `(K, H, W)`.
pub enum SegmentOutput<'a> {
    Labels(ArrayViewMut2<'a, u8>),
    Probabilities(ArrayViewMut3<'a, f32>),
}

impl Model {
    /// A freshly initialized model (weights from libtorch's generator, unseeded).
    pub fn new(meta: ModelMeta, device: Device) -> Result<Self> {
        Self::new_seeded(meta, device, None)
    }

    /// A freshly initialized model; with `seed`, the weights are a function of the seed.
    /// libtorch's generator is process-wide, so seeding and initialization happen under
    /// one lock that every model construction takes: a model built in another thread at
    /// the same time cannot change a seeded model's weights.
    pub fn new_seeded(meta: ModelMeta, device: Device, seed: Option<u64>) -> Result<Self> {
        crate::engine::device::tune_allocator();
        if meta.input_channels.is_empty() {
            return Err(Error::Config("a model needs at least one input channel".into()));
        }
        if meta.classes.len() < 2 || meta.classes.len() > 255 {
            return Err(Error::Config(format!("{} classes; expected 2..=255", meta.classes.len())));
        }
        if meta.normalization.n_channels() != meta.input_channels.len() {
            return Err(Error::Config(format!(
                "normalization has {} channels but the model has {} input channels",
                meta.normalization.n_channels(),
                meta.input_channels.len()
            )));
        }
        let _rng = TORCH_RNG.lock();
        if let Some(seed) = seed {
            tch::manual_seed(seed as i64);
        }
        let vs = nn::VarStore::new(device);
        let net = Net::build(&meta, &vs.root())?;
        Ok(Model { meta, device, precision: Default::default(), inner: Mutex::new(Inner { vs, net }) })
    }

    /// Loads a model file onto `device`.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let file = weights::load(path)?;
        let meta = ModelMeta::from_metadata(path, &file.metadata)?;
        let model = Model::new(meta, device)?;
        weights::copy_into(&model.inner.lock().vs, &file.tensors, &["optimizer."])
            .map_err(|e| Error::ModelFormat(format!("'{}': {e}", path.display())))?;
        Ok(model)
    }

    /// Writes the model file atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.save_with(path, &[], HashMap::new())
    }

    /// Model file plus extra tensors and metadata (used for checkpoints).
    pub(crate) fn save_with(
        &self,
        path: &Path,
        extra: &[(String, Tensor)],
        mut md: HashMap<String, String>,
    ) -> Result<()> {
        let inner = self.inner.lock();
        let mut tensors: Vec<(String, Tensor)> = inner.vs.variables().into_iter().collect();
        tensors.extend(extra.iter().map(|(n, t)| (n.clone(), t.shallow_clone())));
        md.insert(METADATA_KEY.into(), serde_json::to_string(&self.meta).expect("metadata serializes"));
        weights::save(path, &tensors, md)
    }

    /// Runs `f` with the network (under the model's lock): for inspection and tools
    /// that drive the network directly (tests, benchmarks).
    pub fn with_net<R>(&self, f: impl FnOnce(&Net) -> R) -> R {
        f(&self.inner.lock().net)
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The precision of this model's inference (segment, decompose); float32 by default.
    pub fn precision(&self) -> Precision {
        Precision::from_code(self.precision.load(std::sync::atomic::Ordering::Relaxed)).unwrap_or_default()
    }

    /// Sets the precision of later inference calls ([`Precision`]: bfloat16 autocast is
    /// what makes a CUDA GPU's tensor cores do the work). Training is unaffected.
    pub fn set_precision(&self, precision: Precision) {
        self.precision.store(precision.code(), std::sync::atomic::Ordering::Relaxed);
    }

    /// The model's named tensors (trainable and buffers), as handles that share storage
    /// with the model: writing into one (under `tch::no_grad`) changes the model.
    pub fn variables(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.lock().vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
    pub(crate) fn lock(&self) -> parking_lot::MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    pub fn n_classes(&self) -> usize {
        self.meta.classes.len()
    }

    /// Checks a `(C, H, W)` input against the model: channels, size, finite pixels.
    pub fn check_input(&self, frame: ArrayView3<f32>) -> Result<()> {
        self.check_input_shape(frame)?;
        check_finite(frame)
    }

    /// [`Self::check_input`] without the finiteness check.
    fn check_input_shape(&self, frame: ArrayView3<f32>) -> Result<()> {
        let (c, h, w) = frame.dim();
        if c != self.meta.input_channels.len() {
            return Err(Error::Shape(format!(
                "the input has {c} channels; this {} model expects {} ({})",
                self.meta.kind.name(),
                self.meta.input_channels.len(),
                self.meta.input_channels.join(", ")
            )));
        }
        if h == 0 || w == 0 {
            return Err(Error::Shape(format!("the input is {h} x {w} pixels; expected at least 1 x 1")));
        }
        Ok(())
    }

    /// Segments a `(C, H, W)` frame of any size into `out`, tile by tile.
    pub fn segment(
        &self,
        frame: ArrayView3<f32>,
        opts: &SegmentOptions,
        out: SegmentOutput,
        monitor: &mut Monitor,
    ) -> Result<()> {
        self.segment_region(frame, None, opts, out, monitor)
    }

    /// As [`segment`](Self::segment) for a region of a larger frame: channels normalized
    /// per image use `frame_stats` (per channel `(mean, std)` of the whole frame) instead
    /// of the region's own statistics, so that chunks of one frame are normalized alike.
    pub fn segment_region(
        &self,
        frame: ArrayView3<f32>,
        frame_stats: Option<&[(f32, f32)]>,
        opts: &SegmentOptions,
        mut out: SegmentOutput,
        monitor: &mut Monitor,
    ) -> Result<()> {
        if !self.meta.kind.can_segment() {
            return Err(Error::Unsupported(format!(
                "segment is not supported by a '{}' model (a decomposition model); use decompose, or load a segmentation model",
                self.meta.kind.name()
            )));
        }
        // finite pixels: sliding_window checks (on the device for a whole frame on a GPU)
        self.check_input_shape(frame)?;
        let (_, h, w) = frame.dim();
        let k = self.n_classes();
        match &out {
            SegmentOutput::Labels(l) if l.dim() != (h, w) => {
                return Err(Error::Shape(format!("the label output is {:?}; expected ({h}, {w})", l.dim())));
            }
            SegmentOutput::Probabilities(p) if p.dim() != (k, h, w) => {
                return Err(Error::Shape(format!("the probability output is {:?}; expected ({k}, {h}, {w})", p.dim())));
            }
            _ => {}
        }
        let sw = SlidingWindow {
            tile: opts.tile.unwrap_or(self.meta.patch_size),
            step_fraction: opts.step_fraction,
            batch_size: opts.batch_size,
        };
        sw.validate(Net::divisor(&self.meta))?;
        let aff = self.meta.normalization.resolve_with(frame, frame_stats)?;
        let device = self.device;
        let inner = self.inner.lock();
        // the predictor checks for cancellation between its steps (diffusion sampling)
        let inner_monitor = monitor.cancel_only();
        let mut net_probs = inner.net.tile_predictor(opts, &inner_monitor)?;
        // the affine maps' parameters go to the device now, before the frame's copy
        let dev_aff = DeviceAffine::new(&aff, 4, device);
        let prepare = |t: Tensor| dev_aff.apply_owned(t);
        let precision = self.precision();
        let mut predict = |x: &Tensor| -> Result<Tensor> {
            with_precision(precision, device, || {
                tch::no_grad(|| if opts.mirror { mirrored(x, &mut *net_probs) } else { net_probs(x) })
            })?
            .map(to_float)
        };
        let mut sink = |row0: usize, rows: &Tensor| -> Result<()> {
            let n = rows.size()[1] as usize;
            match &mut out {
                SegmentOutput::Labels(l) => {
                    // the argmax on the device: only the labels cross to the host
                    let am = rows.argmax(0, false).to_kind(Kind::Uint8);
                    let mut dst = l.slice_mut(ndarray::s![row0..row0 + n, ..]);
                    let numel = am.numel();
                    match dst.as_slice_mut() {
                        // straight into the caller's buffer
                        Some(d) => am.f_copy_data(d, numel)?,
                        None => {
                            let v = Vec::<u8>::try_from(am.to_device(Device::Cpu).contiguous().view([-1]))?;
                            for (d, s) in dst.iter_mut().zip(v) {
                                *d = s;
                            }
                        }
                    }
                }
                SegmentOutput::Probabilities(p) => {
                    let a = crate::image::tensor_to_array3(rows)?;
                    p.slice_mut(ndarray::s![.., row0..row0 + n, ..]).assign(&a);
                }
            }
            Ok(())
        };
        sliding_window(frame, &sw, k, device, &prepare, &mut predict, &mut sink, monitor)
    }

    /// Convenience: labels of a `(C, H, W)` frame.
    pub fn segment_labels(&self, frame: ArrayView3<f32>, opts: &SegmentOptions) -> Result<crate::image::Mask> {
        self.segment_labels_with(frame, opts, &mut Monitor::none())
    }

    /// Labels of a `(C, H, W)` frame, reporting to and cancelled through `monitor`.
    pub fn segment_labels_with(
        &self,
        frame: ArrayView3<f32>,
        opts: &SegmentOptions,
        monitor: &mut Monitor,
    ) -> Result<crate::image::Mask> {
        let (_, h, w) = frame.dim();
        let mut m = crate::image::Mask::zeros((h, w));
        self.segment(frame, opts, SegmentOutput::Labels(m.view_mut()), monitor)?;
        Ok(m)
    }

    /// Instance labels of a `(C, H, W)` frame, with a class per object: the frame's
    /// stitched class map from [`segment`](Self::segment), post-processed as a whole (see
    /// [`crate::engine::instances`]), so that objects crossing tile seams keep one label.
    /// Models trained on class masks give the connected regions of each class.
    pub fn segment_instances(
        &self,
        frame: ArrayView3<f32>,
        opts: &SegmentOptions,
        instance_opts: &crate::engine::instances::InstanceOptions,
        monitor: &mut Monitor,
    ) -> Result<crate::engine::instances::Instances> {
        let classes = self.segment_labels_with(frame, opts, monitor)?;
        crate::engine::instances::instances_from_classes(
            &classes,
            self.n_classes(),
            self.meta.instances.as_ref(),
            instance_opts,
        )
    }

    /// The decompose verb: not available for segmentation kinds.
    pub fn check_decompose(&self) -> Result<()> {
        if !self.meta.kind.can_decompose() {
            return Err(Error::Unsupported(format!(
                "decompose is not supported by a '{}' model (a segmentation model); load a decomposition model",
                self.meta.kind.name()
            )));
        }
        Ok(())
    }

    /// Number of trainable parameters.
    pub fn n_parameters(&self) -> i64 {
        self.inner.lock().vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
    }
}
