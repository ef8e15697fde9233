//! The CLI's `--precision`: `lumos segment --precision bfloat16` runs (bfloat16 autocast on
//! the CPU here), writes probabilities close to float32's, and a wrong name is refused before
//! any output is written, naming the accepted values.

use std::path::Path;
use std::process::Command;

mod common;

const CLI: &str = env!("CARGO_BIN_EXE_lumos");

fn segment(model: &Path, input: &Path, out: &Path, precision: &str) -> std::process::Output {
    Command::new(CLI)
        .args(["segment", "--device", "cpu", "--probabilities", "--precision", precision, "-m"])
        .arg(model)
        .arg("-i")
        .arg(input)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn segment_precision_flag() {
    let dir = tempfile::tempdir().unwrap();
    let (model, input) = common::tiny_nnunet(dir.path(), 64, 2, 1, 5);

    let (o32, o16) = (dir.path().join("fp32"), dir.path().join("bf16"));
    for (out, p) in [(&o32, "float32"), (&o16, "bf16")] {
        let r = segment(&model, &input, out, p);
        assert!(r.status.success(), "--precision {p}: {}", String::from_utf8_lossy(&r.stderr));
    }
    let read = |d: &Path| lumos::io::tiff::read_image(&d.join("ssqpm_0000_prob.tif")).unwrap().data;
    let (p32, p16) = (read(&o32), read(&o16));
    assert_eq!(p32.dim(), p16.dim());
    let n = p32.len() as f32;
    let mean_diff = p32.iter().zip(p16.iter()).map(|(a, b)| (a - b).abs()).sum::<f32>() / n;
    assert!(mean_diff > 0.0, "bfloat16 changed nothing: autocast did not take effect");
    assert!(mean_diff < 0.02, "bfloat16 probabilities differ from float32 by {mean_diff} on average");

    let bad = dir.path().join("bad");
    let r = segment(&model, &input, &bad, "fp16");
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("fp16") && err.contains("bfloat16"), "{err}");
    assert!(!bad.exists(), "nothing written for a refused precision");
}
