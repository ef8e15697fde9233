//! Export to the bioimage.io model format (`rdf.yaml` format_version 0.5, TorchScript
//! weights), so that bioimageio.core, deepImageJ and other consumers run a lumos model.
//!
//! The network is traced by libtorch from the engine's own Rust forward pass on one
//! example tile: what runs elsewhere is the same graph, with the weights embedded. What
//! the graph holds, per model kind:
//!
//! - `unet`, `dmqpm`: the fitted per-channel normalization (clip + z-score with training
//!   statistics), the network and the softmax: `(1, C, H, W)` raw pixels ->
//!   `(1, K, H, W)` class probabilities. Per-image z-score (nnU-Net's default) is not in
//!   the graph but declared as the rdf's `zero_mean_unit_variance` preprocessing, which
//!   consumers compute over the whole image, as the engine does.
//! - `pgdiff`: the same normalization, the autoencoder, LDM-P's DDIM inversion and
//!   LDM-S's DDIM sampling, unrolled for the model's saved step counts: `(1, 1, T, T)`
//!   phase -> `(1, K, T, T)` scores. Only deterministic sampling (prior start, eta 0)
//!   can be exported: a trace would freeze random draws into constants.
//! - `musplit`: input is one lateral-context window `(1, 1, W, W)`, `W = T * 2^(L-1)`
//!   for `L` context levels; the graph crops and average-pools the `L` levels around the
//!   centre, runs the network and un-normalizes: `(1, 2, T, T)`, the two structures of the
//!   central `T x T` patch in the targets' units. Hierarchical-VAE models are exported at
//!   the posterior means (no sampling), so the export is deterministic.
//!
//! The spatial size is fixed (the traced graph bakes the tile shape in); consumers tile
//! larger images themselves. Every export checks itself: the saved TorchScript file is
//! loaded back and run on the test input, and its output is compared with the engine's
//! own `segment` / `decompose` on the same pixels; the export fails when they disagree.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use ndarray::{Array2, Array3, Array4, Axis, s};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tch::{CModule, Device, IValue, Kind, Tensor};

use crate::engine::model::{Model, ModelKind, Net, SegmentOptions, SegmentOutput};
use crate::engine::normalize::{ChannelAffine, ChannelNorm};
use crate::engine::progress::Monitor;
use crate::error::{Error, Result};
use crate::image::{Image, Mask, array3_to_tensor, tensor_to_array3};
use crate::musplit::DecomposeOptions;
use crate::pgdiff::StartNoise;

/// bioimage.io `format_version` written.
pub const FORMAT_VERSION: &str = "0.5.4";
/// `eps` of the `zero_mean_unit_variance` preprocessing (per-image z-score).
pub const ZMUV_EPS: f64 = 1e-6;
/// Largest disagreement accepted between the exported graph and the engine: class
/// probabilities (absolute), decomposition (relative to the output's standard deviation).
pub const SELF_CHECK_TOLERANCE: f64 = 1e-3;

/// A person in the rdf (`authors`, `maintainers`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Person {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affiliation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github_user: Option<String>,
}

impl Person {
    /// Parses `"Name"` or `"Name; affiliation; orcid"` (empty parts skipped).
    pub fn parse(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split(';').map(str::trim).collect();
        if parts[0].is_empty() {
            return Err(Error::InvalidArgument(format!(
                "person '{s}': expected \"Name\" or \"Name; affiliation; ORCID\""
            )));
        }
        let opt = |i: usize| parts.get(i).filter(|p| !p.is_empty()).map(|p| p.to_string());
        // "Name; ORCID" (no affiliation): an ORCID-shaped second part is the ORCID
        if parts.len() == 2 && orcid_shaped(parts[1]) {
            return Ok(Person { name: parts[0].to_string(), orcid: opt(1), ..Default::default() });
        }
        Ok(Person { name: parts[0].to_string(), affiliation: opt(1), orcid: opt(2), ..Default::default() })
    }
}

/// What goes into the rdf beyond what the model file knows. All optional.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExportOptions {
    /// Model name (default: from the model kind and classes).
    pub name: Option<String>,
    /// One-paragraph description (default: generated from the model).
    pub description: Option<String>,
    /// Who trained the model (default: one author, "lumos user").
    pub authors: Vec<Person>,
    /// Maintainers; bioimage.io requires a `github_user` for each.
    pub maintainers: Vec<Person>,
    /// SPDX licence of the weights.
    pub license: String,
    /// Extra tags (the method's tags are always added).
    pub tags: Vec<String>,
    /// Where the model's code or training lives.
    pub git_repo: Option<String>,
    /// Version of this model.
    pub version: String,
    /// Spatial size `[height, width]` of the exported graph's input (segmentation models;
    /// default the training patch; multiples of the network's downsampling factor).
    pub tile: Option<[usize; 2]>,
    /// TIFF `(C, H, W)` in the model's input units from which the test tile is cut
    /// (centre crop); default a simulated frame of the model's modality.
    pub sample: Option<PathBuf>,
    /// Seed of the simulated sample.
    pub sample_seed: u64,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            name: None,
            description: None,
            authors: Vec::new(),
            maintainers: Vec::new(),
            license: "CC-BY-4.0".into(),
            tags: Vec::new(),
            git_repo: None,
            version: "1.0.0".into(),
            tile: None,
            sample: None,
            sample_seed: 0,
        }
    }
}

