//! `lumos-experiments`: the papers' comparisons (built with `--features experiments`; not
//! part of the shipped CLI). Each command trains every variant of one paper on the same
//! simulated data with one budget and writes the report of `docs/results/<method>/`.

use clap::{Args, Parser, Subcommand};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

use lumos::engine::device::{device_name, parse_device};
use lumos::engine::metrics;
use lumos::engine::progress::{Monitor, Progress, Stage};
use lumos::sim::fluo::StructurePair;
use lumos::{Error, Result};

#[derive(Parser)]
#[command(name = "lumos-experiments", version, about = "The papers' comparisons, re-run on simulated data")]
struct Cli {
    /// Log level (error, warn, info, debug).
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Re-run the muSplit paper's comparisons (U-Net and HVAE, without and with lateral
    /// context; inner vs outer padding) on simulated two-structure fluorescence.
    SplitCompare(SplitCompareArgs),
    /// Re-run the PG-DiffSeg paper's Table 2 (random starts with majority voting vs the
    /// prior start, nnU-Net) and Table 3 (starting-noise ablation), plus quality against
    /// network evaluations, on simulated QPI; writes a report.
    DiffCompare(DiffCompareArgs),
    /// Re-run the DM-QPMNet paper's comparisons (fusion stage, attention vs concat,
    /// directed vs bidirectional, early fusion, single modalities, leave-one-out) on
    /// simulated ssQPM data, several seeds, one training budget; writes a report.
    Compare(CompareArgs),
}

fn main() {
    let cli = Cli::parse();
    env_logger::Builder::new().parse_filters(&cli.log).init();
    let r = match cli.cmd {
        Cmd::Compare(a) => compare(a),
        Cmd::SplitCompare(a) => split_compare(a),
        Cmd::DiffCompare(a) => diff_compare(a),
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(match e {
            Error::Cancelled => 130,
            _ => 1,
        });
    }
}

#[derive(Args)]
struct CompareArgs {
    /// tiny (seconds, for tests), cpu (under an hour on 2 cores for --variants main
    /// with 3 seeds) or paper (the paper's sizes; a GPU job).
    #[arg(long, default_value = "cpu")]
    preset: String,
    /// baselines (DM-QPMNet vs early fusion, angles only, phase only), main (+ fusion
    /// stage 1 / 3, concat, bidirectional) or all (+ leave-one-out modality).
    #[arg(long, default_value = "main")]
    variants: String,
    /// Training seeds, comma-separated.
    #[arg(long, default_value = "0,1,2", value_delimiter = ',')]
    seeds: Vec<u64>,
    /// Existing data folder (train/ and test/); default: simulate 24 + 6 images.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Seed of the simulated data.
    #[arg(long, default_value_t = 1000)]
    data_seed: u64,
    /// Where the report goes (README.md with the tables, results.json).
    #[arg(long, short, default_value = "docs/results/dmqpm")]
    out: PathBuf,
    /// Models, checkpoints and simulated data.
    #[arg(long, default_value = "out/compare")]
    work: PathBuf,
    /// Override the preset's epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Override the preset's iterations per epoch.
    #[arg(long)]
    iterations: Option<usize>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct SplitCompareArgs {
    /// tiny (seconds), cpu (about half an hour on 2 cores with 2 seeds) or paper (GPU).
    #[arg(long, default_value = "cpu")]
    preset: String,
    /// actin-tubulin or vesicles-nuclei.
    #[arg(long, default_value = "actin-tubulin", value_parser = StructurePair::parse)]
    pair: StructurePair,
    /// Training seeds, comma-separated.
    #[arg(long, default_value = "0,1", value_delimiter = ',')]
    seeds: Vec<u64>,
    /// Existing data folder (train/ and test/ with targets/); default: simulate.
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, default_value_t = 2000)]
    data_seed: u64,
    #[arg(long, short, default_value = "docs/results/musplit")]
    out: PathBuf,
    #[arg(long, default_value = "out/split-compare")]
    work: PathBuf,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    iterations: Option<usize>,
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct DiffCompareArgs {
    /// tiny (seconds, tests), cpu (small networks on 128-pixel tiles, 2-core CPU) or
    /// paper (the paper's networks on 256-pixel tiles; a GPU job).
    #[arg(long, default_value = "cpu")]
    preset: String,
    /// Training seeds, comma-separated.
    #[arg(long, default_value = "0,1,2", value_delimiter = ',')]
    seeds: Vec<u64>,
    /// Existing data folder (train/ and test/ with images/ and masks/); default: simulate.
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, default_value_t = 3000)]
    data_seed: u64,
    /// Seed of the random starting noise at evaluation.
    #[arg(long, default_value_t = 0)]
    eval_seed: u64,
    #[arg(long, short, default_value = "docs/results/pgdiff")]
    out: PathBuf,
    /// Models and simulated data; a rerun reuses models trained with the same config.
    #[arg(long, default_value = "out/diff-compare")]
    work: PathBuf,
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

