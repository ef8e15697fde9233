//! The muSplit paper's comparisons, re-run on simulated two-structure fluorescence.
//!
//! Four models are trained with one budget (same data, patch, batch, iterations,
//! optimizer), once per seed: the U-Net and the hierarchical VAE, each without lateral
//! context (`lc_levels = 0`) and with it. Each trained model then decomposes the same
//! held-out frames twice: with inner padding (tile = the training patch, the central half
//! kept) and with outer padding (tiles 4x the training patch, all but a quarter patch of
//! margin kept). The report gives PSNR, range-invariant PSNR and SSIM per channel, as mean
//! ± std over seeds of the per-seed means over the test frames.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use lumos::engine::metrics::{self, MeanStd};
use lumos::engine::progress::Monitor;
use lumos::engine::train::train;
use lumos::error::{Error, Result};
use lumos::musplit::net::SplitVariant;
use lumos::musplit::recipes::SplitPreset;
use lumos::musplit::{DecomposeOptions, evaluate_split, load_split_folder};
use lumos::sim::fluo::{FluoConfig, StructurePair, write_dataset};

/// What to run.
#[derive(Debug, Clone)]
pub struct SplitCompareOptions {
    pub preset: SplitPreset,
    pub pair: StructurePair,
    pub seeds: Vec<u64>,
    pub data: Option<PathBuf>,
    pub data_seed: u64,
    pub work: PathBuf,
    pub device: String,
    pub epochs: Option<usize>,
    pub iterations: Option<usize>,
}

/// One trained model evaluated with one tiling.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SplitRun {
    pub model: String,
    pub tiling: String,
    pub seed: u64,
    /// Per test frame, per channel.
    pub psnr: Vec<Vec<f64>>,
    pub ri_psnr: Vec<Vec<f64>>,
    pub ssim: Vec<Vec<f64>>,
    pub parameters: i64,
    pub train_seconds: f64,
    pub predict_seconds: f64,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SplitReport {
    pub preset: SplitPreset,
    pub pair: StructurePair,
    pub channels: Vec<String>,
    pub seeds: Vec<u64>,
    pub data: String,
    pub test_frames: Vec<String>,
    pub machine: String,
    pub command: String,
    pub train_configs: serde_json::Value,
    pub runs: Vec<SplitRun>,
    pub total_seconds: f64,
}

fn models() -> Vec<(&'static str, SplitVariant, bool)> {
    vec![
        ("U-Net", SplitVariant::Unet, false),
        ("LC U-Net (muSplit)", SplitVariant::Unet, true),
        ("HVAE", SplitVariant::Hvae, false),
        ("LC HVAE (muSplit)", SplitVariant::Hvae, true),
    ]
}