/// What an export wrote and how well it matched the engine.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    /// The folder or `.zip` written.
    pub path: PathBuf,
    pub input_shape: Vec<i64>,
    pub output_shape: Vec<i64>,
    /// Largest |exported - engine| on the test tile (probabilities; or relative to the
    /// output's std for decomposition).
    pub self_check: f64,
    /// Files of the package, with their sha256.
    pub files: BTreeMap<String, String>,
}

/// How the traced graph is fed and what it returns.
struct Plan {
    /// Input `(C, H, W)` cut from the sample.
    in_hw: [usize; 2],
    /// Output spatial size.
    out_hw: [usize; 2],
    out_channels: Vec<String>,
    /// All input channels normalized per image: declared as rdf preprocessing.
    per_image: bool,
    /// The affine map applied inside the graph (identity for per-image channels).
    graph_affine: Vec<ChannelAffine>,
}

fn identity() -> ChannelAffine {
    ChannelAffine { lo: f32::NEG_INFINITY, hi: f32::INFINITY, mean: 0.0, std: 1.0 }
}

/// The in-graph affine maps, and whether per-image z-score is left to the rdf.
fn graph_normalization(model: &Model) -> Result<(Vec<ChannelAffine>, bool)> {
    let chans = &model.meta.normalization.channels;
    let n_per_image = chans.iter().filter(|c| matches!(c, ChannelNorm::PerImageZscore)).count();
    if n_per_image > 0 && n_per_image < chans.len() {
        return Err(Error::Unsupported(format!(
            "{n_per_image} of {} input channels are normalized per image and the others with training statistics; \
             bioimage.io preprocessing applies to all channels at once, so this model cannot be exported faithfully \
             (train with one normalization method for all channels, or with dataset statistics)",
            chans.len()
        )));
    }
    let aff = chans
        .iter()
        .map(|c| match *c {
            ChannelNorm::PerImageZscore => identity(),
            ChannelNorm::DatasetZscore { mean, std } => {
                ChannelAffine { lo: f32::NEG_INFINITY, hi: f32::INFINITY, mean, std }
            }
            ChannelNorm::RobustQuantile { lo, hi, mean, std, .. } => ChannelAffine { lo, hi, mean, std },
        })
        .collect();
    Ok((aff, n_per_image > 0))
}

fn plan(model: &Model, opts: &ExportOptions) -> Result<Plan> {
    let meta = &model.meta;
    let (graph_affine, per_image) = graph_normalization(model)?;
    let div = Net::divisor(meta);
    match meta.kind {
        ModelKind::Unet | ModelKind::Dmqpm | ModelKind::Pgdiff => {
            let tile = opts.tile.unwrap_or(meta.patch_size);
            if tile.iter().any(|&t| t == 0 || t % div != 0) {
                return Err(Error::InvalidArgument(format!(
                    "export tile {tile:?}: height and width must be positive multiples of {div} (the network's downsampling factor)"
                )));
            }
            if meta.kind == ModelKind::Pgdiff {
                let o = model.diffusion_defaults()?;
                let random = o.start == StartNoise::Random
                    || (o.start == StartNoise::Forward && o.forward_t > 0)
                    || o.eta != 0.0;
                if random {
                    return Err(Error::Unsupported(format!(
                        "this PG-DiffSeg model samples with start {:?}, forward_t {}, eta {}: random draws cannot be exported \
                         (a trace freezes them into constants); export needs start 'prior' (or 'forward' at t = 0) and eta 0",
                        o.start, o.forward_t, o.eta
                    )));
                }
            }
            Ok(Plan { in_hw: tile, out_hw: tile, out_channels: meta.classes.clone(), per_image, graph_affine })
        }
        ModelKind::Musplit => {
            if opts.tile.is_some_and(|t| t != meta.patch_size) {
                return Err(Error::InvalidArgument(format!(
                    "a muSplit model is exported at its training patch {:?} (its lateral context is tied to it); drop the tile option",
                    meta.patch_size
                )));
            }
            let in_hw = model.with_net(|n| n.input_window(meta.patch_size));
            Ok(Plan { in_hw, out_hw: meta.patch_size, out_channels: meta.classes.clone(), per_image, graph_affine })
        }
    }
}

