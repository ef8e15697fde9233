//! `lumos`: the command-line face of the engine.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use indicatif::{ProgressBar, ProgressStyle};

use lumos::engine::dataset::list_pairs;
use lumos::engine::device::{device_name, parse_device};
use lumos::engine::metrics::{self, ImageScores};
use lumos::engine::model::{Model, Precision, SegmentOptions, SegmentOutput};
use lumos::engine::progress::{Monitor, Progress, Stage};
use lumos::engine::train::{TrainConfig, train};
use lumos::io::tiff;
use lumos::musplit::DecomposeOptions;
use lumos::sim::fluo::{FluoConfig, StructurePair};
use lumos::sim::ssqpm::{self, Confluence, SsqpmConfig};
use lumos::{Error, Result, overlay};

#[derive(Parser)]
#[command(name = "lumos", version, about = "Deep-learning engine for microscopy: simulate, train, segment, evaluate")]
struct Cli {
    /// Log level (error, warn, info, debug).
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Simulate a labelled data set.
    Simulate(SimulateArgs),
    /// Train a model on a data folder (DIR/images/*.tif + DIR/masks/*.tif). The masks may
    /// be class masks or instance label images (one id per cell, 16- or 32-bit).
    Train(TrainArgs),
    /// Segment TIFF images (a file or a folder) with a model.
    Segment(SegmentArgs),
    /// Segment a labelled folder and report Dice and IoU per image and mean ± std, and
    /// object metrics (precision, recall, F1, AP, PQ at IoU 0.5-0.9) when the truth holds
    /// instance labels.
    Evaluate(EvaluateArgs),
    /// Measure the objects of instance label images (area, shape, intensities, dry mass)
    /// and write one CSV table per image.
    Measure(MeasureCmdArgs),
    /// Show a model's kind, channels, classes, normalization and provenance.
    Info(InfoArgs),
    /// The main job: simulate ssQPM data, train on CPU, segment the test images, report.
    Demo(DemoArgs),
    /// Decompose single-channel fluorescence TIFFs into two structures with a muSplit model.
    Decompose(DecomposeArgs),
    /// Export a model to the bioimage.io model format (rdf.yaml 0.5, TorchScript weights,
    /// test tensors): a folder, or a .zip package when OUT ends in .zip.
    Export(ExportArgs),
}