/// This process's command line, quoted where needed (recorded in reports).
fn command_line() -> String {
    std::env::args().map(|s| if s.contains(' ') { format!("'{s}'") } else { s }).collect::<Vec<_>>().join(" ")
}

fn compare(a: CompareArgs) -> Result<()> {
    let opts = lumos_experiments::dmqpm::CompareOptions {
        preset: lumos::dmqpm::recipes::Preset::parse(&a.preset)?,
        set: lumos_experiments::dmqpm::VariantSet::parse(&a.variants)?,
        seeds: a.seeds.clone(),
        data: a.data.clone(),
        data_seed: a.data_seed,
        work: a.work.clone(),
        device: device_name(parse_device(&a.device)?),
        epochs: a.epochs,
        iterations: a.iterations,
    };
    let (_, base) = opts.preset.recipe();
    let n_runs = lumos_experiments::dmqpm::variants(opts.set, &base).len() * opts.seeds.len();
    let bar = ProgressBar::new(n_runs as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} runs  {msg}")
            .expect("template"),
    );
    let b = bar.clone();
    let mut on_progress = move |p: &Progress| {
        if p.stage == Stage::Training {
            b.set_message(format!("epoch {}/{} loss {:.3}", p.epoch + 1, p.epochs, p.loss));
        }
    };
    let mut mon = Monitor { progress: Some(&mut on_progress), cancel: None };
    let report = lumos_experiments::dmqpm::run(&opts, &mut mon, |r| {
        say(
            &bar,
            format!(
                "{:<40} seed {}  Dice {:.4}  IoU {:.4}  ({} parameters, {:.0} s)",
                r.variant, r.seed, r.mean_dice, r.mean_iou, r.parameters, r.train_seconds
            ),
        );
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header([
        "variant",
        "parameters",
        "Dice (pooled)",
        "IoU (pooled)",
        "Dice over seeds",
    ]);
    for v in &report.summary {
        t.add_row([
            v.variant.clone(),
            v.parameters.to_string(),
            v.dice.to_string(),
            v.iou.to_string(),
            v.dice_seed_means.to_string(),
        ]);
    }
    println!("{t}");
    report.write(&a.out)?;
    println!("report written to {}/README.md and results.json ({:.0} s)", a.out.display(), report.wall_seconds);
    Ok(())
}

fn diff_compare(a: DiffCompareArgs) -> Result<()> {
    let opts = lumos_experiments::pgdiff::DiffCompareOptions {
        preset: lumos::pgdiff::recipes::DiffPreset::parse(&a.preset)?,
        seeds: a.seeds.clone(),
        data: a.data.clone(),
        data_seed: a.data_seed,
        work: a.work.clone(),
        device: device_name(parse_device(&a.device)?),
        eval_seed: a.eval_seed,
    };
    let command = command_line();
    let bar = ProgressBar::new((19 * opts.seeds.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} rows").expect("template"),
    );
    let report = lumos_experiments::pgdiff::run(&opts, &command, |r| {
        say(
            &bar,
            format!(
                "{:<26} seed {}  mIoU {:.3}  F1 {:.3}  noise SSIM {:.3}  KLD {:.4}  ({} evaluations, {:.3} s/tile)",
                r.row,
                r.seed,
                metrics::mean(&r.miou),
                metrics::mean(&r.f1),
                metrics::mean(&r.noise_ssim),
                metrics::mean(&r.noise_kld),
                r.evaluations,
                r.seconds_per_tile
            ),
        );
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    report.write(&a.out)?;
    println!("{}", report.markdown());
    println!("report written to {}/README.md and results.json", a.out.display());
    Ok(())
}

fn split_compare(a: SplitCompareArgs) -> Result<()> {
    let opts = lumos_experiments::musplit::SplitCompareOptions {
        preset: lumos::musplit::recipes::SplitPreset::parse(&a.preset)?,
        pair: a.pair,
        seeds: a.seeds.clone(),
        data: a.data.clone(),
        data_seed: a.data_seed,
        work: a.work.clone(),
        device: device_name(parse_device(&a.device)?),
        epochs: a.epochs,
        iterations: a.iterations,
    };
    let command = command_line();
    let bar = ProgressBar::new((4 * 2 * opts.seeds.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} evaluations")
            .expect("template"),
    );
    let report = lumos_experiments::musplit::run(&opts, &command, |r| {
        let m = |v: &Vec<Vec<f64>>, c: usize| metrics::mean(&v.iter().map(|f| f[c]).collect::<Vec<_>>());
        say(
            &bar,
            format!(
                "{:<20} {:<6} seed {}  PSNR {:.2} / {:.2}  SSIM {:.3} / {:.3}  ({} parameters, trained in {:.0} s)",
                r.model,
                r.tiling,
                r.seed,
                m(&r.psnr, 0),
                m(&r.psnr, 1),
                m(&r.ssim, 0),
                m(&r.ssim, 1),
                r.parameters,
                r.train_seconds
            ),
        );
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    report.write(&a.out)?;
    println!("{}", report.markdown());
    println!("report written to {}/README.md and results.json", a.out.display());
    Ok(())
}