/// The test tile `(C, H, W)`: a centre crop of the user's sample, or of a simulated frame.
fn sample_tile(model: &Model, opts: &ExportOptions, hw: [usize; 2]) -> Result<Array3<f32>> {
    let img: Image = match &opts.sample {
        Some(p) => crate::io::tiff::read_image(p)?,
        None => {
            let modality = simulator_for(model).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "no simulator matches this model's input channels ({}); pass a sample image (--sample FILE.tif, (C, H, W) in the model's units)",
                    model.meta.input_channels.join(", ")
                ))
            })?;
            let size = hw[0].max(hw[1]).max(64);
            // the fluorescence simulator's muSplit export needs a frame one patch larger than the window
            let size = if model.meta.kind == ModelKind::Musplit { size + model.meta.patch_size[0] } else { size };
            crate::sim::simulate_frame(modality, &json!({ "size": size }).to_string(), opts.sample_seed)?.image
        }
    };
    let (c, h, w) = img.data.dim();
    if c != model.meta.input_channels.len() {
        return Err(Error::Shape(format!(
            "the sample has {c} channels; this model expects {} ({})",
            model.meta.input_channels.len(),
            model.meta.input_channels.join(", ")
        )));
    }
    let need = if model.meta.kind == ModelKind::Musplit {
        [hw[0] + model.meta.patch_size[0], hw[1] + model.meta.patch_size[0]]
    } else {
        hw
    };
    if h < need[0] || w < need[1] {
        return Err(Error::Shape(format!(
            "the sample is {h} x {w} pixels; the export needs at least {} x {}",
            need[0], need[1]
        )));
    }
    let (y0, x0) = ((h - need[0]) / 2, (w - need[1]) / 2);
    img.check_finite()?;
    Ok(img.data.slice(s![.., y0..y0 + need[0], x0..x0 + need[1]]).to_owned())
}

fn simulator_for(model: &Model) -> Option<&'static str> {
    crate::methods::method(model.meta.kind).simulator(&model.meta)
}

/// bioimage.io's `zero_mean_unit_variance` over each channel of `(C, H, W)`.
fn zero_mean_unit_variance(x: &Array3<f32>) -> Array3<f32> {
    let mut out = x.clone();
    for mut ch in out.axis_iter_mut(Axis(0)) {
        let n = ch.len() as f64;
        let mean = ch.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = ch.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let sd = var.sqrt();
        ch.mapv_inplace(|v| ((v as f64 - mean) / (sd + ZMUV_EPS)) as f32);
    }
    out
}