#[derive(Args)]
struct ExportArgs {
    /// The lumos model file.
    model: PathBuf,
    /// Output folder, or OUT.zip for a bioimage.io package.
    #[arg(long)]
    out: PathBuf,
    /// Model name in the rdf (default: from the method and classes).
    #[arg(long)]
    name: Option<String>,
    /// Description (default: generated from the model).
    #[arg(long)]
    description: Option<String>,
    /// An author: "Name" or "Name; affiliation; ORCID" (repeatable).
    #[arg(long = "author")]
    authors: Vec<String>,
    /// A maintainer's GitHub user name (repeatable; bioimage.io needs one to upload).
    #[arg(long = "maintainer")]
    maintainers: Vec<String>,
    /// SPDX licence of the weights.
    #[arg(long, default_value = "CC-BY-4.0")]
    license: String,
    /// Extra tag (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Repository of the model's code or training.
    #[arg(long)]
    git_repo: Option<String>,
    /// Version of this model.
    #[arg(long, default_value = "1.0.0")]
    version: String,
    /// Input tile HxW of the exported graph (segmentation models; default the training patch).
    #[arg(long)]
    tile: Option<String>,
    /// TIFF (C, H, W) to cut the test tile from (default: simulated data of the model's modality).
    #[arg(long)]
    sample: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Modality {
    /// Single-shot quantitative phase microscopy (4 polarized intensities + phase).
    Ssqpm,
    /// Widefield fluorescence of two superimposed structures (muSplit data:
    /// DIR/{train,test}/inputs and targets).
    Fluo,
    /// Quantitative phase images of live and dead cells (PG-DiffSeg data: phase in
    /// radians; masks 0 background, 1 live, 2 dead).
    Qpi,
}

#[derive(Clone, Copy, ValueEnum)]
enum PairArg {
    /// Straight actin-like fibres + curved microtubule-like networks.
    ActinTubulin,
    /// Punctate vesicles + large nuclei.
    VesiclesNuclei,
}

impl PairArg {
    fn pair(self) -> StructurePair {
        match self {
            PairArg::ActinTubulin => StructurePair::ActinTubulin,
            PairArg::VesiclesNuclei => StructurePair::VesiclesNuclei,
        }
    }
}

#[derive(Args)]
struct DecomposeArgs {
    #[arg(long, short)]
    model: PathBuf,
    /// A single-channel TIFF file or a folder of them.
    #[arg(long, short)]
    input: PathBuf,
    /// Output folder for NAME_split.tif (2-channel float32).
    #[arg(long, short)]
    out: PathBuf,
    /// Folder of ground-truth NAME.tif (2-channel): report PSNR, RI-PSNR and SSIM.
    #[arg(long)]
    truth: Option<PathBuf>,
    /// inner (tiles of the training patch, the paper's scheme) or outer (tiles 4x larger).
    #[arg(long, default_value = "inner")]
    padding: String,
    /// Square tile edge in pixels (overrides --padding).
    #[arg(long)]
    tile: Option<usize>,
    /// Kept centre of each tile (default: half the tile for inner padding).
    #[arg(long)]
    keep: Option<usize>,
    /// HVAE models: posterior samples averaged (MMSE).
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// HVAE models: seed of the samples.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Average over 4 flips.
    #[arg(long)]
    mirror: bool,
    /// Tiles per forward pass.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Inference arithmetic: float32, or bfloat16 (autocast; the fast path on a CUDA GPU).
    #[arg(long, default_value = "float32")]
    precision: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum ConfluenceArg {
    Low,
    Medium,
    High,
    Mixed,
}

#[derive(Args)]
struct SimulateArgs {
    /// What to simulate.
    #[arg(value_enum, default_value = "ssqpm")]
    modality: Modality,
    /// Output folder (train/ and test/ with images/ and masks/).
    #[arg(long, short)]
    out: PathBuf,
    #[arg(long, default_value_t = 24)]
    train: usize,
    #[arg(long, default_value_t = 6)]
    test: usize,
    /// Image edge in pixels [default: 256, or the --config file's].
    #[arg(long)]
    size: Option<usize>,
    /// ssQPM cell density [default: mixed, or the --config file's].
    #[arg(long, value_enum)]
    confluence: Option<ConfluenceArg>,
    /// Fluorescence: which two structures [default: actin-tubulin, or the --config file's].
    #[arg(long, value_enum)]
    pair: Option<PairArg>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// JSON file with simulator settings (overrides the defaults; flags given override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Replace the train/ and test/ folders of an earlier simulation in OUT (without it, a
    /// non-empty train/ or test/ is an error: files of the earlier run would mix in).
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct TrainArgs {
    /// Data folder (DIR/images + DIR/masks, or DIR/train/...).
    #[arg(long, short)]
    data: PathBuf,
    /// Output model file.
    #[arg(long, short)]
    out: PathBuf,
    /// JSON training config (see README); flags below override it.
    #[arg(long, conflicts_with = "recipe")]
    config: Option<PathBuf>,
    /// Start from a named recipe instead of a config file: dm-qpmnet, early-fusion,
    /// angles-only, phase-only, nnunet, pg-diffseg, musplit-unet or musplit-hvae (the
    /// recipes of docs/results; see --size). Flags below override it.
    #[arg(long)]
    recipe: Option<String>,
    /// Size of the --recipe: tiny (seconds), cpu (the CPU comparisons) or paper (a GPU job).
    #[arg(long, default_value = "cpu", requires = "recipe")]
    size: String,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    iterations: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    /// Square patch edge in pixels.
    #[arg(long)]
    patch: Option<usize>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long)]
    device: Option<String>,
    #[arg(long)]
    seed: Option<u64>,
    /// Model kind: unet (nnU-Net), dmqpm (DM-QPMNet; its variant and fusion options
    /// come from the config's "dmqpm" section), musplit (decomposition) or pgdiff
    /// (PG-DiffSeg; see --pgdiff-preset).
    #[arg(long)]
    kind: Option<String>,
    /// pgdiff networks when no config is given: paper (the paper's sizes, 256 x 256
    /// tiles; a GPU job), cpu (small networks, 128 x 128 tiles) or tiny (tests).
    #[arg(long, default_value = "paper")]
    pgdiff_preset: String,
    /// Continue from OUT.ckpt when it exists.
    #[arg(long)]
    resume: bool,
    /// How to read the masks: auto (8-bit masks are classes; 16-bit or wider masks are
    /// instance labels, one id per cell, as Cellpose and StarDist write them), classes, or
    /// instances (DIR/instances/NAME.tif when present, each cell taking its class from
    /// DIR/masks; else DIR/masks). A model trained from instances segments cells apart.
    #[arg(long)]
    masks: Option<String>,
    /// What a model learns from instance masks: boundary (cell interiors and boundaries,
    /// the default) or foreground (cells only; touching cells merge).
    #[arg(long)]
    instance_targets: Option<String>,
    /// Print the training history as JSON at the end.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone)]
struct TileArgs {
    /// Square tile edge in pixels (default: the model's patch size).
    #[arg(long)]
    tile: Option<usize>,
    /// Step between tiles as a fraction of the tile.
    #[arg(long, default_value_t = 0.5)]
    step: f64,
    /// Average predictions over 4 flips (4x slower).
    #[arg(long)]
    mirror: bool,
    /// Tiles per forward pass.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Inference arithmetic: float32, or bfloat16 (autocast; the fast path on a CUDA GPU).
    #[arg(long, default_value = "float32")]
    precision: String,
    /// PG-DiffSeg: starting noise (prior = LDM-P inversion, random, forward).
    #[arg(long)]
    start: Option<String>,
    /// PG-DiffSeg: DDIM inversion steps (default: the model's, paper 100).
    #[arg(long)]
    inversion_steps: Option<usize>,
    /// PG-DiffSeg: DDIM sampling steps (default: the model's, paper 200).
    #[arg(long)]
    sampling_steps: Option<usize>,
    /// PG-DiffSeg: DDIM eta (0 = deterministic).
    #[arg(long)]
    eta: Option<f64>,
    /// PG-DiffSeg: samples per tile, combined by majority voting.
    #[arg(long)]
    samples: Option<usize>,
    /// PG-DiffSeg: timestep of the forward-diffusion start.
    #[arg(long)]
    forward_t: Option<usize>,
    /// PG-DiffSeg: seed of the random draws.
    #[arg(long)]
    diffusion_seed: Option<u64>,
    /// PG-DiffSeg: do not clip the predicted clean mask to [-1, 1] during sampling.
    #[arg(long)]
    no_clip: bool,
}

impl TileArgs {
    /// Tiling options; for a PG-DiffSeg model the model's sampling with the flags applied.
    fn options(&self, model: &Model) -> Result<SegmentOptions> {
        let diffusion = match model.diffusion_defaults() {
            Ok(mut d) => {
                if let Some(v) = &self.start {
                    d.start = lumos::pgdiff::StartNoise::parse(v)?;
                }
                d.inversion_steps = self.inversion_steps.unwrap_or(d.inversion_steps);
                d.sampling_steps = self.sampling_steps.unwrap_or(d.sampling_steps);
                d.eta = self.eta.unwrap_or(d.eta);
                d.samples = self.samples.unwrap_or(d.samples);
                d.forward_t = self.forward_t.unwrap_or(d.forward_t);
                d.seed = self.diffusion_seed.unwrap_or(d.seed);
                d.clip_denoised &= !self.no_clip;
                Some(d)
            }
            Err(_) => {
                // sampling flags for a model that does not sample: say so rather than ignore them
                let given = [
                    self.start.is_some(),
                    self.inversion_steps.is_some(),
                    self.sampling_steps.is_some(),
                    self.eta.is_some(),
                    self.samples.is_some(),
                    self.forward_t.is_some(),
                    self.diffusion_seed.is_some(),
                    self.no_clip,
                ];
                if given.iter().any(|&g| g) {
                    return Err(Error::InvalidArgument(format!(
                        "PG-DiffSeg sampling flags (--start, --inversion-steps, --sampling-steps, --eta, --samples, --forward-t, \
                         --diffusion-seed, --no-clip) were given, but this is a '{}' model, which does not sample",
                        model.meta.kind.name()
                    )));
                }
                None
            }
        };
        Ok(SegmentOptions {
            tile: self.tile.map(|t| [t, t]),
            step_fraction: self.step,
            batch_size: self.batch,
            mirror: self.mirror,
            diffusion,
        })
    }
}

#[derive(Args)]
struct SegmentArgs {
    #[arg(long, short)]
    model: PathBuf,
    /// A TIFF file or a folder of TIFF files.
    #[arg(long, short)]
    input: PathBuf,
    /// Output folder for NAME_mask.tif (and NAME_prob.tif); with --instances, NAME.tif
    /// (instance labels) and NAME.csv (one row per cell).
    #[arg(long, short)]
    out: PathBuf,
    /// Also write class probabilities as a float32 stack.
    #[arg(long)]
    probabilities: bool,
    /// Write instance labels (uint16, or uint32 past 65,535 cells) and a measurement table
    /// per image instead of the class mask.
    #[arg(long)]
    instances: bool,
    /// With --instances: objects smaller than this many pixels are removed.
    #[arg(long, default_value_t = 10)]
    min_size: usize,
    #[command(flatten)]
    measure: MeasureArgs,
    #[command(flatten)]
    tiles: TileArgs,
}

/// What the measurements need to know about the pixels.
#[derive(Args, Clone)]
struct MeasureArgs {
    /// Pixel size in µm (default: from the image's TIFF metadata, if it states one).
    #[arg(long)]
    pixel_size: Option<f64>,
    /// Illumination wavelength in nm, for the dry mass of a phase image in radians.
    #[arg(long)]
    wavelength: Option<f64>,
    /// Specific refraction increment α in µm³/pg, for the dry mass.
    #[arg(long, default_value_t = lumos::engine::measure::DEFAULT_ALPHA_UM3_PER_PG)]
    alpha: f64,
    /// The phase channel, by index or name (default: the channel named "phase", or the only
    /// channel).
    #[arg(long)]
    phase_channel: Option<String>,
}

impl MeasureArgs {
    fn options(&self, image_path: &Path, img: &lumos::Image) -> Result<lumos::engine::measure::MeasureOptions> {
        use lumos::engine::measure::{MeasureOptions, check_positive};
        let pixel_size_um = match self.pixel_size {
            Some(p) => Some(check_positive("--pixel-size", "µm", p)?),
            None => tiff::pixel_size_um(image_path)?,
        };
        let wavelength_um =
            self.wavelength.map(|l| check_positive("--wavelength", "nm", l).map(|l| l / 1000.0)).transpose()?;
        let phase_channel = match &self.phase_channel {
            None => None,
            Some(s) => Some(match s.parse::<usize>() {
                Ok(i) => i,
                Err(_) => img.channel_names.iter().position(|n| n == s).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "--phase-channel '{s}' is not one of the channels {:?}",
                        img.channel_names
                    ))
                })?,
            }),
        };
        Ok(MeasureOptions { pixel_size_um, wavelength_um, alpha_um3_per_pg: self.alpha, phase_channel })
    }
}

