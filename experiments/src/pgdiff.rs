//! The PG-DiffSeg paper's comparisons on simulated QPI (`lumos-experiments diff-compare`):
//!
//! - Table 2: diffusion segmentation from random starting noise with majority voting
//!   over 1, 3 and 5 samples vs the prior-guided start (one sample), next to a
//!   deterministic nnU-Net trained on the same data. (The paper's other deterministic
//!   baselines and CCDM need ImageNet-pretrained encoders or DINO, which cannot be
//!   fetched here.)
//! - Table 3: the starting-noise ablation: random, forward diffusion to t = 0 / 300 /
//!   600, LDM-P inversion with 50 / 100 / 200 steps; mIoU, F1, and the noise's SSIM to
//!   the image and KL divergence from N(0, 1).
//! - Beyond the paper: mIoU against the number of network evaluations (inversion +
//!   sampling steps) for the prior start, and the cheapest setting within 0.01 mIoU of
//!   the paper's 100 + 200.
//!
//! Every row is evaluated on the same held-out simulated frames, cut into
//! non-overlapping training-size tiles; values are mean ± std over training seeds of the
//! per-seed mean over frames.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use lumos::engine::dataset::{Sample, load_folder};
use lumos::engine::metrics::{self, MeanStd};
use lumos::engine::model::Model;
use lumos::engine::progress::Monitor;
use lumos::engine::train::{TrainConfig, train};
use lumos::error::{Error, Result};
use lumos::pgdiff::recipes::DiffPreset;
use lumos::pgdiff::{DiffusionOptions, StartNoise, evaluate_tiles, reconstruction_psnr};
use lumos::sim::qpi::{QpiConfig, write_dataset};

/// What to run.
#[derive(Debug, Clone)]
pub struct DiffCompareOptions {
    pub preset: DiffPreset,
    pub seeds: Vec<u64>,
    pub data: Option<PathBuf>,
    pub data_seed: u64,
    pub work: PathBuf,
    pub device: String,
    /// Seed of the random draws at evaluation (random starts).
    pub eval_seed: u64,
}

/// One sampling configuration of one trained model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiffRun {
    /// Row label.
    pub row: String,
    /// Which table(s): "table2", "table3", "nfe".
    pub tables: Vec<String>,
    pub seed: u64,
    pub options: Option<DiffusionOptions>,
    /// Network evaluations per tile.
    pub evaluations: usize,
    pub miou: Vec<f64>,
    pub f1: Vec<f64>,
    /// SSIM between the starting noise and the image, latent sign aligned with the image.
    pub noise_ssim: Vec<f64>,
    /// The same SSIM without sign alignment.
    #[serde(default)]
    pub noise_ssim_raw: Vec<f64>,
    pub noise_kld: Vec<f64>,
    pub seconds_per_tile: f64,
}

/// The comparison's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiffReport {
    pub preset: DiffPreset,
    pub seeds: Vec<u64>,
    pub data: String,
    pub test_frames: Vec<String>,
    pub tiles_per_seed: usize,
    pub machine: String,
    pub command: String,
    pub train_config: TrainConfig,
    pub baseline_config: TrainConfig,
    /// Per seed: the autoencoder's reconstruction PSNR on the test frames (dB,
    /// normalized units).
    pub reconstruction_psnr: Vec<f64>,
    pub train_seconds: Vec<f64>,
    pub runs: Vec<DiffRun>,
    pub total_seconds: f64,
}