/// Traces the model's inference into a TorchScript module (CPU, batch 1).
fn trace(model: &Model, plan: &Plan, example: &Tensor) -> Result<CModule> {
    let meta = &model.meta;
    let mut inner = model.lock();
    inner.vs.freeze(); // constants in the graph must not require grad
    let net = &inner.net;
    let mut failure: Option<Error> = None;
    // Constant tensors must exist before tracing starts: a tensor made from Rust data
    // inside the traced function is recorded as an op on a host buffer that is gone when
    // the graph runs (the output is NaN).
    let col = |f: &dyn Fn(&ChannelAffine) -> f32| {
        let v: Vec<f32> = plan.graph_affine.iter().map(f).collect();
        Tensor::from_slice(&v).view([1, v.len() as i64, 1, 1])
    };
    let (lo, hi) = (col(&|a| a.lo.max(f32::MIN)), col(&|a| a.hi.min(f32::MAX)));
    let (mean, std) = (col(&|a| a.mean), col(&|a| a.std));
    let target = meta.target_normalization.as_ref().map(|tn| {
        let (mu, sd): (Vec<f32>, Vec<f32>) = tn.channels.iter().map(crate::musplit::mean_std_of).unzip();
        let k = mu.len() as i64;
        (Tensor::from_slice(&mu).view([1, k, 1, 1]), Tensor::from_slice(&sd).view([1, k, 1, 1]))
    });
    let mut f = |inputs: &[Tensor]| -> Vec<Tensor> {
        let x = (inputs[0].maximum(&lo).minimum(&hi) - &mean) / &std;
        let r: Result<Tensor> = net.export_forward(&x).and_then(|y| match &target {
            Some((mu, sd)) => Ok(y * sd + mu),
            None if model.meta.kind.can_decompose() => {
                Err(Error::ModelFormat("the decomposition model lacks target normalization statistics".into()))
            }
            None => Ok(y),
        });
        match r {
            Ok(t) => vec![t],
            Err(e) => {
                failure = Some(e);
                vec![inputs[0].shallow_clone()]
            }
        }
    };
    // portable conv2d ops in the graph, not oneDNN-packed weights (nn::packed)
    let module = crate::backend::packed::plain(|| {
        tch::no_grad(|| CModule::create_by_tracing("LumosExport", "forward", &[example.shallow_clone()], &mut f))
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(module)
}

fn run_module(module: &CModule, x: &Tensor) -> Result<Tensor> {
    let out = tch::no_grad(|| module.forward_is(&[IValue::Tensor(x.shallow_clone())]))?;
    match out {
        IValue::Tensor(t) => Ok(t),
        other => Err(Error::Shape(format!("the exported module returned {other:?}; expected one tensor"))),
    }
}

/// The engine's own answer for the test input, for the self-check.
fn engine_output(model: &Model, plan: &Plan, tile: &Array3<f32>) -> Result<Tensor> {
    match model.meta.kind {
        ModelKind::Musplit => {
            // one cell of `keep = T` whose lateral context lies inside the frame: its
            // prediction is exactly the exported window's output
            let t = plan.out_hw[0];
            let w = plan.in_hw[0];
            let j = w / (2 * t);
            let c = j * t + t / 2;
            let s0 = c - w / 2;
            let frame = tile.index_axis(Axis(0), 0);
            let opts = DecomposeOptions {
                tile: Some(t),
                keep: Some(t),
                batch_size: 4,
                mirror: false,
                samples: 1,
                seed: 0,
                posterior_mean: true,
            };
            let out = model.decompose_array(frame, &opts)?;
            let cell = out.slice(s![.., j * t..(j + 1) * t, j * t..(j + 1) * t]).to_owned();
            debug_assert_eq!(s0 + w / 2, c);
            Ok(array3_to_tensor(cell.view(), Device::Cpu).unsqueeze(0))
        }
        _ => {
            let (k, h, w) = (model.n_classes(), tile.shape()[1], tile.shape()[2]);
            let mut p = Array3::<f32>::zeros((k, h, w));
            let opts = SegmentOptions {
                tile: Some([h, w]),
                step_fraction: 1.0,
                batch_size: 1,
                mirror: false,
                diffusion: None,
            };
            model.segment(tile.view(), &opts, SegmentOutput::Probabilities(p.view_mut()), &mut Monitor::none())?;
            Ok(array3_to_tensor(p.view(), Device::Cpu).unsqueeze(0))
        }
    }
}

/// The window `(C, W, W)` that the exported musplit graph takes for the self-check cell.
fn musplit_window(plan: &Plan, frame: &Array3<f32>) -> Array3<f32> {
    let (t, w) = (plan.out_hw[0], plan.in_hw[0]);
    let j = w / (2 * t);
    let s0 = j * t + t / 2 - w / 2;
    frame.slice(s![.., s0..s0 + w, s0..s0 + w]).to_owned()
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

fn write_npy(path: &Path, t: &Tensor) -> Result<()> {
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let v = Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view([-1]))?;
    let a = Array4::from_shape_vec((shape[0], shape[1], shape[2], shape[3]), v)
        .map_err(|e| Error::Shape(format!("test tensor {shape:?}: {e}")))?;
    ndarray_npy::write_npy(path, &a).map_err(|e| Error::InvalidInput(format!("writing '{}': {e}", path.display())))
}

fn method_info(model: &Model) -> (&'static str, Vec<&'static str>, Vec<Value>) {
    let info = crate::methods::method(model.meta.kind).export_info();
    (info.name, info.tags, info.cite)
}

fn axes(channel_names: &[String], hw: [usize; 2]) -> Value {
    json!([
        {"type": "batch", "size": 1},
        {"type": "channel", "channel_names": channel_names.iter().map(|c| sanitize_id(c)).collect::<Vec<_>>()},
        {"type": "space", "id": "y", "size": hw[0]},
        {"type": "space", "id": "x", "size": hw[1]},
    ])
}

/// bioimage.io identifiers: letters, digits, '_' and '-', starting with a letter.
fn sanitize_id(s: &str) -> String {
    let mut out: String =
        s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect();
    if !out.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) {
        out.insert(0, 'c');
    }
    out
}

/// Exports the model file at `model_path` to `out`: a folder, or a `.zip` package when
/// `out` ends in `.zip`. Written atomically (a staging folder or temporary file renamed at
/// the end); an existing `out` is replaced only if it is an earlier export (holds an
/// `rdf.yaml`) or a `.zip` file.
pub fn export_bioimageio(model_path: &Path, out: &Path, opts: &ExportOptions) -> Result<ExportReport> {
    check_options(opts)?;
    let model = Model::load(model_path, Device::Cpu)?;
    let plan = plan(&model, opts)?;
    let to_zip = out.extension().is_some_and(|e| e.eq_ignore_ascii_case("zip"));
    if out.exists() && !to_zip && !(out.is_dir() && (out.join("rdf.yaml").exists() || dir_is_empty(out))) {
        return Err(Error::InvalidArgument(format!(
            "'{}' exists and is not an earlier export (no rdf.yaml); choose a new folder or a .zip path",
            out.display()
        )));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::io(
            &parent,
            std::io::Error::new(std::io::ErrorKind::NotFound, "the output's folder does not exist"),
        ));
    }
    let stage =
        tempfile::Builder::new().prefix(".lumos-export-").tempdir_in(&parent).map_err(|e| Error::io(&parent, e))?;
    let dir = stage.path();

    // test input: raw pixels; the graph's input: after the rdf preprocessing
    let frame = sample_tile(&model, opts, plan.in_hw)?;
    let raw = if model.meta.kind == ModelKind::Musplit { musplit_window(&plan, &frame) } else { frame.clone() };
    let pre = if plan.per_image { zero_mean_unit_variance(&raw) } else { raw.clone() };
    let x_raw = array3_to_tensor(raw.view(), Device::Cpu).unsqueeze(0);
    let x_pre = array3_to_tensor(pre.view(), Device::Cpu).unsqueeze(0);

    let module = trace(&model, &plan, &x_pre)?;
    let weights = dir.join("weights.pt");
    module.save(&weights)?;
    drop(module);
    let reloaded = CModule::load_on_device(&weights, Device::Cpu)?;
    let y = run_module(&reloaded, &x_pre)?;
    let want = [1, plan.out_channels.len() as i64, plan.out_hw[0] as i64, plan.out_hw[1] as i64];
    if y.size() != want {
        return Err(Error::Shape(format!("the exported module returned {:?}; expected {want:?}", y.size())));
    }
    // the self-check: a freshly loaded engine model (the traced one has frozen weights)
    let engine = Model::load(model_path, Device::Cpu)?;
    let reference = engine_output(&engine, &plan, &frame)?;
    let diff = (&y - &reference).abs().max().double_value(&[]);
    let self_check = if model.meta.kind == ModelKind::Musplit {
        diff / reference.std(true).double_value(&[]).max(1e-12)
    } else {
        diff
    };
    // a NaN difference fails too
    if self_check.is_nan() || self_check > SELF_CHECK_TOLERANCE {
        return Err(Error::InvalidInput(format!(
            "the exported graph disagrees with the engine on the test tile: max difference {self_check:.3e} (tolerance {SELF_CHECK_TOLERANCE:e}); nothing was written"
        )));
    }

    write_npy(&dir.join("test_input.npy"), &x_raw)?;
    write_npy(&dir.join("test_output.npy"), &y)?;
    let y_arr = tensor_to_array3(&y.get(0))?;
    write_cover(&dir.join("cover.png"), &model, &raw, &y_arr)?;
    crate::io::tiff::write_image_f32(
        &dir.join("sample_input.tif"),
        &Image::with_names(raw.clone(), model.meta.input_channels.clone())?,
    )?;
    crate::io::tiff::write_image_f32(
        &dir.join("sample_output.tif"),
        &Image::with_names(y_arr, plan.out_channels.clone())?,
    )?;
    std::fs::write(
        dir.join("lumos_model.json"),
        serde_json::to_string_pretty(&model.meta).expect("metadata serializes"),
    )
    .map_err(|e| Error::io(dir.join("lumos_model.json"), e))?;
    std::fs::write(dir.join("README.md"), documentation(&model, &plan, opts, self_check))
        .map_err(|e| Error::io(dir.join("README.md"), e))?;

    let mut files = BTreeMap::new();
    for f in [
        "weights.pt",
        "test_input.npy",
        "test_output.npy",
        "sample_input.tif",
        "sample_output.tif",
        "cover.png",
        "README.md",
        "lumos_model.json",
    ] {
        files.insert(f.to_string(), sha256_file(&dir.join(f))?);
    }
    let mut rdf = rdf(&model, &plan, opts, &files, x_raw.size(), y.size());
    drop_nulls(&mut rdf);
    let yaml = serde_yaml_ng::to_string(&rdf).map_err(|e| Error::InvalidInput(format!("rdf.yaml: {e}")))?;
    std::fs::write(dir.join("rdf.yaml"), yaml).map_err(|e| Error::io(dir.join("rdf.yaml"), e))?;
    files.insert("rdf.yaml".into(), sha256_file(&dir.join("rdf.yaml"))?);

    if to_zip {
        let mut tmp = tempfile::Builder::new()
            .prefix(".lumos-export-")
            .suffix(".zip")
            .tempfile_in(&parent)
            .map_err(|e| Error::io(&parent, e))?;
        {
            let mut z = zip::ZipWriter::new(tmp.as_file_mut());
            let o = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
            for name in files.keys() {
                z.start_file(name.as_str(), o).map_err(|e| Error::InvalidInput(format!("zip: {e}")))?;
                let bytes = std::fs::read(dir.join(name)).map_err(|e| Error::io(dir.join(name), e))?;
                z.write_all(&bytes).map_err(|e| Error::io(out, e))?;
            }
            z.finish().map_err(|e| Error::InvalidInput(format!("zip: {e}")))?;
        }
        tmp.as_file().sync_all().map_err(|e| Error::io(out, e))?;
        set_mode(tmp.path(), 0o644)?;
        tmp.persist(out).map_err(|e| Error::io(out, e.error))?;
    } else {
        let staged = stage.keep();
        set_mode(&staged, 0o755)?;
        if out.exists() {
            let old = parent.join(format!(".lumos-export-old-{}", std::process::id()));
            std::fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
            std::fs::rename(&staged, out).map_err(|e| Error::io(out, e))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&staged, out).map_err(|e| Error::io(out, e))?;
        }
    }
    Ok(ExportReport { path: out.to_path_buf(), input_shape: x_raw.size(), output_shape: y.size(), self_check, files })
}

