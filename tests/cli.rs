//! The CLI's handling of its inputs: `simulate` honours a --config file and never mixes
//! into an earlier simulation, `segment --probabilities` writes the same labels as a plain
//! run, sampling flags on a model that does not sample are refused, and absurd numbers end
//! in an error message, not a panic.

use std::path::Path;
use std::process::{Command, Output};

mod common;

const CLI: &str = env!("CARGO_BIN_EXE_lumos");

fn run(args: &[&str]) -> Output {
    Command::new(CLI).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn simulate_honours_the_config_and_never_mixes_runs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sim.json");
    std::fs::write(&cfg, r#"{"size": 32}"#).unwrap();
    let out = dir.path().join("data");
    let o = out.to_str().unwrap();
    let r = run(&["simulate", "ssqpm", "--out", o, "--train", "2", "--test", "0", "--config", cfg.to_str().unwrap()]);
    assert!(r.status.success(), "{}", text(&r));
    let img = lumos::io::tiff::read_image(&out.join("train/images/ssqpm_0000.tif")).unwrap();
    assert_eq!((img.height(), img.width()), (32, 32), "the config's size, not the flag's default");
    // a second run into the same folder would leave ssqpm_0001 of the first one behind
    let r = run(&["simulate", "ssqpm", "--out", o, "--train", "1", "--test", "0", "--size", "32", "--seed", "2"]);
    assert!(!r.status.success() && text(&r).contains("--force"), "{}", text(&r));
    let r = run(&[
        "simulate", "ssqpm", "--out", o, "--train", "1", "--test", "0", "--size", "32", "--seed", "2", "--force",
    ]);
    assert!(r.status.success(), "{}", text(&r));
    let n = std::fs::read_dir(out.join("train/images")).unwrap().count();
    assert_eq!(n, 1, "--force replaced the earlier images");
}

#[test]
fn probabilities_and_labels_agree_and_wrong_flags_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (model, input) = common::tiny_nnunet(dir.path(), 48, 2, 1, 3);
    let seg = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "segment",
            "--device",
            "cpu",
            "-m",
            model.to_str().unwrap(),
            "-i",
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        run(&a)
    };
    let (plain, prob) = (dir.path().join("plain"), dir.path().join("prob"));
    assert!(seg(&plain, &[]).status.success());
    let r = seg(&prob, &["--probabilities"]);
    assert!(r.status.success(), "{}", text(&r));
    let a = lumos::io::tiff::read_mask(&plain.join("ssqpm_0000_mask.tif")).unwrap();
    let b = lumos::io::tiff::read_mask(&prob.join("ssqpm_0000_mask.tif")).unwrap();
    assert_eq!(a, b, "labels from the probabilities pass equal a plain segmentation");
    assert!(prob.join("ssqpm_0000_prob.tif").is_file());
    // PG-DiffSeg sampling flags on an nnU-Net
    let r = seg(&dir.path().join("x"), &["--samples", "3"]);
    assert!(!r.status.success() && text(&r).contains("does not sample"), "{}", text(&r));
}

#[test]
fn absurd_numbers_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.lumos");
    let r = run(&[
        "train",
        "--data",
        "/nonexistent",
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "18446744073709551615",
        "--iterations",
        "2",
    ]);
    assert_eq!(r.status.code(), Some(1), "{}", text(&r));
    assert!(!text(&r).contains("panicked"), "{}", text(&r));
}