#[derive(Args)]
struct MeasureCmdArgs {
    /// An instance label image, or a folder of them (NAME.tif, matched to the images by name).
    #[arg(long, short)]
    labels: PathBuf,
    /// The image to measure intensities on (a file, or a folder of NAME.tif); optional.
    #[arg(long, short)]
    image: Option<PathBuf>,
    /// Output CSV file (a single label image) or folder (default: beside each label image,
    /// NAME.csv).
    #[arg(long, short)]
    out: Option<PathBuf>,
    #[command(flatten)]
    measure: MeasureArgs,
}

#[derive(Args)]
struct EvaluateArgs {
    #[arg(long, short)]
    model: PathBuf,
    /// Labelled folder (DIR/images + DIR/masks); for simulated data use DIR/test.
    #[arg(long, short)]
    data: PathBuf,
    /// Write the per-image and summary scores as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    tiles: TileArgs,
}

#[derive(Args)]
struct InfoArgs {
    model: PathBuf,
    /// Print the full metadata as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// Output folder.
    #[arg(long, short, default_value = "demo-output")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Training epochs (the demo's default fits a few minutes on 2 CPU cores).
    #[arg(long, default_value_t = 12)]
    epochs: usize,
    #[arg(long, default_value_t = 25)]
    iterations: usize,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() {
    let cli = Cli::parse();
    env_logger::Builder::new().parse_filters(&cli.log).init();
    let r = match cli.cmd {
        Cmd::Simulate(a) => simulate(a),
        Cmd::Train(a) => train_cmd(a),
        Cmd::Segment(a) => segment(a),
        Cmd::Evaluate(a) => evaluate(a).map(|_| ()),
        Cmd::Measure(a) => measure_cmd(a),
        Cmd::Info(a) => info(a),
        Cmd::Demo(a) => demo(a),
        Cmd::Decompose(a) => decompose(a),
        Cmd::Export(a) => export_cmd(a),
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(match e {
            Error::Cancelled => 130,
            _ => 1,
        });
    }
}

/// The split folders `OUT/train` and `OUT/test` must be empty or absent (a simulation
/// writes a fixed number of files; older ones would stay and mix in), unless `force`, which
/// removes them and the manifest first.
fn prepare_simulation_folder(out: &Path, force: bool) -> Result<()> {
    for split in ["train", "test"] {
        let d = out.join(split);
        let used = std::fs::read_dir(&d).map(|mut r| r.next().is_some()).unwrap_or(false);
        if !used {
            continue;
        }
        if !force {
            return Err(Error::InvalidArgument(format!(
                "'{}' already holds files of an earlier simulation; choose another --out, or pass --force to replace them",
                d.display()
            )));
        }
        std::fs::remove_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    }
    if force {
        let manifest = out.join("simulation.json");
        if manifest.is_file() {
            std::fs::remove_file(&manifest).map_err(|e| Error::io(&manifest, e))?;
        }
    }
    Ok(())
}

fn simulate(a: SimulateArgs) -> Result<()> {
    prepare_simulation_folder(&a.out, a.force)?;
    // a flag given wins; without one, the config file's value, else the CLI's default
    let size = |config_size: usize| a.size.unwrap_or(if a.config.is_some() { config_size } else { 256 });
    if let Modality::Qpi = a.modality {
        let mut cfg: lumos::sim::qpi::QpiConfig = match &a.config {
            Some(p) => serde_json::from_str(&std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?)
                .map_err(|e| Error::Config(format!("{}: {e}", p.display())))?,
            None => lumos::sim::qpi::QpiConfig::default(),
        };
        cfg.size = size(cfg.size);
        let t = Instant::now();
        let [tr, te] = lumos::sim::qpi::write_dataset(&a.out, a.train, a.test, &cfg, a.seed)?;
        println!(
            "simulated {} training and {} test QPI frames ({}x{}, background / live / dead) into {} in {:.1} s",
            tr.len(),
            te.len(),
            cfg.size,
            cfg.size,
            a.out.display(),
            t.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    if let Modality::Fluo = a.modality {
        let mut cfg: FluoConfig = match &a.config {
            Some(p) => serde_json::from_str(&std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?)
                .map_err(|e| Error::Config(format!("{}: {e}", p.display())))?,
            None => FluoConfig::default(),
        };
        cfg.size = size(cfg.size);
        match (a.pair, a.config.is_some()) {
            (Some(p), _) => cfg.pair = p.pair(),
            (None, false) => cfg.pair = PairArg::ActinTubulin.pair(),
            (None, true) => {}
        }
        let t = Instant::now();
        let [tr, te] = lumos::sim::fluo::write_dataset(&a.out, a.train, a.test, &cfg, a.seed)?;
        println!(
            "simulated {} training and {} test fluorescence frames ({}x{}, {} + {}) into {} in {:.1} s",
            tr.len(),
            te.len(),
            cfg.size,
            cfg.size,
            cfg.pair.channel_names()[0],
            cfg.pair.channel_names()[1],
            a.out.display(),
            t.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let mut cfg: SsqpmConfig = match &a.config {
        Some(p) => serde_json::from_str(&std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?)
            .map_err(|e| Error::Config(format!("{}: {e}", p.display())))?,
        None => SsqpmConfig::default(),
    };
    cfg.size = size(cfg.size);
    let confluence = match (a.confluence, a.config.is_some()) {
        (Some(c), _) => Some(c),
        (None, false) => Some(ConfluenceArg::Mixed),
        (None, true) => None,
    };
    if let Some(c) = confluence {
        cfg.confluence = match c {
            ConfluenceArg::Low => Confluence::Low,
            ConfluenceArg::Medium => Confluence::Medium,
            ConfluenceArg::High => Confluence::High,
            ConfluenceArg::Mixed => Confluence::Mixed,
        };
    }
    let t = Instant::now();
    let s = ssqpm::write_dataset(&a.out, a.train, a.test, &cfg, a.seed)?;
    println!(
        "simulated {} training and {} test ssQPM images ({}x{}) into {} in {:.1} s",
        s.train.len(),
        s.test.len(),
        cfg.size,
        cfg.size,
        a.out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Prints a line above the bar, or plainly when the bar is hidden (output not a terminal,
/// as in logs and CI), so results still reach the log.
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

/// A progress bar for training, driven by the engine's progress events.
fn train_progress(cfg: &TrainConfig) -> (ProgressBar, impl FnMut(&Progress)) {
    // PG-DiffSeg runs its autoencoder epochs first; its events count them in `epochs`
    let epochs = if cfg.kind.eq_ignore_ascii_case("pgdiff") {
        cfg.epochs.saturating_add(cfg.pgdiff.ae_epochs)
    } else {
        cfg.epochs
    };
    let total = (epochs as u64).saturating_mul(cfg.iterations_per_epoch as u64);
    // muSplit validates by PSNR (dB), the segmentation kinds by Dice
    let metric = if cfg.kind.eq_ignore_ascii_case("musplit") { "val PSNR" } else { "val Dice" };
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} it  {msg}")
            .expect("template")
            .progress_chars("##-"),
    );
    let b = bar.clone();
    let mut last_val = f64::NAN;
    let f = move |p: &Progress| match p.stage {
        Stage::Training => {
            b.set_position((p.epoch * p.iterations + p.iteration + 1) as u64);
            b.set_message(format!("epoch {}/{} loss {:.3} {metric} {:.3}", p.epoch + 1, p.epochs, p.loss, last_val));
        }
        Stage::Validation => {
            last_val = p.val_metric;
            say(
                &b,
                format!(
                    "epoch {:>3}/{}  train loss {:.4}  {metric} {:.4}",
                    p.epoch + 1,
                    p.epochs,
                    p.loss,
                    p.val_metric
                ),
            );
        }
        _ => {}
    };
    (bar, f)
}

fn train_cmd(a: TrainArgs) -> Result<()> {
    let mut cfg = match (&a.config, &a.recipe) {
        (Some(p), _) => TrainConfig::from_json(&std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?)?,
        (None, Some(r)) => lumos::recipes::recipe(r, &a.size)?,
        (None, None) => TrainConfig::default(),
    };
    if let Some(v) = a.epochs {
        cfg.epochs = v;
    }
    if let Some(v) = a.iterations {
        cfg.iterations_per_epoch = v;
    }
    if let Some(v) = a.batch_size {
        cfg.batch_size = v;
    }
    if let Some(v) = a.patch {
        cfg.patch_size = [v, v];
    }
    if let Some(v) = a.device {
        cfg.device = v;
    }
    if let Some(v) = a.seed {
        cfg.seed = v;
    }
    if let Some(v) = a.kind {
        cfg.kind = v;
        // muSplit trains on 64 x 64 patches unless told otherwise
        if cfg.kind.eq_ignore_ascii_case("musplit") && a.config.is_none() && a.recipe.is_none() && a.patch.is_none() {
            cfg.patch_size = [64, 64];
        }
        if lumos::engine::model::ModelKind::parse(&cfg.kind)? == lumos::engine::model::ModelKind::Pgdiff
            && a.config.is_none()
            && a.recipe.is_none()
        {
            let (pc, patch) = match a.pgdiff_preset.as_str() {
                "paper" => (lumos::pgdiff::PgDiffConfig::default(), 256),
                "cpu" => (lumos::pgdiff::PgDiffConfig::cpu(), 128),
                "tiny" => (lumos::pgdiff::PgDiffConfig::tiny(), 32),
                o => {
                    return Err(Error::InvalidArgument(format!("--pgdiff-preset '{o}'; expected paper, cpu or tiny")));
                }
            };
            cfg.pgdiff = pc;
            if a.patch.is_none() {
                cfg.patch_size = [patch, patch];
            }
        }
        cfg.validate()?;
    }
    cfg.resume |= a.resume;
    if let Some(m) = &a.masks {
        cfg.masks = serde_json::from_value(serde_json::Value::String(m.clone()))
            .map_err(|_| Error::InvalidArgument(format!("--masks '{m}'; expected auto, classes or instances")))?;
    }
    if let Some(t) = &a.instance_targets {
        cfg.instance_targets = serde_json::from_value(serde_json::Value::String(t.clone())).map_err(|_| {
            Error::InvalidArgument(format!("--instance-targets '{t}'; expected boundary or foreground"))
        })?;
    }
    cfg.validate()?;
    let (bar, mut f) = train_progress(&cfg);
    let mut mon = Monitor { progress: Some(&mut f), cancel: None };
    let out = train(&cfg, &a.data, &a.out, &mut mon)?;
    bar.finish_and_clear();
    println!(
        "trained {} ({} parameters) on {} in {:.1} s -> {}",
        out.model.meta.kind.name(),
        out.model.n_parameters(),
        out.model.meta.provenance.device,
        out.model.meta.provenance.wall_seconds,
        a.out.display()
    );
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out.history).expect("json"));
    }
    Ok(())
}

fn tiff_files(p: &Path) -> Result<Vec<PathBuf>> {
    if p.is_file() {
        return Ok(vec![p.to_path_buf()]);
    }
    let rd = std::fs::read_dir(p).map_err(|e| Error::io(p, e))?;
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("tif" | "tiff" | "TIF" | "TIFF")))
        .collect();
    v.sort();
    if v.is_empty() {
        return Err(Error::InvalidArgument(format!("'{}' holds no .tif files", p.display())));
    }
    Ok(v)
}

fn tile_bar(n: usize) -> ProgressBar {
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} images {msg}")
            .expect("template"),
    );
    bar
}