/// Temporary files and folders are private (0600 / 0700); a package is for sharing.
fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(|e| Error::io(p, e))
}

fn dir_is_empty(p: &Path) -> bool {
    std::fs::read_dir(p).map(|mut d| d.next().is_none()).unwrap_or(false)
}

fn default_name(model: &Model) -> String {
    let (method, _, _) = method_info(model);
    let name = match model.meta.kind {
        ModelKind::Musplit => format!("lumos {method} {} and {}", model.meta.classes[0], model.meta.classes[1]),
        _ => format!("lumos {method} {} segmentation", model.meta.classes[1..].join(" ")),
    };
    // bioimage.io names: letters, digits, space, '_', '-', '(', ')'
    name.chars()
        .map(|c| if name_char_ok(c) { c } else { ' ' })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn name_char_ok(c: char) -> bool {
    c.is_ascii_alphanumeric() || " _-()".contains(c)
}

/// Checks what bioimage.io requires of user-given texts.
/// `dddd-dddd-dddd-dddX`: four groups of four, the last character a digit or X.
fn orcid_shaped(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 19
        && b.iter().enumerate().all(|(i, &c)| match i {
            4 | 9 | 14 => c == b'-',
            18 => c.is_ascii_digit() || c == b'X',
            _ => c.is_ascii_digit(),
        })
}

/// An ORCID iD with a valid ISO 7064 11,2 check character (what bioimage.io validates).
fn orcid_valid(s: &str) -> bool {
    if !orcid_shaped(s) {
        return false;
    }
    let digits: Vec<u8> = s.bytes().filter(|c| *c != b'-').collect();
    let total = digits[..15].iter().fold(0u32, |t, &d| (t + (d - b'0') as u32) * 2);
    let check = (12 - total % 11) % 11;
    let want = if check == 10 { b'X' } else { b'0' + check as u8 };
    digits[15] == want
}

fn check_options(opts: &ExportOptions) -> Result<()> {
    if let Some(n) = &opts.name
        && (n.trim().len() < 5 || n.len() > 128 || !n.chars().all(name_char_ok))
    {
        return Err(Error::InvalidArgument(format!(
            "model name '{n}': bioimage.io needs 5 to 128 characters from letters, digits, space, '_', '-', '(' and ')'"
        )));
    }
    if opts.license.trim().is_empty() {
        return Err(Error::InvalidArgument(
            "license is empty; give an SPDX identifier such as CC-BY-4.0 or MIT".into(),
        ));
    }
    // an SPDX identifier is one token of letters, digits, '.', '-' and '+' ("MIT", not "MIT License")
    if !opts.license.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+')) {
        return Err(Error::InvalidArgument(format!(
            "license '{}' is not an SPDX identifier; give one such as CC-BY-4.0, MIT or Apache-2.0",
            opts.license
        )));
    }
    if let Some(d) = &opts.description
        && d.chars().count() > 1024
    {
        return Err(Error::InvalidArgument(format!(
            "the description has {} characters; bioimage.io takes at most 1024 (put longer text in the documentation)",
            d.chars().count()
        )));
    }
    for p in opts.authors.iter().chain(&opts.maintainers) {
        if let Some(o) = &p.orcid
            && !orcid_valid(o)
        {
            return Err(Error::InvalidArgument(format!(
                "ORCID '{o}' of {} is not a valid ORCID iD (dddd-dddd-dddd-dddX with its check character)",
                p.name
            )));
        }
    }
    if opts.maintainers.iter().any(|m| m.github_user.as_deref().is_none_or(str::is_empty)) {
        return Err(Error::InvalidArgument(
            "every maintainer needs a GitHub user name (bioimage.io contacts maintainers there)".into(),
        ));
    }
    Ok(())
}

