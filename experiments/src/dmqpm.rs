//! The DM-QPMNet paper's comparisons, re-run on simulated ssQPM data.
//!
//! Every variant (DM-QPMNet with fusion at stage 1 / 2 / 3, attention vs concatenation,
//! directed vs bidirectional attention; the 5-channel early-fusion nnU-Net, angles only,
//! phase only; and the leave-one-out modality ablation) is trained on the same training
//! images with the same budget (epochs x iterations x batch, same patch, same optimizer and
//! augmentation), once per seed, and scored on the same held-out test images. The report
//! gives Dice and IoU per test image and mean ± std, both pooled over test images and
//! seeds and as the spread of the per-seed means, with the parameter count and wall time
//! of every run and the machine it ran on.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use lumos::dmqpm::net::{DmQpmConfig, FusionOp, Variant};
use lumos::dmqpm::recipes::Preset;
use lumos::engine::dataset::load_folder;
use lumos::engine::metrics::{self, MeanStd};
use lumos::engine::progress::{Monitor, Progress, Stage};
use lumos::engine::train::{TrainConfig, evaluate_samples, train};
use lumos::error::{Error, Result};
use lumos::sim::ssqpm::{Confluence, SsqpmConfig, write_dataset};

/// Which variants to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VariantSet {
    /// DM-QPMNet at stage 2 against early fusion, angles only and phase only.
    Baselines,
    /// Baselines + fusion stage 1 / 3, concatenation, bidirectional attention.
    Main,
    /// Main + the leave-one-out modality ablation (each angle dropped in turn; dropping
    /// the phase is the angles-only baseline).
    All,
}

impl VariantSet {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "baselines" => Ok(VariantSet::Baselines),
            "main" => Ok(VariantSet::Main),
            "all" => Ok(VariantSet::All),
            o => Err(Error::Config(format!("unknown variant set '{o}'; expected baselines, main or all"))),
        }
    }
}

/// The variants of `set`, built on the size fields of `base`.
pub fn variants(set: VariantSet, base: &DmQpmConfig) -> Vec<DmQpmConfig> {
    let dual = |fusion_stage, fusion, bidirectional| DmQpmConfig {
        variant: Variant::Dual,
        fusion_stage,
        fusion,
        bidirectional,
        ..base.clone()
    };
    let early = |channels: Vec<usize>| DmQpmConfig { variant: Variant::EarlyFusion, channels, ..base.clone() };
    let mut v =
        vec![dual(2, FusionOp::Attention, false), early(vec![0, 1, 2, 3, 4]), early(vec![0, 1, 2, 3]), early(vec![4])];
    if set != VariantSet::Baselines {
        let last = base.n_stages.saturating_sub(2).min(3);
        for stage in [1, 3] {
            if stage <= last {
                v.push(dual(stage, FusionOp::Attention, false));
            }
        }
        v.push(dual(2, FusionOp::Concat, false));
        v.push(dual(2, FusionOp::Attention, true));
    }
    if set == VariantSet::All {
        // dropping the phase (channel 4) is the angles-only baseline, already in the list
        for drop in 0..4 {
            v.push(early((0..5).filter(|&c| c != drop).collect()));
        }
    }
    v
}

/// Everything a comparison run needs.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    pub preset: Preset,
    pub set: VariantSet,
    pub seeds: Vec<u64>,
    /// Existing data folder with train/ and test/; `None` simulates into `work/data`.
    pub data: Option<PathBuf>,
    /// Seed of the simulated data (independent of the training seeds).
    pub data_seed: u64,
    /// Models, checkpoints and logs.
    pub work: PathBuf,
    pub device: String,
    /// Overrides of the preset's budget.
    pub epochs: Option<usize>,
    pub iterations: Option<usize>,
}

/// One trained variant with one seed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    pub variant: String,
    pub architecture: DmQpmConfig,
    pub seed: u64,
    pub parameters: i64,
    pub train_seconds: f64,
    pub test_names: Vec<String>,
    pub dice: Vec<f64>,
    pub iou: Vec<f64>,
    pub mean_dice: f64,
    pub mean_iou: f64,
    pub final_train_loss: f64,
}

