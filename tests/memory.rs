//! Memory stays bounded when frames are much larger than a tile: the growth of the peak
//! resident set (VmHWM) while segmenting or decomposing a frame 9x the area of another
//! grows only with the frame's width (the engine keeps one row of tiles), never with its
//! area: a 2-channel whole-frame float intermediate would add 64 MiB between the two
//! sizes; the growth allowed is 32 MiB. Each
//! measurement runs in a fresh child process (this test binary re-run with an env var), so
//! one peak does not hide another. The full-size figures are in docs/results/*_bench.md.

use std::path::Path;
use std::process::Command;

fn vm_hwm_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc/self/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The child's side: load the model, allocate and touch the buffers, then measure the
/// peak growth of one segment or decompose call.
#[test]
fn child_measurement() {
    let Ok(what) = std::env::var("LUMOS_MEMORY_CHILD") else {
        return;
    };
    let model_path = std::env::var("LUMOS_MEMORY_MODEL").unwrap();
    let size: usize = std::env::var("LUMOS_MEMORY_SIZE").unwrap().parse().unwrap();
    let model = lumos::Model::load(Path::new(&model_path), tch::Device::Cpu).unwrap();
    let c = model.meta.input_channels.len();
    // a textured frame (not constant) so that every tile does real work
    let frame =
        ndarray::Array3::from_shape_fn((c, size, size), |(ch, y, x)| ((x * 7 + y * 13 + ch * 5) % 97) as f32 / 97.0);
    let extra = match what.as_str() {
        "segment" => {
            let opts = lumos::SegmentOptions { tile: Some([128, 128]), step_fraction: 1.0, ..Default::default() };
            let mut labels = ndarray::Array2::<u8>::zeros((size, size));
            model.segment_labels(frame.slice(ndarray::s![.., ..64, ..64]), &opts).unwrap(); // warm-up
            let before = vm_hwm_kib();
            model
                .segment(
                    frame.view(),
                    &opts,
                    lumos::engine::model::SegmentOutput::Labels(labels.view_mut()),
                    &mut lumos::engine::progress::Monitor::none(),
                )
                .unwrap();
            vm_hwm_kib() - before
        }
        "decompose" => {
            let opts = lumos::musplit::DecomposeOptions { tile: Some(128), ..Default::default() };
            let mut out = ndarray::Array3::<f32>::zeros((2, size, size));
            out.fill(1.0); // touch
            let mut warm = ndarray::Array3::<f32>::zeros((2, 64, 64));
            model
                .decompose(
                    frame.slice(ndarray::s![0, ..64, ..64]),
                    &opts,
                    warm.view_mut(),
                    &mut lumos::engine::progress::Monitor::none(),
                )
                .unwrap();
            let before = vm_hwm_kib();
            model
                .decompose(
                    frame.slice(ndarray::s![0, .., ..]),
                    &opts,
                    out.view_mut(),
                    &mut lumos::engine::progress::Monitor::none(),
                )
                .unwrap();
            vm_hwm_kib() - before
        }
        o => panic!("unknown measurement {o}"),
    };
    println!("EXTRA_KIB={extra}");
}

fn measure(what: &str, model: &Path, size: usize) -> u64 {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_measurement", "--nocapture", "--test-threads=1"])
        .env("LUMOS_MEMORY_CHILD", what)
        .env("LUMOS_MEMORY_MODEL", model)
        .env("LUMOS_MEMORY_SIZE", size.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
        .lines()
        .find_map(|l| l.split("EXTRA_KIB=").nth(1))
        .unwrap_or_else(|| panic!("no figure in {stdout}"))
        .trim()
        .parse()
        .unwrap()
}

fn tiny(method: &str, data: &Path, out: &Path) {
    let mut cfg = lumos::recipes::recipe(method, "tiny").unwrap();
    cfg.device = "cpu".into();
    cfg.val_fraction = 0.0;
    cfg.epochs = 1;
    cfg.iterations_per_epoch = 1;
    lumos::engine::train::train(&cfg, data, out, &mut lumos::engine::progress::Monitor::none()).unwrap();
}

#[test]
fn segment_and_decompose_memory_does_not_grow_with_the_frame() {
    if std::env::var("LUMOS_MEMORY_CHILD").is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ss = dir.path().join("ssqpm");
    lumos::sim::ssqpm::write_dataset(&ss, 2, 0, &lumos::sim::ssqpm::SsqpmConfig { size: 64, ..Default::default() }, 1)
        .unwrap();
    let seg = dir.path().join("seg.lumos");
    tiny("dm-qpmnet", &ss.join("train"), &seg);
    let fl = dir.path().join("fluo");
    lumos::sim::fluo::write_dataset(&fl, 2, 0, &lumos::sim::fluo::FluoConfig { size: 64, ..Default::default() }, 1)
        .unwrap();
    let split = dir.path().join("split.lumos");
    tiny("musplit-unet", &fl.join("train"), &split);

    const MIB: u64 = 1024;
    for (what, model, channels) in [("segment", &seg, 5u64), ("decompose", &split, 1)] {
        let small = measure(what, model, 1024);
        let large = measure(what, model, 3072);
        let input = channels * 3072 * 3072 * 4 / 1024;
        println!(
            "{what}: extra peak {} MiB at 1024^2, {} MiB at 3072^2 (the 3072^2 input itself: {} MiB)",
            small / MIB,
            large / MIB,
            input / MIB
        );
        assert!(large < small + 32 * MIB, "{what}: the extra peak grew from {small} KiB to {large} KiB with the frame");
    }
}
