//! Faults: a training process killed at random moments and resumed loses at most the work
//! since its last checkpoint, never leaves a corrupt model or checkpoint, and ends with the
//! very model an uninterrupted run makes; a full disk and a folder that refuses writes
//! give clear errors and leave no partial file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use lumos::sim::ssqpm::{SsqpmConfig, write_dataset};

const CLI: &str = env!("CARGO_BIN_EXE_lumos");

fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    write_dataset(dir, 3, 0, &SsqpmConfig { size: 48, ..Default::default() }, 7).unwrap();
    let cfg = dir.join("train.json");
    std::fs::write(
        &cfg,
        r#"{"kind": "dmqpm", "dmqpm": {"n_stages": 3, "base_features": 4, "max_features": 16, "fusion_stage": 1, "heads": 2},
            "epochs": 30, "iterations_per_epoch": 6, "batch_size": 2, "patch_size": [32, 32], "seed": 5,
            "device": "cpu", "val_fraction": 0.0, "threads": 1}"#,
    )
    .unwrap();
    (dir.join("train"), cfg)
}

fn train_cmd(cfg: &Path, data: &Path, out: &Path) -> Command {
    let mut c = Command::new(CLI);
    c.args(["train", "--resume", "--config"]).arg(cfg).arg("--data").arg(data).arg("--out").arg(out);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn tensors(p: &Path) -> BTreeMap<String, Vec<f32>> {
    let f = lumos::engine::weights::load(p).unwrap();
    f.tensors
        .into_iter()
        .filter(|(k, _)| !k.starts_with("optimizer."))
        .map(|(k, t)| (k, Vec::<f32>::try_from(t.view([-1])).unwrap()))
        .collect()
}

fn epochs_in(ckpt: &Path) -> usize {
    lumos::Model::load(ckpt, tch::Device::Cpu)
        .unwrap_or_else(|e| panic!("checkpoint {} does not load after a kill: {e}", ckpt.display()))
        .meta
        .provenance
        .epochs_completed
}

#[test]
fn killed_trainings_resume_to_the_uninterrupted_model() {
    let dir = tempfile::tempdir().unwrap();
    let (data, cfg) = setup(dir.path());
    let reference = dir.path().join("reference.lumos");
    let t0 = std::time::Instant::now();
    let st = train_cmd(&cfg, &data, &reference).status().unwrap();
    assert!(st.success());
    let full = t0.elapsed().as_millis() as u64;

    let out = dir.path().join("killed.lumos");
    let ckpt = dir.path().join("killed.lumos.ckpt");
    // Each run is killed after it has written 1 to 3 new checkpoints, plus a random part
    // of one epoch's time: the kill lands anywhere in an epoch (mid-step, mid-write),
    // and how many epochs a run gets does not depend on how busy the machine is. Kill
    // points come from a fixed seed.
    let epoch_ms = (full / 30).max(1);
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let stamp = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let (mut kills, mut last_epochs) = (0, 0);
    while !out.exists() && kills < 12 {
        let mut child = train_cmd(&cfg, &data, &out).spawn().unwrap();
        let (writes, fraction) = (1 + next() % 3, next() % 100);
        let (mut seen, mut last) = (0, stamp(&ckpt));
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while seen < writes && child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
            let now = stamp(&ckpt);
            if now != last {
                seen += 1;
                last = now;
            }
        }
        std::thread::sleep(Duration::from_millis(epoch_ms * fraction / 100));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL: no chance to clean up
            kills += 1;
        }
        child.wait().unwrap();
        if ckpt.exists() {
            let e = epochs_in(&ckpt);
            assert!(e >= last_epochs, "the checkpoint went back from epoch {last_epochs} to {e}");
            last_epochs = e;
        }
        if out.exists() {
            lumos::Model::load(&out, tch::Device::Cpu).expect("a model file that exists is complete");
        }
    }
    assert!(kills >= 4, "only {kills} runs could be killed before they finished; lengthen the training");
    // finish (the last run may have been killed too)
    if !out.exists() {
        assert!(train_cmd(&cfg, &data, &out).status().unwrap().success());
    }
    assert_eq!(
        tensors(&out),
        tensors(&reference),
        "after {kills} kills, the resumed model differs from the uninterrupted one"
    );
    println!("{kills} kills; last checkpoint seen at epoch {last_epochs}");
}

#[test]
fn full_disk_and_refused_writes_give_clear_errors_and_no_partial_files() {
    let dir = tempfile::tempdir().unwrap();
    let (data, cfg) = setup(dir.path());
    // a "full disk": the process may not grow any file past 32 KiB (writes fail with
    // EFBIG, as they fail with ENOSPC on a full disk); SIGXFSZ is ignored so the write
    // error reaches the engine instead of killing the process
    let out = dir.path().join("full.lumos");
    let o = Command::new("bash")
        .arg("-c")
        .arg(r#"trap "" XFSZ; ulimit -f 32; exec "$0" "$@""#)
        .arg(CLI)
        .args(["train", "--config"])
        .arg(&cfg)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("full.lumos") && stderr.contains("File too large"), "{stderr}");
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.starts_with(".lumos-tmp")), "temporary files left: {names:?}");
    assert!(!out.exists() && !dir.path().join("full.lumos.ckpt").exists(), "partial files left: {names:?}");

    // a folder that refuses writes (sysfs refuses new files, even to root)
    let model = lumos::Model::load(
        &{
            let m = dir.path().join("ok.lumos");
            assert!(train_cmd(&cfg, &data, &m).status().unwrap().success());
            m
        },
        tch::Device::Cpu,
    )
    .unwrap();
    let refused = Path::new("/sys/lumos-test.lumos");
    if Path::new("/sys").is_dir() {
        let e = model.save(refused).unwrap_err();
        assert!(matches!(e, lumos::Error::Io { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("/sys") && (msg.contains("denied") || msg.contains("Read-only")), "{msg}");
        assert!(!refused.exists());
    }
    // a missing folder
    let e = model.save(&dir.path().join("no/such/m.lumos")).unwrap_err().to_string();
    assert!(e.contains("no/such"), "{e}");
}