/// One variant over all seeds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantSummary {
    pub variant: String,
    pub parameters: i64,
    /// Pooled over test images and seeds.
    pub dice: MeanStd,
    pub iou: MeanStd,
    /// Spread of the per-seed mean Dice.
    pub dice_seed_means: MeanStd,
    pub train_seconds_mean: f64,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub preset: Preset,
    pub lumos_version: String,
    pub machine: String,
    pub device: String,
    pub threads: i32,
    pub seeds: Vec<u64>,
    pub data: String,
    pub simulator: Option<SsqpmConfig>,
    pub data_seed: u64,
    pub n_train: usize,
    pub n_test: usize,
    pub train_config: TrainConfig,
    pub runs: Vec<RunResult>,
    pub summary: Vec<VariantSummary>,
    pub wall_seconds: f64,
}

/// Runs the comparison; `on_run` is told about each finished run.
pub fn run(opts: &CompareOptions, monitor: &mut Monitor, mut on_run: impl FnMut(&RunResult)) -> Result<Report> {
    let t0 = Instant::now();
    if opts.seeds.is_empty() {
        return Err(Error::Config("the comparison needs at least one seed".into()));
    }
    std::fs::create_dir_all(&opts.work).map_err(|e| Error::io(&opts.work, e))?;
    let (n_train, n_test, size) = opts.preset.data_size();
    let (data, simulator) = match &opts.data {
        Some(d) => (d.clone(), None),
        None => {
            let d = opts.work.join("data");
            let cfg = SsqpmConfig { size, confluence: Confluence::Mixed, ..Default::default() };
            write_dataset(&d, n_train, n_test, &cfg, opts.data_seed)?;
            (d, Some(cfg))
        }
    };
    let test = load_folder(&data.join("test"))?;
    let test_refs: Vec<_> = test.iter().collect();
    let n_train = load_folder(&data.join("train"))?.len();
    let (mut tc, base) = opts.preset.recipe();
    tc.kind = "dmqpm".into();
    tc.device = opts.device.clone();
    tc.val_fraction = 0.0; // the paper: 24 training, 6 held-out test images, no validation split
    if let Some(e) = opts.epochs {
        tc.epochs = e;
    }
    if let Some(i) = opts.iterations {
        tc.iterations_per_epoch = i;
    }
    let vars = variants(opts.set, &base);
    let mut runs = Vec::new();
    for (vi, arch) in vars.iter().enumerate() {
        for &seed in &opts.seeds {
            monitor.check()?;
            let label = arch.label();
            let cfg = TrainConfig { dmqpm: arch.clone(), seed, ..tc.clone() };
            let file = opts.work.join("models").join(format!("v{vi:02}_seed{seed}.lumos"));
            std::fs::create_dir_all(file.parent().expect("parent")).map_err(|e| Error::io(&opts.work, e))?;
            log::info!("training '{label}' seed {seed}");
            let t = Instant::now();
            let outcome = train(&cfg, &data.join("train"), &file, monitor)?;
            let train_seconds = t.elapsed().as_secs_f64();
            let scores = evaluate_samples(&outcome.model, &test_refs)?;
            let dice: Vec<f64> = scores.iter().map(|s| s.mean_fg_dice()).collect();
            let iou: Vec<f64> = scores.iter().map(|s| s.mean_fg_iou()).collect();
            let r = RunResult {
                variant: label,
                architecture: arch.clone(),
                seed,
                parameters: outcome.model.n_parameters(),
                train_seconds,
                test_names: test.iter().map(|s| s.name.clone()).collect(),
                mean_dice: metrics::mean(&dice),
                mean_iou: metrics::mean(&iou),
                dice,
                iou,
                final_train_loss: outcome.history.last().map(|h| h.train_loss).unwrap_or(f64::NAN),
            };
            monitor.emit(Progress {
                stage: Stage::Validation,
                val_metric: r.mean_dice,
                ..Progress::new(Stage::Validation)
            });
            on_run(&r);
            runs.push(r);
        }
    }
    let summary = vars
        .iter()
        .map(|arch| {
            let label = arch.label();
            let rs: Vec<&RunResult> = runs.iter().filter(|r| r.variant == label).collect();
            let all_d: Vec<f64> = rs.iter().flat_map(|r| r.dice.iter().copied()).collect();
            let all_i: Vec<f64> = rs.iter().flat_map(|r| r.iou.iter().copied()).collect();
            VariantSummary {
                variant: label,
                parameters: rs[0].parameters,
                dice: metrics::mean_std(&all_d),
                iou: metrics::mean_std(&all_i),
                dice_seed_means: metrics::mean_std(&rs.iter().map(|r| r.mean_dice).collect::<Vec<_>>()),
                train_seconds_mean: metrics::mean(&rs.iter().map(|r| r.train_seconds).collect::<Vec<_>>()),
            }
        })
        .collect();
    Ok(Report {
        preset: opts.preset,
        lumos_version: env!("CARGO_PKG_VERSION").into(),
        machine: lumos::engine::device::machine_description(),
        device: tc.device.clone(),
        threads: tch::get_num_threads(),
        seeds: opts.seeds.clone(),
        data: data.display().to_string(),
        simulator,
        data_seed: opts.data_seed,
        n_train,
        n_test: test.len(),
        train_config: tc,
        runs,
        summary,
        wall_seconds: t0.elapsed().as_secs_f64(),
    })
}