/// Drops `null` members (bioimage.io reads an absent field and a null one differently).
fn drop_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(drop_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

fn default_description(model: &Model, plan: &Plan) -> String {
    let (method, _, _) = method_info(model);
    let m = &model.meta;
    match m.kind {
        ModelKind::Musplit => format!(
            "{method} image decomposition trained with lumos {}: splits a fluorescence image of two superimposed structures into {} and {}. \
             Input: a {}x{} lateral-context window; output: the central {}x{} patch of each structure.",
            m.provenance.lumos_version,
            m.classes[0],
            m.classes[1],
            plan.in_hw[0],
            plan.in_hw[1],
            plan.out_hw[0],
            plan.out_hw[1]
        ),
        _ => format!(
            "{method} segmentation trained with lumos {}: {} input channels ({}) to class probabilities ({}) on {}x{} tiles.",
            m.provenance.lumos_version,
            m.input_channels.len(),
            m.input_channels.join(", "),
            m.classes.join(", "),
            plan.in_hw[0],
            plan.in_hw[1]
        ),
    }
}

fn rdf(
    model: &Model,
    plan: &Plan,
    opts: &ExportOptions,
    files: &BTreeMap<String, String>,
    in_shape: Vec<i64>,
    out_shape: Vec<i64>,
) -> Value {
    let m = &model.meta;
    let (method, method_tags, cite) = method_info(model);
    let mut tags: Vec<String> = method_tags.iter().map(|s| s.to_string()).collect();
    tags.push("lumos".into());
    tags.extend(opts.tags.iter().cloned());
    tags.dedup();
    let authors = if opts.authors.is_empty() {
        vec![Person { name: "lumos user".into(), ..Default::default() }]
    } else {
        opts.authors.clone()
    };
    let mut preprocessing = vec![json!({"id": "ensure_dtype", "kwargs": {"dtype": "float32"}})];
    if plan.per_image {
        preprocessing.push(json!({"id": "zero_mean_unit_variance", "kwargs": {"axes": ["y", "x"], "eps": ZMUV_EPS}}));
    }
    let (in_id, in_desc, out_id, out_desc, out_range) = match m.kind {
        ModelKind::Musplit => (
            "mixed",
            format!(
                "{}x{} window of the mixed image (training units); outer pixels are lateral context",
                plan.in_hw[0], plan.in_hw[1]
            ),
            "structures",
            format!(
                "The two structures of the central {}x{} patch, in the targets' units",
                plan.out_hw[0], plan.out_hw[1]
            ),
            json!([null, null]),
        ),
        _ => (
            "raw",
            if m.input_channels.len() == 5 {
                "Polarized intensities (camera counts) and phase (radians), as in training".to_string()
            } else {
                "The image in the units the model was trained on".to_string()
            },
            "probabilities",
            "Class probabilities; labels are the argmax over channels".to_string(),
            json!([0.0, 1.0]),
        ),
    };
    json!({
        "format_version": FORMAT_VERSION,
        "type": "model",
        "name": opts.name.clone().unwrap_or_else(|| default_name(model)),
        "description": opts.description.clone().unwrap_or_else(|| default_description(model, plan)),
        "authors": authors,
        "maintainers": opts.maintainers,
        "cite": cite,
        "license": opts.license,
        "tags": tags,
        "version": opts.version,
        "documentation": "README.md",
        "covers": ["cover.png"],
        "git_repo": opts.git_repo,
        "attachments": [{"source": "lumos_model.json", "sha256": files["lumos_model.json"]}],
        "timestamp": timestamp(),
        "inputs": [{
            "id": in_id,
            "description": in_desc,
            "axes": axes(&m.input_channels, plan.in_hw),
            "test_tensor": {"source": "test_input.npy", "sha256": files["test_input.npy"]},
            "sample_tensor": {"source": "sample_input.tif", "sha256": files["sample_input.tif"]},
            "data": {"type": "float32"},
            "preprocessing": preprocessing,
        }],
        "outputs": [{
            "id": out_id,
            "description": out_desc,
            "axes": axes(&plan.out_channels, plan.out_hw),
            "test_tensor": {"source": "test_output.npy", "sha256": files["test_output.npy"]},
            "sample_tensor": {"source": "sample_output.tif", "sha256": files["sample_output.tif"]},
            "data": {"type": "float32", "range": out_range},
        }],
        "weights": {"torchscript": {
            "source": "weights.pt",
            "sha256": files["weights.pt"],
            "pytorch_version": tch_torch_version(),
            "authors": authors,
        }},
        "config": {"lumos": {
            "version": env!("CARGO_PKG_VERSION"),
            "method": method,
            "kind": m.kind.name(),
            "input_shape": in_shape,
            "output_shape": out_shape,
            "seed": m.provenance.seed,
            "epochs": m.provenance.epochs_completed,
            "validation_dice": m.provenance.val_dice,
        }},
    })
}

/// The libtorch version the weights were traced with.
fn tch_torch_version() -> String {
    // libtorch is pinned by the build (scripts/bootstrap.sh); tch exposes no runtime query
    option_env!("LUMOS_TORCH_VERSION").unwrap_or("2.11.0").to_string()
}

fn timestamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    // civil date from days since 1970-01-01 (Howard Hinnant's algorithm)
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if mo <= 2 { 1 } else { 0 };
    format!("{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn write_cover(path: &Path, model: &Model, input: &Array3<f32>, output: &Array3<f32>) -> Result<()> {
    use crate::overlay::{montage, overlay, write_png};
    let gray = |a: ndarray::ArrayView2<f32>| overlay(a, &Mask::zeros(a.dim()), None);
    let last = input.shape()[0] - 1; // phase for ssQPM, the only channel otherwise
    let pics = match model.meta.kind {
        ModelKind::Musplit => {
            let (t, w) = (output.shape()[1], input.shape()[1]);
            let o = (w - t) / 2;
            let centre = input.slice(s![0, o..o + t, o..o + t]);
            vec![gray(centre), gray(output.index_axis(Axis(0), 0)), gray(output.index_axis(Axis(0), 1))]
        }
        _ => {
            let labels: Array2<u8> = output.map_axis(Axis(0), |p| {
                p.iter().enumerate().fold((0usize, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u8
            });
            vec![gray(input.index_axis(Axis(0), last)), overlay(input.index_axis(Axis(0), last), &labels, None)]
        }
    };
    let n = pics.len();
    let pic = montage(&pics, n)?;
    // small tiles are enlarged (nearest neighbour) to a cover of at least 256 rows
    let f = 256usize.div_ceil(pic.height).max(1);
    let (w, h) = (pic.width * f, pic.height * f);
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let i = ((y / f) * pic.width + x / f) * 3;
            data.extend_from_slice(&pic.data[i..i + 3]);
        }
    }
    write_png(path, &crate::overlay::Rgb { width: w, height: h, data })
}

fn documentation(model: &Model, plan: &Plan, opts: &ExportOptions, self_check: f64) -> String {
    let m = &model.meta;
    let p = &m.provenance;
    let (method, _, cite) = method_info(model);
    let norm = if plan.per_image {
        "Each input channel is z-scored with the whole image's own mean and standard deviation (the rdf's `zero_mean_unit_variance` preprocessing); compute it over the full image before tiling.".to_string()
    } else {
        "Normalization with the training set's statistics (clipping and z-score per channel) is part of the TorchScript graph: feed raw pixels in the training units.".to_string()
    };
    let mut s = format!(
        "# {}\n\n{}\n\nExported from a lumos model file (lumos {}) to the bioimage.io model format {FORMAT_VERSION}; \
         the TorchScript weights were traced from the engine's own forward pass.\n\n## Inputs and outputs\n\n\
         - Input: `(1, {}, {}, {})` float32, channels {}.\n- Output: `(1, {}, {}, {})` float32, channels {}.\n- {}\n",
        opts.name.clone().unwrap_or_else(|| default_name(model)),
        opts.description.clone().unwrap_or_else(|| default_description(model, plan)),
        env!("CARGO_PKG_VERSION"),
        m.input_channels.len(),
        plan.in_hw[0],
        plan.in_hw[1],
        m.input_channels.join(", "),
        plan.out_channels.len(),
        plan.out_hw[0],
        plan.out_hw[1],
        plan.out_channels.join(", "),
        norm
    );
    match m.kind {
        ModelKind::Musplit => s.push_str(&format!(
            "- The window's outer pixels are the lateral context: level k of the {} levels is the central {}·2^k square, average-pooled by 2^k. \
             Mirror-pad the image by half a window to decompose its borders. Hierarchical-VAE models are exported at the posterior means (deterministic).\n",
            plan.in_hw[0].trailing_zeros() - plan.out_hw[0].trailing_zeros() + 1,
            plan.out_hw[0]
        )),
        ModelKind::Pgdiff => {
            let o = model.diffusion_defaults().expect("pgdiff");
            s.push_str(&format!(
                "- {method} sampling is inside the graph: DDIM inversion with LDM-P ({} steps) gives the starting noise, LDM-S samples the mask ({} steps, eta 0), deterministic.\n",
                o.inversion_steps, o.sampling_steps
            ));
        }
        _ => s.push_str("- Tile larger images with overlap (the engine uses half-tile steps with Gaussian blending).\n"),
    }
    s.push_str(&format!(
        "\n## Training\n\n- Method: {method} (model kind `{}`), {} parameters.\n- Seed {}, {} epochs on {}, {:.0} s; validation Dice {}.\n- Data: `{}` ({} training / {} validation images).\n\
         The full training configuration and history are in `lumos_model.json`.\n\n## Validation of this export\n\n\
         The saved TorchScript file was reloaded and run on `test_input.npy`; its output differs from the lumos engine's own {} of the same pixels by at most {self_check:.2e}{}.\n\n## References\n\n",
        m.kind.name(),
        model.n_parameters(),
        p.seed,
        p.epochs_completed,
        if p.device.is_empty() { "?" } else { &p.device },
        p.wall_seconds,
        p.val_dice.map(|d| format!("{d:.3}")).unwrap_or_else(|| "n/a".into()),
        p.data,
        p.train_images.len(),
        p.val_images.len(),
        if m.kind == ModelKind::Musplit { "decomposition" } else { "segmentation" },
        if m.kind == ModelKind::Musplit { " (relative to the output's standard deviation)" } else { "" },
    ));
    for c in cite {
        s.push_str(&format!("- {}\n", c["text"].as_str().unwrap_or_default()));
    }
    s.push_str(
        "\nLimitations: trained from scratch, by default on simulated data; check it on your own images before use.\n",
    );
    s
}