fn segment(a: SegmentArgs) -> Result<()> {
    let precision = Precision::parse(&a.tiles.precision)?;
    let model = Model::load(&a.model, parse_device(&a.tiles.device)?)?;
    model.set_precision(precision);
    let files = tiff_files(&a.input)?;
    // NAME_mask.tif per input: a.tif and a.tiff would overwrite each other's results
    let mut stems: Vec<&str> = files.iter().filter_map(|f| f.file_stem().and_then(|s| s.to_str())).collect();
    stems.sort_unstable();
    if let Some(w) = stems.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::InvalidArgument(format!(
            "two inputs are named '{}' (different extensions); their outputs would overwrite each other: rename one",
            w[0]
        )));
    }
    let opts = a.tiles.options(&model)?;
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    let bar = tile_bar(files.len());
    let mut table = Table::new();
    let header: &[&str] = if a.instances {
        &["image", "size", "foreground %", "cells", "seconds"]
    } else {
        &["image", "size", "foreground %", "seconds"]
    };
    table.load_preset(UTF8_FULL_CONDENSED).set_header(header.to_vec());
    for f in &files {
        let t = Instant::now();
        let img = tiff::read_image(f)?;
        let stem = f.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
        bar.set_message(stem.to_string());
        let (h, w) = (img.height(), img.width());
        let mut labels = lumos::Mask::zeros((h, w));
        let sampled = model.meta.kind == lumos::engine::model::ModelKind::Pgdiff;
        let probabilities = if a.probabilities {
            let mut p = ndarray::Array3::<f32>::zeros((model.n_classes(), h, w));
            model.segment(img.data.view(), &opts, SegmentOutput::Probabilities(p.view_mut()), &mut Monitor::none())?;
            Some(p)
        } else {
            None
        };
        match &probabilities {
            // one pass: the labels are the probabilities' argmax (first maximum on ties), as
            // the labels output computes them; a diffusion model samples its labels instead
            Some(p) if !sampled => {
                for ((y, x), l) in labels.indexed_iter_mut() {
                    let mut best = 0;
                    for k in 1..p.shape()[0] {
                        if p[[k, y, x]] > p[[best, y, x]] {
                            best = k;
                        }
                    }
                    *l = best as u8;
                }
            }
            _ => {
                model.segment(img.data.view(), &opts, SegmentOutput::Labels(labels.view_mut()), &mut Monitor::none())?
            }
        }
        let fg = labels.iter().filter(|&&v| v > 0).count() as f64 / (h * w) as f64 * 100.0;
        let mut cells = String::new();
        // all outputs computed before any is written
        if a.instances {
            let inst = lumos::engine::instances::instances_from_classes(
                &labels,
                model.n_classes(),
                model.meta.instances.as_ref(),
                &lumos::engine::instances::InstanceOptions { min_size: a.min_size },
            )?;
            let mopts = a.measure.options(f, &img)?;
            let measured = lumos::engine::measure::measure(
                &inst.labels,
                Some(&img),
                Some(&inst.classes),
                &model.meta.classes,
                &mopts,
            )?;
            tiff::write_labels(&a.out.join(format!("{stem}.tif")), &inst.labels)?;
            measured.save_csv(&a.out.join(format!("{stem}.csv")))?;
            cells = inst.count().to_string();
        } else {
            tiff::write_mask_u8(&a.out.join(format!("{stem}_mask.tif")), &labels)?;
        }
        if let Some(p) = probabilities {
            let im = lumos::Image::with_names(p, model.meta.classes.clone())?;
            tiff::write_image_f32(&a.out.join(format!("{stem}_prob.tif")), &im)?;
        }
        let mut row = vec![stem.to_string(), format!("{h}x{w}"), format!("{fg:.1}")];
        if a.instances {
            row.push(cells);
        }
        row.push(format!("{:.2}", t.elapsed().as_secs_f64()));
        table.add_row(row);
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!("{table}");
    if a.instances {
        println!("instance labels (NAME.tif) and measurements (NAME.csv) written to {}", a.out.display());
    } else {
        println!("masks written to {}", a.out.display());
    }
    Ok(())
}