/// The sampling rows: (label, tables, options).
fn rows(eval_seed: u64) -> Vec<(String, Vec<&'static str>, DiffusionOptions)> {
    let d = DiffusionOptions { seed: eval_seed, ..DiffusionOptions::default() };
    let random = |n: usize| DiffusionOptions { start: StartNoise::Random, samples: n, ..d };
    let fwd = |t: usize| DiffusionOptions { start: StartNoise::Forward, forward_t: t, ..d };
    let prior = |inv: usize, samp: usize| DiffusionOptions {
        start: StartNoise::Prior,
        inversion_steps: inv,
        sampling_steps: samp,
        ..d
    };
    let mut v = vec![
        ("Random ×1".to_string(), vec!["table2", "table3"], random(1)),
        ("Random ×3".to_string(), vec!["table2"], random(3)),
        ("Random ×5".to_string(), vec!["table2"], random(5)),
        ("Prior (PG-DiffSeg)".to_string(), vec!["table2", "table3", "nfe"], prior(100, 200)),
        ("Forward Diff. 0".to_string(), vec!["table3"], fwd(0)),
        ("Forward Diff. 300".to_string(), vec!["table3"], fwd(300)),
        ("Forward Diff. 600".to_string(), vec!["table3"], fwd(600)),
        ("LDM-P 50".to_string(), vec!["table3"], prior(50, 200)),
        ("LDM-P 200".to_string(), vec!["table3"], prior(200, 200)),
    ];
    for (inv, samp) in [(50, 100), (25, 50), (20, 20), (10, 20), (10, 10), (5, 10), (5, 5), (2, 5), (2, 2)] {
        v.push((format!("Prior {inv} + {samp}"), vec!["nfe"], prior(inv, samp)));
    }
    v
}

fn train_or_reuse(tc: &TrainConfig, data: &Path, out: &Path) -> Result<(Model, f64)> {
    if let Some(found) = crate::reuse_trained(out, tc) {
        return Ok(found);
    }
    let t = Instant::now();
    let o = train(tc, data, out, &mut Monitor::none())?;
    Ok((o.model, t.elapsed().as_secs_f64()))
}

