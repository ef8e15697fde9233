//! Segmentation throughput and memory of the foundation's 2D nnU-Net through the tiling
//! engine, on the machine it runs on. `cargo bench --bench segment` prints a Markdown
//! table and writes it to docs/results/segment_bench.md.
//!
//! The network is the paper-sized configuration (6 stages, 32 base features, 5 input
//! channels, 256x256 tiles, step 0.5, batch 4) with random weights: speed does not depend
//! on the weights.

use std::time::Instant;

use lumos::model::{Model, ModelKind, ModelMeta, SegmentOptions, SegmentOutput};
use lumos::nn::unet::UnetConfig;
use lumos::normalize::{NormMethod, Normalizer};
use lumos::progress::Monitor;
use lumos::Image;
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
    let device = lumos::device::parse_device(&std::env::var("LUMOS_DEVICE").unwrap_or_else(|_| "cpu".into())).unwrap();
    let sizes: Vec<usize> = std::env::var("LUMOS_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![256, 1024, 2048]);
    let probe = Image::new(Array3::from_shape_fn((5, 64, 64), |(c, y, x)| (c * 10 + y + x) as f32));
    let norm = Normalizer::fit(&[NormMethod::PerImageZscore], &[&probe]).unwrap();
    let arch = serde_json::to_value(UnetConfig::default()).unwrap();
    let names = ["I0", "I45", "I90", "I135", "phase"].map(String::from).to_vec();
    let meta = ModelMeta::new(ModelKind::Unet, arch, names, vec!["background".into(), "cell".into()], [256, 256], norm);
    tch::manual_seed(0);
    let model = Model::new(meta, device).unwrap();
    let opts = SegmentOptions::default();
    let mut rows = Vec::new();
    for &n in &sizes {
        let frame = Array3::from_shape_fn((5, n, n), |(c, y, x)| ((c * 7 + y * 3 + x) % 255) as f32);
        let mut labels = Array2::<u8>::zeros((n, n));
        // warm-up on one tile
        model.segment(frame.slice(ndarray::s![.., ..256.min(n), ..256.min(n)]), &opts, SegmentOutput::Labels(Array2::<u8>::zeros((256.min(n), 256.min(n))).view_mut()), &mut Monitor::none()).unwrap();
        let reps = if n <= 256 { 5 } else { 1 };
        let t = Instant::now();
        for _ in 0..reps {
            model.segment(frame.view(), &opts, SegmentOutput::Labels(labels.view_mut()), &mut Monitor::none()).unwrap();
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        let row = format!(
            "| {n} x {n} | {:.3} | {:.2} | {:.3} | {:.0} |",
            s,
            1.0 / s,
            (n * n) as f64 / 1e6 / s,
            peak_rss_mib()
        );
        println!("{row}");
        rows.push(row);
    }
    let machine = format!(
        "{} ({} logical CPUs, libtorch threads {})",
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
            .unwrap_or_else(|| "unknown CPU".into()),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        tch::get_num_threads()
    );
    let md = format!(
        "# Segmentation throughput: 5-channel 2D nnU-Net (foundation)\n\n\
         Command: `cargo bench --bench segment` (LUMOS_DEVICE={}).\n\
         Machine: {machine}. lumos {}, libtorch 2.11.0, fp32.\n\
         Model: 6 stages, 32 base features (paper size), 256x256 tiles, step 0.5, batch 4, no mirroring.\n\
         Peak RSS is the process high-water mark after that frame (cumulative).\n\n\
         | frame | seconds / frame | frames / s | megapixels / s | peak RSS (MiB) |\n|---|---|---|---|---|\n{}\n",
        lumos::device::device_name(device),
        lumos::VERSION,
        rows.join("\n")
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/results");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("segment_bench.md"), md).unwrap();
}