/// Pairs each label image with its image (same name) when `image` is a folder.
fn measure_cmd(a: MeasureCmdArgs) -> Result<()> {
    let label_files = tiff_files(&a.labels)?;
    let single = a.labels.is_file();
    if let Some(o) = &a.out
        && !single
    {
        std::fs::create_dir_all(o).map_err(|e| Error::io(o, e))?;
    }
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(["labels", "objects", "table"]);
    for lf in &label_files {
        let stem = lf.file_stem().and_then(|s| s.to_str()).unwrap_or("labels").to_string();
        let labels = tiff::read_labels(lf)?.labels;
        let image_path = match &a.image {
            None => None,
            Some(p) if p.is_dir() => Some(
                ["tif", "tiff", "TIF", "TIFF"]
                    .iter()
                    .map(|e| p.join(format!("{stem}.{e}")))
                    .find(|c| c.is_file())
                    .ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "'{}' holds no image named '{stem}.tif' for '{}'",
                            p.display(),
                            lf.display()
                        ))
                    })?,
            ),
            Some(p) => Some(p.clone()),
        };
        let (img, mopts) = match &image_path {
            Some(ip) => {
                let img = tiff::read_image(ip)?;
                let o = a.measure.options(ip, &img)?;
                (Some(img), o)
            }
            None => {
                let mut o = a.measure.options(lf, &lumos::Image::new(ndarray::Array3::zeros((0, 1, 1))))?;
                if o.pixel_size_um.is_none() {
                    o.pixel_size_um = tiff::pixel_size_um(lf)?;
                }
                (None, o)
            }
        };
        let t = lumos::engine::measure::measure(&labels, img.as_ref(), None, &[], &mopts)
            .map_err(|e| Error::InvalidInput(format!("'{}': {e}", lf.display())))?;
        let out = match &a.out {
            Some(o) if single => o.clone(),
            Some(o) => o.join(format!("{stem}.csv")),
            None => lf.with_extension("csv"),
        };
        t.save_csv(&out)?;
        table.add_row([lf.display().to_string(), t.n_rows().to_string(), out.display().to_string()]);
    }
    println!("{table}");
    Ok(())
}