/// Runs the comparison; `on_run` sees each result as it lands.
pub fn run(opts: &DiffCompareOptions, command: &str, mut on_run: impl FnMut(&DiffRun)) -> Result<DiffReport> {
    let t0 = Instant::now();
    if opts.seeds.is_empty() {
        return Err(Error::Config("the comparison needs at least one seed".into()));
    }
    std::fs::create_dir_all(&opts.work).map_err(|e| Error::io(&opts.work, e))?;
    let data = match &opts.data {
        Some(d) => d.clone(),
        None => {
            let d = opts.work.join("data");
            let (n_train, n_test, size) = opts.preset.data_size();
            write_dataset(&d, n_train, n_test, &QpiConfig { size, ..Default::default() }, opts.data_seed)?;
            d
        }
    };
    let test = load_folder(&data.join("test"))?;
    let test_refs: Vec<&Sample> = test.iter().collect();
    let mut tc = opts.preset.recipe();
    tc.device = opts.device.clone();
    let mut bc = opts.preset.baseline_recipe();
    bc.device = opts.device.clone();
    let tile = tc.patch_size[0];
    let tiles_per_seed: usize = test.iter().map(|s| (s.mask.dim().0 / tile) * (s.mask.dim().1 / tile)).sum();
    let mut runs = Vec::new();
    let mut recon = Vec::new();
    let mut train_seconds = Vec::new();
    for &seed in &opts.seeds {
        tc.seed = seed;
        bc.seed = seed;
        // deterministic baseline
        let (unet, _) = train_or_reuse(&bc, &data.join("train"), &opts.work.join(format!("unet_s{seed}.lumos")))?;
        let tu = Instant::now();
        let seg = lumos::engine::model::SegmentOptions { step_fraction: 1.0, ..Default::default() };
        let scores = test_refs
            .iter()
            .map(|s| metrics::score(&unet.segment_labels(s.image.data.view(), &seg)?, &s.mask, unet.n_classes()))
            .collect::<Result<Vec<_>>>()?;
        let r = DiffRun {
            row: "nnU-Net (deterministic)".into(),
            tables: vec!["table2".into()],
            seed,
            options: None,
            evaluations: 1,
            miou: scores.iter().map(|s| s.miou()).collect(),
            f1: scores.iter().map(|s| metrics::mean(&s.classes.iter().map(|c| c.f1).collect::<Vec<_>>())).collect(),
            noise_ssim: Vec::new(),
            noise_ssim_raw: Vec::new(),
            noise_kld: Vec::new(),
            seconds_per_tile: tu.elapsed().as_secs_f64() / tiles_per_seed.max(1) as f64,
        };
        on_run(&r);
        runs.push(r);

        let (model, secs) = train_or_reuse(&tc, &data.join("train"), &opts.work.join(format!("pgdiff_s{seed}.lumos")))?;
        train_seconds.push(secs);
        recon.push(reconstruction_psnr(&model, &test.iter().map(|s| &s.image).collect::<Vec<_>>())?);
        for (row, tables, o) in rows(opts.eval_seed) {
            let ev = evaluate_tiles(&model, &test_refs, &o, 8, &Monitor::none())?;
            let r = DiffRun {
                row,
                tables: tables.iter().map(|s| s.to_string()).collect(),
                seed,
                options: Some(o),
                evaluations: o.evaluations(),
                miou: ev.miou,
                f1: ev.f1,
                noise_ssim: ev.noise_ssim,
                noise_ssim_raw: ev.noise_ssim_raw,
                noise_kld: ev.noise_kld,
                seconds_per_tile: ev.seconds_per_tile,
            };
            on_run(&r);
            runs.push(r);
        }
    }
    Ok(DiffReport {
        preset: opts.preset,
        seeds: opts.seeds.clone(),
        data: data.display().to_string(),
        test_frames: test.iter().map(|s| s.name.clone()).collect(),
        tiles_per_seed,
        machine: lumos::engine::device::machine_description(),
        command: command.to_string(),
        train_config: tc,
        baseline_config: bc,
        reconstruction_psnr: recon,
        train_seconds,
        runs,
        total_seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Per-seed mean of a per-frame (or per-tile) metric, then mean ± std over seeds.
fn over_seeds(runs: &[&DiffRun], f: &dyn Fn(&DiffRun) -> &Vec<f64>) -> MeanStd {
    metrics::mean_std(&runs.iter().map(|r| metrics::mean(f(r))).collect::<Vec<_>>())
}

impl DiffReport {
    fn rows_of(&self, table: &str) -> Vec<(String, Vec<&DiffRun>)> {
        let mut out: Vec<(String, Vec<&DiffRun>)> = Vec::new();
        for r in self.runs.iter().filter(|r| r.tables.iter().any(|t| t == table)) {
            match out.iter_mut().find(|(n, _)| *n == r.row) {
                Some((_, v)) => v.push(r),
                None => out.push((r.row.clone(), vec![r])),
            }
        }
        out
    }

    /// The NFE sweep: (row, evaluations, mIoU, seconds per tile), by evaluations.
    pub fn nfe_curve(&self) -> Vec<(String, usize, MeanStd, f64)> {
        let mut v: Vec<_> = self
            .rows_of("nfe")
            .into_iter()
            .map(|(n, rs)| {
                let secs = metrics::mean(&rs.iter().map(|r| r.seconds_per_tile).collect::<Vec<_>>());
                (n, rs[0].evaluations, over_seeds(&rs, &|r| &r.miou), secs)
            })
            .collect();
        v.sort_by_key(|r| r.1);
        v
    }

    /// The cheapest prior setting whose mean mIoU is within 0.01 of the 100 + 200 one.
    pub fn cheapest_within(&self, tol: f64) -> Option<(String, usize, f64, f64)> {
        let curve = self.nfe_curve();
        let (_, _, reference, ref_secs) = curve.iter().find(|r| r.1 == 300)?.clone();
        curve
            .iter()
            .find(|r| r.2.mean >= reference.mean - tol)
            .map(|r| (r.0.clone(), r.1, r.2.mean, 1.0 - r.3 / ref_secs))
    }

    pub fn markdown(&self) -> String {
        let f3 = |v: MeanStd| {
            if v.n == 0 || v.mean.is_nan() { "–".to_string() } else { format!("{:.3} ± {:.3}", v.mean, v.std) }
        };
        let mut s = String::new();
        s.push_str("# PG-DiffSeg comparisons on simulated QPI (live / dead / background)\n\n");
        s.push_str(&format!(
            "Data: `lumos::sim::qpi`, {} held-out test frames ({}) cut into {} non-overlapping {}-pixel tiles per seed; \
             models trained from scratch on the simulator's train split. Values: mean ± std over {} training seeds \
             ({:?}) of the per-seed mean over test frames. mIoU and F1 are means over the three classes, background \
             included. The autoencoder's reconstruction PSNR on the test frames: {}.\n\n",
            self.test_frames.len(),
            self.test_frames.join(", "),
            self.tiles_per_seed,
            self.train_config.patch_size[0],
            self.seeds.len(),
            self.seeds,
            f3(metrics::mean_std(&self.reconstruction_psnr)).replace(".000", "") + " dB"
        ));
        s.push_str("## Table 2: segmentation\n\n| method | network evaluations / tile | mIoU | F1 | s / tile |\n|---|---|---|---|---|\n");
        for (name, rs) in self.rows_of("table2") {
            s.push_str(&format!(
                "| {name} | {} | {} | {} | {:.3} |\n",
                rs[0].evaluations,
                f3(over_seeds(&rs, &|r| &r.miou)),
                f3(over_seeds(&rs, &|r| &r.f1)),
                metrics::mean(&rs.iter().map(|r| r.seconds_per_tile).collect::<Vec<_>>())
            ));
        }
        s.push_str("\n## Table 3: starting noise\n\n| starting noise | mIoU | F1 | SSIM (noise, image) | SSIM, unaligned sign | KLD (noise, N(0,1)) |\n|---|---|---|---|---|---|\n");
        for (name, rs) in self.rows_of("table3") {
            let label = match name.as_str() {
                "Random ×1" => "Random".to_string(),
                "Prior (PG-DiffSeg)" => "LDM-P 100".to_string(),
                n => n.to_string(),
            };
            s.push_str(&format!(
                "| {label} | {} | {} | {} | {} | {} |\n",
                f3(over_seeds(&rs, &|r| &r.miou)),
                f3(over_seeds(&rs, &|r| &r.f1)),
                f3(over_seeds(&rs, &|r| &r.noise_ssim)),
                f3(over_seeds(&rs, &|r| &r.noise_ssim_raw)),
                f3(over_seeds(&rs, &|r| &r.noise_kld)),
            ));
        }
        s.push_str(
            "\nThe noise measured is the map LDM-S starts from: the first sample's starting noise averaged over the \
             latent channels (the paper repeats this map to the number of classes). SSIM is taken against the image \
             area-resized to the latent size, both min-max scaled. The autoencoder is trained from scratch, so its \
             latent's sign is arbitrary; the sign-aligned column negates the noise where the tile's clean latent \
             correlates negatively with the image (a choice that never looks at the noise). KLD compares the noise's \
             Gaussian-KDE density with N(0, 1).\n",
        );
        s.push_str("\n## Beyond the paper: quality against network evaluations (prior start)\n\n| inversion + sampling steps | evaluations / tile | mIoU | s / tile |\n|---|---|---|---|\n");
        for (name, nfe, miou, secs) in self.nfe_curve() {
            let label = if name == "Prior (PG-DiffSeg)" { "Prior 100 + 200 (paper)".to_string() } else { name };
            s.push_str(&format!("| {label} | {nfe} | {} | {secs:.3} |\n", f3(miou)));
        }
        if let Some((name, nfe, miou, saved)) = self.cheapest_within(0.01) {
            s.push_str(&format!(
                "\nCheapest setting within 0.01 mIoU of the paper's 300 evaluations: **{name}** ({nfe} evaluations, mIoU {miou:.3}), \
                 {:.0} % less time per tile.\n",
                100.0 * saved
            ));
        }
        s.push_str(&format!(
            "\nSeconds per tile are wall time on this machine with 8 tiles per batch. Training: {} s per seed (mean). \
             Machine: {}. Total wall time {:.0} s.\n\nCommand: `{}`\n\nTraining configs are in `results.json`.\n",
            metrics::mean(&self.train_seconds).round(),
            self.machine,
            self.total_seconds,
            self.command
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_cover_the_papers_tables() {
        let r = rows(0);
        let names: Vec<&str> = r.iter().map(|x| x.0.as_str()).collect();
        for n in [
            "Random ×1",
            "Random ×3",
            "Random ×5",
            "Prior (PG-DiffSeg)",
            "Forward Diff. 0",
            "Forward Diff. 300",
            "Forward Diff. 600",
            "LDM-P 50",
            "LDM-P 200",
        ] {
            assert!(names.contains(&n), "{n}");
        }
        let prior = r.iter().find(|x| x.0 == "Prior (PG-DiffSeg)").unwrap().2;
        assert_eq!(prior.evaluations(), 300);
        assert_eq!(r.iter().find(|x| x.0 == "Random ×5").unwrap().2.evaluations(), 1000);
        for (_, _, o) in &r {
            o.validate(1000).unwrap();
        }
    }
}