/// Runs the comparison; `on_run` sees each result as it lands.
pub fn run(opts: &SplitCompareOptions, command: &str, mut on_run: impl FnMut(&SplitRun)) -> Result<SplitReport> {
    let t0 = Instant::now();
    let data = match &opts.data {
        Some(d) => d.clone(),
        None => {
            let d = opts.work.join("data");
            let (n_train, n_test, size) = opts.preset.data_size();
            let cfg = FluoConfig { size, pair: opts.pair, ..Default::default() };
            write_dataset(&d, n_train, n_test, &cfg, opts.data_seed)?;
            d
        }
    };
    let test = load_split_folder(&data.join("test"))?;
    let test_refs: Vec<_> = test.iter().collect();
    let mut runs = Vec::new();
    let mut configs = serde_json::Map::new();
    for (name, variant, lc) in models() {
        let (mut tc, mut mc) = opts.preset.recipe(variant);
        if !lc {
            mc.lc_levels = 0;
        }
        tc.musplit = mc;
        tc.device = opts.device.clone();
        if let Some(e) = opts.epochs {
            tc.epochs = e;
        }
        if let Some(i) = opts.iterations {
            tc.iterations_per_epoch = i;
        }
        for &seed in &opts.seeds {
            tc.seed = seed;
            configs.insert(name.to_string(), serde_json::to_value(&tc).expect("json"));
            let slug = match (variant, lc) {
                (SplitVariant::Unet, false) => "unet",
                (SplitVariant::Unet, true) => "lc_unet",
                (SplitVariant::Hvae, false) => "hvae",
                (SplitVariant::Hvae, true) => "lc_hvae",
            };
            let out = opts.work.join(format!("{slug}_s{seed}.lumos"));
            let (model, train_seconds) = match crate::reuse_trained(&out, &tc) {
                Some(found) => found,
                None => {
                    let tt = Instant::now();
                    let trained = train(&tc, &data.join("train"), &out, &mut Monitor::none())?;
                    (trained.model, tt.elapsed().as_secs_f64())
                }
            };
            let trained = lumos::engine::train::TrainOutcome { model, history: Vec::new() };
            let patch = tc.patch_size[0];
            for (tiling, dopts) in [
                ("inner", DecomposeOptions { seed, ..Default::default() }),
                ("outer", DecomposeOptions { seed, batch_size: 2, ..DecomposeOptions::outer_padding(patch, 4) }),
            ] {
                let tp = Instant::now();
                let scores = evaluate_split(&trained.model, &test_refs, &dopts)?;
                let r = SplitRun {
                    model: name.to_string(),
                    tiling: tiling.to_string(),
                    seed,
                    psnr: scores.iter().map(|s| s.psnr.clone()).collect(),
                    ri_psnr: scores.iter().map(|s| s.ri_psnr.clone()).collect(),
                    ssim: scores.iter().map(|s| s.ssim.clone()).collect(),
                    parameters: trained.model.n_parameters(),
                    train_seconds,
                    predict_seconds: tp.elapsed().as_secs_f64(),
                };
                on_run(&r);
                runs.push(r);
            }
        }
    }
    Ok(SplitReport {
        preset: opts.preset,
        pair: opts.pair,
        channels: opts.pair.channel_names().iter().map(|s| s.to_string()).collect(),
        seeds: opts.seeds.clone(),
        data: data.display().to_string(),
        test_frames: test.iter().map(|s| s.name.clone()).collect(),
        machine: lumos::engine::device::machine_description(),
        command: command.to_string(),
        train_configs: serde_json::Value::Object(configs),
        runs,
        total_seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Mean over test frames of one channel's metric, per seed, then mean ± std over seeds.
fn over_seeds(runs: &[&SplitRun], f: &dyn Fn(&SplitRun) -> &Vec<Vec<f64>>, ch: Option<usize>) -> MeanStd {
    let per_seed: Vec<f64> = runs
        .iter()
        .map(|r| {
            let v: Vec<f64> = f(r)
                .iter()
                .map(|frame| match ch {
                    Some(c) => frame[c],
                    None => metrics::mean(frame),
                })
                .collect();
            metrics::mean(&v)
        })
        .collect();
    metrics::mean_std(&per_seed)
}

impl SplitReport {
    pub fn markdown(&self) -> String {
        let c = &self.channels;
        let mut s = String::new();
        s.push_str("# muSplit comparisons on simulated two-structure fluorescence\n\n");
        s.push_str(&format!(
            "Data: `lumos::sim::fluo`, pair `{}` ({} / {}), {} held-out test frames ({}); models trained on the \
             simulator's train split with one budget per model. Values: mean ± std over {} seeds ({:?}) of the \
             per-seed mean over the test frames. PSNR uses the ground truth's range; RI-PSNR is the \
             range-invariant PSNR; SSIM as scikit-image (7x7 window, data range of the ground truth).\n\n",
            serde_json::to_value(self.pair).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
            c[0],
            c[1],
            self.test_frames.len(),
            self.test_frames.join(", "),
            self.seeds.len(),
            self.seeds
        ));
        s.push_str("Tiling: *inner* = tiles of the training patch, central half kept (the paper's inner padding); \
                    *outer* = tiles 4x the training patch, all but a quarter-patch margin kept (the prevalent scheme).\n\n");
        s.push_str(&format!(
            "| model | tiling | PSNR {0} | PSNR {1} | RI-PSNR (mean) | SSIM {0} | SSIM {1} | parameters | train s |\n|---|---|---|---|---|---|---|---|---|\n",
            c[0], c[1]
        ));
        let mut keys: Vec<(String, String)> = Vec::new();
        for r in &self.runs {
            let k = (r.model.clone(), r.tiling.clone());
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        for (m, t) in &keys {
            let rs: Vec<&SplitRun> = self.runs.iter().filter(|r| &r.model == m && &r.tiling == t).collect();
            let f2 = |v: MeanStd| format!("{:.2} ± {:.2}", v.mean, v.std);
            let f3 = |v: MeanStd| format!("{:.3} ± {:.3}", v.mean, v.std);
            s.push_str(&format!(
                "| {m} | {t} | {} | {} | {} | {} | {} | {} | {:.0} |\n",
                f2(over_seeds(&rs, &|r| &r.psnr, Some(0))),
                f2(over_seeds(&rs, &|r| &r.psnr, Some(1))),
                f2(over_seeds(&rs, &|r| &r.ri_psnr, None)),
                f3(over_seeds(&rs, &|r| &r.ssim, Some(0))),
                f3(over_seeds(&rs, &|r| &r.ssim, Some(1))),
                rs[0].parameters,
                metrics::mean(&rs.iter().map(|r| r.train_seconds).collect::<Vec<_>>()),
            ));
        }
        s.push_str(&format!(
            "\nMachine: {}. Total wall time {:.0} s.\n\nCommand: `{}`\n\nTraining configs (per model, last seed) are in `results.json`.\n",
            self.machine, self.total_seconds, self.command
        ));
        s
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        lumos::engine::weights::write_atomic(&dir.join("README.md"), self.markdown().as_bytes())?;
        lumos::engine::weights::write_atomic(
            &dir.join("results.json"),
            serde_json::to_string_pretty(self).expect("json").as_bytes(),
        )
    }
}