/// Per-image scores of a labelled folder, with the predictions.
struct Evaluation {
    names: Vec<String>,
    scores: Vec<ImageScores>,
    /// Per image, object counts at each of `metrics::IOU_THRESHOLDS`, when the truth holds
    /// instances (16-bit or wider masks, or DIR/instances); else empty.
    objects: Vec<Vec<metrics::ObjectCounts>>,
    preds: Vec<lumos::Mask>,
    seconds: Vec<f64>,
}

/// The classes Dice is scored over: the model's, less a `boundary` class of instances.
fn cell_classes(model: &Model) -> usize {
    model.n_classes() - usize::from(model.meta.instances.is_some_and(|s| s.boundary_class.is_some()))
}

/// The truth of one test image: class labels, and instance labels when it has them.
fn read_truth(mask: &Path, name: &str) -> Result<(lumos::Mask, Option<lumos::image::Labels>)> {
    let inst_file = mask.parent().and_then(Path::parent).map(|d| d.join("instances").join(format!("{name}.tif")));
    let read = tiff::read_labels(mask)?;
    if read.wide {
        // the mask is the instance image: every cell is class 1
        let classes = read.labels.mapv(|v| u8::from(v != 0));
        return Ok((classes, Some(read.labels)));
    }
    let classes = tiff::read_mask(mask)?;
    let inst = match inst_file {
        Some(f) if f.is_file() => Some(tiff::read_labels(&f)?.labels),
        _ => None,
    };
    Ok((classes, inst))
}

fn evaluate_folder(model: &Model, data: &Path, opts: &SegmentOptions) -> Result<Evaluation> {
    let pairs = list_pairs(data)?;
    let bar = tile_bar(pairs.len());
    let mut ev = Evaluation { names: vec![], scores: vec![], objects: vec![], preds: vec![], seconds: vec![] };
    let k = cell_classes(model);
    for (name, ip, mp) in pairs {
        bar.set_message(name.clone());
        let img = tiff::read_image(&ip)?;
        let (truth, truth_inst) = read_truth(&mp, &name)?;
        let t = Instant::now();
        let mut pred = model.segment_labels(img.data.view(), opts)?;
        let pred_inst = if truth_inst.is_some() || model.meta.instances.is_some() {
            let inst = lumos::engine::instances::instances_from_classes(
                &pred,
                model.n_classes(),
                model.meta.instances.as_ref(),
                &Default::default(),
            )?;
            if model.meta.instances.is_some() {
                // pixel scores of an instance model: each cell painted with its class
                pred = inst.labels.mapv(|l| if l == 0 { 0 } else { inst.classes[l as usize - 1] });
            }
            Some(inst)
        } else {
            None
        };
        ev.seconds.push(t.elapsed().as_secs_f64());
        ev.scores.push(
            metrics::score(&pred, &truth, k).map_err(|e| Error::InvalidInput(format!("'{}': {e}", mp.display())))?,
        );
        if let (Some(ti), Some(pi)) = (&truth_inst, &pred_inst) {
            ev.objects.push(metrics::match_objects(ti, &pi.labels, &metrics::IOU_THRESHOLDS)?);
        }
        ev.preds.push(pred);
        ev.names.push(name);
        bar.inc(1);
    }
    bar.finish_and_clear();
    if ev.objects.len() != ev.names.len() {
        ev.objects.clear();
    }
    Ok(ev)
}

/// Object scores over all images at each IoU threshold (counts summed, then divided).
fn object_summary(ev: &Evaluation) -> Vec<metrics::ObjectScores> {
    let Some(first) = ev.objects.first() else { return vec![] };
    (0..first.len())
        .map(|i| {
            let mut c = metrics::ObjectCounts {
                threshold: first[i].threshold,
                n_true: 0,
                n_pred: 0,
                tp: 0,
                sum_matched_iou: 0.0,
            };
            for img in &ev.objects {
                c.add(&img[i]);
            }
            c.scores()
        })
        .collect()
}

fn object_table(scores: &[metrics::ObjectScores]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "IoU ≥",
        "true",
        "pred",
        "TP",
        "FP",
        "FN",
        "precision",
        "recall",
        "F1",
        "AP",
        "matched IoU",
        "PQ",
    ]);
    for s in scores {
        table.add_row([
            format!("{:.2}", s.threshold),
            s.n_true.to_string(),
            s.n_pred.to_string(),
            s.tp.to_string(),
            s.fp.to_string(),
            s.fn_.to_string(),
            format!("{:.3}", s.precision),
            format!("{:.3}", s.recall),
            format!("{:.3}", s.f1),
            format!("{:.3}", s.ap),
            format!("{:.3}", s.mean_matched_iou),
            format!("{:.3}", s.pq),
        ]);
    }
    table
}

fn score_table(model: &Model, ev: &Evaluation) -> (Table, metrics::Summary) {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(["image", "Dice", "IoU", "seconds"]);
    for ((n, s), t) in ev.names.iter().zip(&ev.scores).zip(&ev.seconds) {
        table.add_row([
            n.clone(),
            format!("{:.4}", s.mean_fg_dice()),
            format!("{:.4}", s.mean_fg_iou()),
            format!("{t:.2}"),
        ]);
    }
    let sum = metrics::summarize(&ev.scores);
    table.add_row(["mean ± std".to_string(), sum.mean_fg_dice.to_string(), sum.mean_fg_iou.to_string(), String::new()]);
    if cell_classes(model) > 2 {
        for (k, c) in model.meta.classes.iter().take(cell_classes(model)).enumerate() {
            table.add_row([
                format!("class {c}"),
                sum.dice_per_class[k].to_string(),
                sum.iou_per_class[k].to_string(),
                String::new(),
            ]);
        }
    }
    (table, sum)
}