impl Report {
    /// The report as a Markdown document (tables and the settings behind them).
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let tc = &self.train_config;
        s.push_str("# DM-QPMNet comparison on simulated ssQPM\n\n");
        s.push_str(&format!(
            "Preset `{:?}`; {} training and {} held-out test images ({}); seeds {:?}; \
             budget per run: {} epochs x {} iterations x batch {} on {}x{} patches, SGD Nesterov lr {} poly, \
             nnU-Net augmentation, per-modality normalization (angles: training-set z-score; phase: robust quantiles). \
             Machine: {}; device {}; {} libtorch threads; lumos {}; {:.0} s in all.\n\n",
            self.preset,
            self.n_train,
            self.n_test,
            match &self.simulator {
                Some(c) => format!(
                    "simulated with the lumos ssQPM simulator, {}x{}, mixed confluence, data seed {}",
                    c.size, c.size, self.data_seed
                ),
                None => format!("from {}", self.data),
            },
            self.seeds,
            tc.epochs,
            tc.iterations_per_epoch,
            tc.batch_size,
            tc.patch_size[0],
            tc.patch_size[1],
            tc.learning_rate,
            self.machine,
            self.device,
            self.threads,
            self.lumos_version,
            self.wall_seconds
        ));
        s.push_str(
            "Dice and IoU of the cell class. \"pooled\": mean ± std over all test images of all seeds \
                    (n = test images x seeds); \"over seeds\": mean ± std of the per-seed mean Dice.\n\n",
        );
        s.push_str("| variant | parameters | Dice (pooled) | IoU (pooled) | Dice (over seeds) | train s / run |\n");
        s.push_str("|---|---:|---|---|---|---:|\n");
        for v in &self.summary {
            s.push_str(&format!(
                "| {} | {} | {:.3} ± {:.3} | {:.3} ± {:.3} | {:.3} ± {:.3} | {:.0} |\n",
                v.variant,
                v.parameters,
                v.dice.mean,
                v.dice.std,
                v.iou.mean,
                v.iou.std,
                v.dice_seed_means.mean,
                v.dice_seed_means.std,
                v.train_seconds_mean
            ));
        }
        s.push_str("\n## Per test image (Dice, mean over seeds)\n\n");
        if let Some(first) = self.runs.first() {
            s.push_str("| variant |");
            for n in &first.test_names {
                s.push_str(&format!(" {n} |"));
            }
            s.push_str("\n|---|");
            s.push_str(&"---:|".repeat(first.test_names.len()));
            s.push('\n');
            for v in &self.summary {
                let rs: Vec<&RunResult> = self.runs.iter().filter(|r| r.variant == v.variant).collect();
                s.push_str(&format!("| {} |", v.variant));
                for i in 0..first.test_names.len() {
                    let m = metrics::mean(&rs.iter().map(|r| r.dice[i]).collect::<Vec<_>>());
                    s.push_str(&format!(" {m:.3} |"));
                }
                s.push('\n');
            }
        }
        s.push_str("\n## Every run\n\n| variant | seed | mean Dice | mean IoU | final train loss | train s |\n|---|---:|---:|---:|---:|---:|\n");
        for r in &self.runs {
            s.push_str(&format!(
                "| {} | {} | {:.4} | {:.4} | {:.4} | {:.0} |\n",
                r.variant, r.seed, r.mean_dice, r.mean_iou, r.final_train_loss, r.train_seconds
            ));
        }
        s
    }

    /// Writes `results.json` and `README.md` (the tables) into `dir`, atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        lumos::engine::weights::write_atomic(
            &dir.join("results.json"),
            serde_json::to_string_pretty(self).expect("json").as_bytes(),
        )?;
        lumos::engine::weights::write_atomic(&dir.join("README.md"), self.markdown().as_bytes())
    }
}
