//! Segmentation throughput and memory through the tiling engine, on the machine it runs
//! on: the foundation's 5-channel nnU-Net (early fusion) and DM-QPMNet, both at the
//! papers' sizes. `cargo bench --bench segment` prints a Markdown table and writes it to
//! docs/results/segment_bench.md.
//!
//! Environment: LUMOS_DEVICE (cpu, cuda, cuda:N; default cpu), LUMOS_BENCH_SIZES (frame
//! edges, default 256,1024,2048), LUMOS_BENCH_MODELS (unet,dmqpm,dmqpm-tile512; default
//! all), LUMOS_BENCH_OUT (output file).
//!
//! Networks have random weights: speed does not depend on the weights. Tiles 256x256 (the
//! training patch) at step 0.5, batch 4, no mirroring; "dmqpm-tile512" runs DM-QPMNet on
//! 512x512 tiles, where the stage-2 attention spans 16384 tokens.

use std::time::Instant;

use lumos::Image;
use lumos::dmqpm::net::DmQpmConfig;
use lumos::engine::model::{Model, ModelKind, ModelMeta, SegmentOptions, SegmentOutput};
use lumos::engine::normalize::{NormMethod, Normalizer};
use lumos::engine::progress::Monitor;
use lumos::nnunet::net::UnetConfig;
use ndarray::{Array2, Array3};

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it,
    // and a test run must neither take minutes nor rewrite the results file
    if !std::env::args().any(|a| a == "--bench") {
        println!("segment bench: skipped outside `cargo bench`");
        return;
    }
    let device =
        lumos::engine::device::parse_device(&std::env::var("LUMOS_DEVICE").unwrap_or_else(|_| "cpu".into())).unwrap();
    let list = |var: &str, default: &str| -> Vec<String> {
        std::env::var(var)
            .unwrap_or_else(|_| default.into())
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let sizes: Vec<usize> = list("LUMOS_BENCH_SIZES", "256,1024,2048").iter().filter_map(|v| v.parse().ok()).collect();
    let models = list("LUMOS_BENCH_MODELS", "unet,dmqpm,dmqpm-tile512");
    let probe = Image::new(Array3::from_shape_fn((5, 64, 64), |(c, y, x)| (c * 10 + y + x) as f32));
    let norm = Normalizer::fit(&[NormMethod::PerImageZscore], &[&probe]).unwrap();
    let names = ["I0", "I45", "I90", "I135", "phase"].map(String::from).to_vec();
    let mut rows = Vec::new();
    for name in &models {
        let (kind, arch, tile, what) = match name.as_str() {
            "unet" => (
                ModelKind::Unet,
                serde_json::to_value(UnetConfig::default()).unwrap(),
                256,
                "nnU-Net early fusion (6 stages, 32 base features)",
            ),
            "dmqpm" => (
                ModelKind::Dmqpm,
                serde_json::to_value(DmQpmConfig::default()).unwrap(),
                256,
                "DM-QPMNet (5 stages, 32 base, MHA fusion at stage 2, 8 heads)",
            ),
            "dmqpm-tile512" => (
                ModelKind::Dmqpm,
                serde_json::to_value(DmQpmConfig::default()).unwrap(),
                512,
                "DM-QPMNet, 512x512 tiles",
            ),
            other => panic!("unknown model '{other}' in LUMOS_BENCH_MODELS; expected unet, dmqpm, dmqpm-tile512"),
        };
        let meta = ModelMeta::new(
            kind,
            arch,
            names.clone(),
            vec!["background".into(), "cell".into()],
            [256, 256],
            norm.clone(),
        );
        let model = Model::new_seeded(meta, device, Some(0)).unwrap();
        let params = model.n_parameters();
        let opts = SegmentOptions { tile: Some([tile, tile]), ..Default::default() };
        for &n in &sizes {
            if n < tile {
                continue;
            }
            let frame = Array3::from_shape_fn((5, n, n), |(c, y, x)| ((c * 7 + y * 3 + x) % 255) as f32);
            let mut labels = Array2::<u8>::zeros((n, n));
            // warm-up on one tile
            let mut warm = Array2::<u8>::zeros((tile, tile));
            model
                .segment(
                    frame.slice(ndarray::s![.., ..tile, ..tile]),
                    &opts,
                    SegmentOutput::Labels(warm.view_mut()),
                    &mut Monitor::none(),
                )
                .unwrap();
            let reps = if n <= 256 { 5 } else { 1 };
            let t = Instant::now();
            for _ in 0..reps {
                model
                    .segment(frame.view(), &opts, SegmentOutput::Labels(labels.view_mut()), &mut Monitor::none())
                    .unwrap();
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            let row = format!(
                "| {what} | {params} | {tile} | {n} x {n} | {:.3} | {:.2} | {:.3} | {:.0} |",
                s,
                1.0 / s,
                (n * n) as f64 / 1e6 / s,
                peak_rss_mib()
            );
            println!("{row}");
            rows.push(row);
        }
    }
    let machine =
        format!("{}; libtorch threads {}", lumos::engine::device::machine_description(), tch::get_num_threads());
    let md = format!(
        "# Segmentation throughput through the tiling engine\n\n\
         Command: `cargo bench --bench segment` (LUMOS_DEVICE={}).\n\
         Machine: {machine}. lumos {}, libtorch 2.11.0, fp32.\n\
         Random weights (speed does not depend on them); step 0.5, batch 4, no mirroring.\n\
         Peak RSS is the process high-water mark after that frame (cumulative over the run).\n\n\
         | model | parameters | tile | frame | seconds / frame | frames / s | megapixels / s | peak RSS (MiB) |\n\
         |---|---:|---:|---|---:|---:|---:|---:|\n{}\n",
        lumos::engine::device::device_name(device),
        lumos::VERSION,
        rows.join("\n")
    );
    let out = std::env::var("LUMOS_BENCH_OUT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/results/segment_bench.md"));
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(&out, md).unwrap();
    println!("written to {}", out.display());
}