fn evaluation_json(model_path: &Path, data: &Path, ev: &Evaluation, sum: &metrics::Summary) -> serde_json::Value {
    let mut v = serde_json::json!({
        "model": model_path.display().to_string(),
        "data": data.display().to_string(),
        "images": ev.names.iter().zip(&ev.scores).zip(&ev.seconds).enumerate().map(|(i, ((n, s), t))| {
            let mut img = serde_json::json!({
                "name": n, "dice": s.mean_fg_dice(), "iou": s.mean_fg_iou(), "per_class": s.classes, "seconds": t,
            });
            if let Some(o) = ev.objects.get(i) {
                img["objects"] = serde_json::json!(o.iter().map(metrics::ObjectCounts::scores).collect::<Vec<_>>());
            }
            img
        }).collect::<Vec<_>>(),
        "summary": sum,
    });
    if !ev.objects.is_empty() {
        v["objects"] = serde_json::json!({
            "matching": "one-to-one by IoU >= threshold, greedy by decreasing IoU (unique above IoU 0.5, as StarDist's matching); counts summed over images",
            "ap_definition": "TP / (TP + FP + FN)",
            "thresholds": object_summary(ev),
        });
    }
    v
}

fn evaluate(a: EvaluateArgs) -> Result<metrics::Summary> {
    let precision = Precision::parse(&a.tiles.precision)?;
    let model = Model::load(&a.model, parse_device(&a.tiles.device)?)?;
    model.set_precision(precision);
    let ev = evaluate_folder(&model, &a.data, &a.tiles.options(&model)?)?;
    let (table, sum) = score_table(&model, &ev);
    println!("{table}");
    if !ev.objects.is_empty() {
        println!("objects (one-to-one matching by IoU, counts over all images):");
        println!("{}", object_table(&object_summary(&ev)));
    }
    if let Some(j) = &a.json {
        let v = evaluation_json(&a.model, &a.data, &ev, &sum);
        lumos::engine::weights::write_atomic(j, serde_json::to_string_pretty(&v).expect("json").as_bytes())?;
    }
    Ok(sum)
}

fn export_cmd(a: ExportArgs) -> Result<()> {
    use lumos::export::{ExportOptions, Person, export_bioimageio};
    let tile = match &a.tile {
        None => None,
        Some(t) => {
            let v: Vec<usize> = t
                .split(['x', 'X', ','])
                .map(|p| p.trim().parse::<usize>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| {
                    lumos::Error::InvalidArgument(format!("--tile '{t}': expected HxW, for example 256x256"))
                })?;
            match v[..] {
                [h, w] => Some([h, w]),
                [s] => Some([s, s]),
                _ => {
                    return Err(lumos::Error::InvalidArgument(format!(
                        "--tile '{t}': expected HxW, for example 256x256"
                    )));
                }
            }
        }
    };
    let opts = ExportOptions {
        name: a.name,
        description: a.description,
        authors: a.authors.iter().map(|s| Person::parse(s)).collect::<Result<_>>()?,
        maintainers: a
            .maintainers
            .iter()
            .map(|g| Person { name: g.clone(), github_user: Some(g.clone()), ..Default::default() })
            .collect(),
        license: a.license,
        tags: a.tags,
        git_repo: a.git_repo,
        version: a.version,
        tile,
        sample: a.sample,
        sample_seed: 0,
    };
    let r = export_bioimageio(&a.model, &a.out, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r).expect("json"));
    } else {
        println!(
            "exported {} -> {} (input {:?}, output {:?}; exported graph vs engine: max difference {:.2e})",
            a.model.display(),
            r.path.display(),
            r.input_shape,
            r.output_shape,
            r.self_check
        );
    }
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    let model = Model::load(&a.model, tch::Device::Cpu)?;
    let m = &model.meta;
    if a.json {
        println!("{}", serde_json::to_string_pretty(m).expect("json"));
        return Ok(());
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.add_row(["kind", m.kind.name()]);
    t.add_row(["format version".to_string(), m.format_version.to_string()]);
    t.add_row(["input channels".to_string(), m.input_channels.join(", ")]);
    t.add_row(["classes".to_string(), m.classes.join(", ")]);
    t.add_row(["patch size".to_string(), format!("{} x {}", m.patch_size[0], m.patch_size[1])]);
    t.add_row(["parameters".to_string(), model.n_parameters().to_string()]);
    t.add_row(["architecture".to_string(), m.architecture.to_string()]);
    t.add_row(["normalization".to_string(), serde_json::to_string(&m.normalization).expect("json")]);
    let p = &m.provenance;
    t.add_row([
        "trained".to_string(),
        format!(
            "{} epochs on {} (seed {}, {:.0} s, lumos {})",
            p.epochs_completed, p.device, p.seed, p.wall_seconds, p.lumos_version
        ),
    ]);
    t.add_row([
        "data".to_string(),
        format!("{} ({} train / {} validation images)", p.data, p.train_images.len(), p.val_images.len()),
    ]);
    t.add_row(["validation Dice".to_string(), p.val_dice.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into())]);
    if let Some(i) = &m.instances {
        t.add_row([
            "instances".to_string(),
            format!("trained from instance masks ({} targets); segment --instances separates cells", i.targets.name()),
        ]);
    }
    println!("{t}");
    Ok(())
}

