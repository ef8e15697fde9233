//! Decomposition (muSplit) speed and memory on frames far larger than the training patch.
//! `cargo bench --bench decompose` writes docs/results/decompose_bench.md.
//!
//! Each frame size runs in a fresh child process that allocates the caller's input
//! `(H, W)` and output `(2, H, W)` buffers, touches them, loads the model, warms up on a
//! small frame, reads its peak resident memory (VmHWM), decomposes the frame and reads the
//! peak again: the difference is the engine's extra memory for that frame, beyond the
//! input and output buffers (which the table lists separately).
//!
//! Environment: LUMOS_DEVICE (default cpu), LUMOS_BENCH_SIZES (frame edges, default
//! 1024,2048,4096), LUMOS_BENCH_MODEL (a trained muSplit model file; default: an LC U-Net
//! with random weights, 5 levels, 4 LC levels merged 'lean', 8 base channels, 64x64
//! patches, small enough for a 4096x4096 frame in minutes on 2 CPU cores; speed and memory
//! do not depend on the weights), LUMOS_BENCH_OUT (output file).

use std::process::Command;
use std::time::Instant;

use lumos::engine::model::{Model, ModelKind, ModelMeta};
use lumos::engine::normalize::{ChannelNorm, Normalizer};
use lumos::musplit::DecomposeOptions;
use lumos::musplit::net::{LcMerge, MuSplitConfig, SplitVariant};
use ndarray::{Array2, Array3};

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn model(device: tch::Device) -> (Model, String) {
    if let Ok(p) = std::env::var("LUMOS_BENCH_MODEL") {
        return (Model::load(std::path::Path::new(&p), device).unwrap(), format!("model file {p}"));
    }
    let cfg = MuSplitConfig {
        variant: SplitVariant::Unet,
        base_channels: 8,
        max_channels: 32,
        lc_merge: LcMerge::Lean,
        ..Default::default()
    };
    let id = Normalizer { channels: vec![ChannelNorm::DatasetZscore { mean: 0.0, std: 1.0 }] };
    let mut meta = ModelMeta::new(
        ModelKind::Musplit,
        serde_json::to_value(&cfg).unwrap(),
        vec!["mixed".into()],
        vec!["s1".into(), "s2".into()],
        [64, 64],
        id,
    );
    meta.target_normalization =
        Some(Normalizer { channels: vec![ChannelNorm::DatasetZscore { mean: 0.0, std: 1.0 }; 2] });
    (
        Model::new_seeded(meta, device, Some(0)).unwrap(),
        "LC U-Net (lean LC merge), 5 levels, 4 LC levels, 8-32 channels, 64x64 tiles, random weights".into(),
    )
}

fn child(size: usize) {
    let device =
        lumos::engine::device::parse_device(&std::env::var("LUMOS_DEVICE").unwrap_or_else(|_| "cpu".into())).unwrap();
    // the caller's buffers, touched
    let input = Array2::from_shape_fn((size, size), |(y, x)| {
        ((y * 31 + x * 17) % 97) as f32 + ((x as f32) * 0.01).sin() * 20.0
    });
    let mut out = Array3::<f32>::from_elem((2, size, size), 1.0);
    let (m, what) = model(device);
    let opts = DecomposeOptions::default();
    let warm = Array2::from_shape_fn((512, 512), |(y, x)| (y + x) as f32);
    m.decompose_array(warm.view(), &opts).unwrap();
    let before = peak_rss_mib();
    let t = Instant::now();
    m.decompose(input.view(), &opts, out.view_mut(), &mut lumos::engine::progress::Monitor::none()).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let after = peak_rss_mib();
    assert!(out.iter().all(|v| v.is_finite()));
    let buffers = (size * size * 3 * 4) as f64 / (1024.0 * 1024.0);
    println!(
        "RESULT {}",
        serde_json::json!({"size": size, "seconds": secs, "peak_before_mib": before, "peak_after_mib": after,
                           "extra_mib": after - before, "buffers_mib": buffers, "model": what,
                           "tiles": (size / 32) * (size / 32), "device": lumos::engine::device::device_name(device)})
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(args[i + 1].parse().unwrap());
        return;
    }
    if !args.iter().any(|a| a == "--bench") {
        println!("decompose bench: skipped outside `cargo bench`");
        return;
    }
    let sizes: Vec<usize> = std::env::var("LUMOS_BENCH_SIZES")
        .unwrap_or_else(|_| "1024,2048,4096".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let mut rows = Vec::new();
    let mut what = String::new();
    let mut device = String::new();
    for s in sizes {
        let out = Command::new(&args[0]).args(["--child", &s.to_string()]).output().unwrap();
        assert!(out.status.success(), "child {s} failed: {}", String::from_utf8_lossy(&out.stderr));
        let line = String::from_utf8_lossy(&out.stdout).lines().find(|l| l.starts_with("RESULT ")).unwrap().to_string();
        let v: serde_json::Value = serde_json::from_str(&line[7..]).unwrap();
        what = v["model"].as_str().unwrap_or_default().to_string();
        device = v["device"].as_str().unwrap_or_default().to_string();
        let row = format!(
            "| {s} x {s} | {} | {:.1} | {:.2} | {:.0} | {:.0} | {:.0} |",
            v["tiles"],
            v["seconds"].as_f64().unwrap(),
            (s * s) as f64 / 1e6 / v["seconds"].as_f64().unwrap(),
            v["buffers_mib"].as_f64().unwrap(),
            v["peak_before_mib"].as_f64().unwrap(),
            v["extra_mib"].as_f64().unwrap()
        );
        println!("{row}");
        rows.push(row);
    }
    let machine = lumos::engine::device::machine_description();
    let md = format!(
        "# Decomposition: speed and memory against frame size\n\n\
         `cargo bench --bench decompose` on {machine}, device {device}, {date}.\n\n\
         Model: {what}. Inner padding (64x64 tiles, central 32x32 kept), batch 16, 1 sample, no mirroring.\n\n\
         | frame | tiles | seconds | Mpx/s | input+output buffers (MiB) | peak RSS before (MiB) | extra peak during decompose (MiB) |\n\
         |---|---|---|---|---|---|---|\n{}\n\n\
         *Extra peak* is the growth of the process's peak resident memory (VmHWM) while decomposing, measured in a \
         fresh process per frame after the buffers were allocated and touched and the model warmed up on a 512x512 \
         frame. The engine works on one batch of tiles and the lateral context around it, so this figure does not \
         grow with the frame.\n",
        rows.join("\n"),
        date = std::env::var("LUMOS_BENCH_DATE").unwrap_or_else(|_| "date not recorded".into()),
    );
    let path = std::env::var("LUMOS_BENCH_OUT").unwrap_or_else(|_| "docs/results/decompose_bench.md".into());
    std::fs::write(&path, md).unwrap();
    println!("written to {path}");
}