fn demo(a: DemoArgs) -> Result<()> {
    let t0 = Instant::now();
    let device = parse_device(&a.device)?;
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    let data = a.out.join("data");
    let cfg = TrainConfig {
        unet: lumos::nnunet::net::UnetConfig { n_stages: 5, base_features: 16, max_features: 256, convs_per_stage: 2 },
        epochs: a.epochs,
        iterations_per_epoch: a.iterations,
        batch_size: 4,
        patch_size: [128, 128],
        seed: a.seed,
        device: device_name(device),
        ..Default::default()
    };
    // bad settings fail before minutes of simulation
    cfg.validate()?;
    println!("1/4 simulating ssQPM data (24 training + 6 test images, 256x256, low/medium/high confluence) ...");
    let sim_cfg = SsqpmConfig { size: 256, confluence: Confluence::Mixed, ..Default::default() };
    // the demo owns OUT/data: an earlier run's files are replaced, never mixed in
    if data.exists() {
        std::fs::remove_dir_all(&data).map_err(|e| Error::io(&data, e))?;
    }
    ssqpm::write_dataset(&data, 24, 6, &sim_cfg, a.seed)?;

    println!("2/4 training a 5-channel nnU-Net (early fusion) on {} ...", device_name(device));
    let model_path = a.out.join("ssqpm_unet.lumos");
    let (bar, mut f) = train_progress(&cfg);
    let mut mon = Monitor { progress: Some(&mut f), cancel: None };
    let outcome = train(&cfg, &data.join("train"), &model_path, &mut mon)?;
    bar.finish_and_clear();
    let model = outcome.model;

    println!("3/4 segmenting the 6 held-out test images ...");
    let test = data.join("test");
    let opts = SegmentOptions::default();
    let ev = evaluate_folder(&model, &test, &opts)?;
    let masks_dir = a.out.join("masks");
    std::fs::create_dir_all(&masks_dir).map_err(|e| Error::io(&masks_dir, e))?;
    let mut pics = Vec::new();
    for ((name, pred), (_, ip, mp)) in ev.names.iter().zip(&ev.preds).zip(list_pairs(&test)?) {
        tiff::write_mask_u8(&masks_dir.join(format!("{name}_mask.tif")), pred)?;
        let img = tiff::read_image(&ip)?;
        let truth = tiff::read_mask(&mp)?;
        let phase = img.data.index_axis(ndarray::Axis(0), img.channels() - 1);
        pics.push(overlay::overlay(phase, pred, Some(&truth)));
    }
    let overlay_path = a.out.join("overlay.png");
    overlay::write_png(&overlay_path, &overlay::montage(&pics, 3)?)?;

    println!("4/4 results on the held-out test images (model never saw them):");
    let (table, sum) = score_table(&model, &ev);
    println!("{table}");
    let results = serde_json::json!({
        "what": "lumos demo: 5-channel nnU-Net (early fusion) on simulated ssQPM",
        "simulator": sim_cfg,
        "seed": a.seed,
        "split": {"train": 24 - model.meta.provenance.val_images.len(), "validation": model.meta.provenance.val_images.len(), "test": 6},
        "train_config": cfg,
        "device": device_name(device),
        "threads": tch::get_num_threads(),
        "training_seconds": model.meta.provenance.wall_seconds,
        "total_seconds": t0.elapsed().as_secs_f64(),
        "test": evaluation_json(&model_path, &test, &ev, &sum),
        "mean_dice": sum.mean_fg_dice.mean,
        "mean_iou": sum.mean_fg_iou.mean,
    });
    let results_path = a.out.join("results.json");
    lumos::engine::weights::write_atomic(
        &results_path,
        serde_json::to_string_pretty(&results).expect("json").as_bytes(),
    )?;
    println!(
        "mean Dice {}  mean IoU {}  (6 held-out simulated test images, seed {}, {:.0} s in all)",
        sum.mean_fg_dice,
        sum.mean_fg_iou,
        a.seed,
        t0.elapsed().as_secs_f64()
    );
    println!(
        "wrote {}, {}, {} and {}",
        model_path.display(),
        masks_dir.display(),
        overlay_path.display(),
        results_path.display()
    );
    Ok(())
}

fn decompose(a: DecomposeArgs) -> Result<()> {
    let precision = Precision::parse(&a.precision)?;
    let model = Model::load(&a.model, parse_device(&a.device)?)?;
    model.set_precision(precision);
    model.check_decompose()?;
    let patch = model.meta.patch_size[0];
    let mut opts = match a.padding.as_str() {
        "inner" => DecomposeOptions::default(),
        "outer" => DecomposeOptions::outer_padding(patch, 4),
        o => {
            return Err(Error::InvalidArgument(format!("--padding {o}; expected inner or outer")));
        }
    };
    if let Some(t) = a.tile {
        opts.tile = Some(t);
        opts.keep = None;
    }
    if let Some(k) = a.keep {
        opts.keep = Some(k);
    }
    opts.samples = a.samples;
    opts.seed = a.seed;
    opts.mirror = a.mirror;
    opts.batch_size = a.batch;
    let files = tiff_files(&a.input)?;
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    let bar = tile_bar(files.len());
    let ch = &model.meta.classes;
    let mut header = vec!["image".to_string(), "size".into(), "seconds".into()];
    if a.truth.is_some() {
        for m in ["PSNR", "RI-PSNR", "SSIM"] {
            for c in ch {
                header.push(format!("{m} {c}"));
            }
        }
    }
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(header);
    let mut all = Vec::new();
    for f in &files {
        let t = Instant::now();
        let img = tiff::read_image(f)?;
        if img.channels() != 1 {
            return Err(Error::Shape(format!(
                "'{}' has {} channels; decompose takes single-channel images",
                f.display(),
                img.channels()
            )));
        }
        let stem = f.file_stem().and_then(|s| s.to_str()).unwrap_or("image").to_string();
        bar.set_message(stem.clone());
        let pred = model.decompose_array(img.data.index_axis(ndarray::Axis(0), 0), &opts)?;
        let secs = t.elapsed().as_secs_f64();
        let mut row = vec![stem.clone(), format!("{}x{}", img.height(), img.width()), format!("{secs:.2}")];
        if let Some(truth_dir) = &a.truth {
            let tp = truth_dir.join(format!("{stem}.tif"));
            let truth = tiff::read_image(&tp)?;
            let s = metrics::split_scores(truth.data.view(), pred.view())?;
            row.extend(
                s.psnr
                    .iter()
                    .chain(&s.ri_psnr)
                    .map(|v| format!("{v:.2}"))
                    .chain(s.ssim.iter().map(|v| format!("{v:.3}"))),
            );
            all.push(s);
        }
        tiff::write_image_f32(&a.out.join(format!("{stem}_split.tif")), &lumos::Image::with_names(pred, ch.clone())?)?;
        table.add_row(row);
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!("{table}");
    if !all.is_empty() {
        for (i, c) in ch.iter().enumerate() {
            let p = metrics::mean_std(&all.iter().map(|s| s.psnr[i]).collect::<Vec<_>>());
            let q = metrics::mean_std(&all.iter().map(|s| s.ssim[i]).collect::<Vec<_>>());
            println!(
                "{c}: PSNR {:.2} ± {:.2} dB, SSIM {:.3} ± {:.3} over {} images",
                p.mean,
                p.std,
                q.mean,
                q.std,
                all.len()
            );
        }
    }
    println!("decompositions written to {}", a.out.display());
    Ok(())
}
