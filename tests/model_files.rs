//! Model files: self-describing, atomic, and loading anything else fails clearly.

use std::collections::HashMap;

use lumos::Image;
use lumos::engine::model::{Model, ModelKind, ModelMeta, SegmentOptions};
use lumos::engine::normalize::{NormMethod, Normalizer};
use lumos::nnunet::net::UnetConfig;
use ndarray::Array3;
use tch::Device;

fn small_model() -> Model {
    let img = Image::new(Array3::from_shape_fn((2, 16, 16), |(c, y, x)| (c + y * x) as f32));
    let norm = Normalizer::fit(&[NormMethod::DatasetZscore], &[&img]).unwrap();
    let arch = serde_json::to_value(UnetConfig { n_stages: 3, base_features: 4, max_features: 8, convs_per_stage: 1 })
        .unwrap();
    let meta = ModelMeta::new(
        ModelKind::Unet,
        arch,
        vec!["a".into(), "b".into()],
        vec!["bg".into(), "fg".into(), "x".into()],
        [16, 16],
        norm,
    );
    tch::manual_seed(0);
    Model::new(meta, Device::Cpu).unwrap()
}

fn load_err(p: &std::path::Path) -> String {
    match Model::load(p, Device::Cpu) {
        Ok(_) => panic!("{} loaded", p.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn round_trip_and_rejections() {
    let dir = tempfile::tempdir().unwrap();
    let m = small_model();
    let p = dir.path().join("m.lumos");
    m.save(&p).unwrap();
    let l = Model::load(&p, Device::Cpu).unwrap();
    assert_eq!(l.meta, m.meta);
    let x = Array3::from_shape_fn((2, 40, 23), |(c, y, x)| ((c * 31 + y * 7 + x) % 13) as f32);
    let o = SegmentOptions::default();
    assert_eq!(m.segment_labels(x.view(), &o).unwrap(), l.segment_labels(x.view(), &o).unwrap());

    // missing
    assert!(load_err(&dir.path().join("none.lumos")).contains("none.lumos"));
    // not safetensors
    let junk = dir.path().join("junk.lumos");
    std::fs::write(&junk, b"hello").unwrap();
    assert!(load_err(&junk).contains("not a readable safetensors file"));
    // truncated
    let bytes = std::fs::read(&p).unwrap();
    let tr = dir.path().join("trunc.lumos");
    std::fs::write(&tr, &bytes[..bytes.len() - 100]).unwrap();
    assert!(load_err(&tr).contains("safetensors"));
    // a plain safetensors file without lumos metadata
    let plain = dir.path().join("plain.safetensors");
    let t = tch::Tensor::zeros([2, 2], (tch::Kind::Float, Device::Cpu));
    lumos::engine::weights::save(&plain, &[("w".into(), t)], HashMap::new()).unwrap();
    assert!(load_err(&plain).contains("without lumos metadata"));
    // a newer format, and another kind
    let file = lumos::engine::weights::load(&p).unwrap();
    let tensors: Vec<(String, tch::Tensor)> =
        file.tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    let rewrite = |name: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&file.metadata["lumos"]).unwrap();
        f(&mut v);
        let q = dir.path().join(name);
        lumos::engine::weights::save(&q, &tensors, HashMap::from([("lumos".to_string(), v.to_string())])).unwrap();
        q
    };
    let newer = rewrite("newer.lumos", &|v| {
        v["format_version"] = 99.into();
        v["provenance"]["lumos_version"] = "7.2.0".into();
    });
    let e = load_err(&newer);
    // both engines' versions and the format versions, and what to do
    assert!(e.contains("written by lumos 7.2.0") && e.contains("format version 99"), "{e}");
    assert!(
        e.contains(&format!("this lumos ({})", env!("CARGO_PKG_VERSION"))) && e.contains("install lumos 7.2.0"),
        "{e}"
    );
    let other = rewrite("other.lumos", &|v| v["kind"] = "transformer".into());
    assert!(load_err(&other).contains("kind 'transformer'"));
    // weights that do not fit the architecture
    let wrong = rewrite("wrong.lumos", &|v| v["architecture"]["base_features"] = 8.into());
    assert!(load_err(&wrong).contains("shape"));
    // saving into a missing folder fails and leaves nothing
    assert!(m.save(&dir.path().join("no/such/dir/m.lumos")).is_err());
    // no temporary files left
    assert!(
        std::fs::read_dir(dir.path())
            .unwrap()
            .all(|e| { !e.unwrap().file_name().to_string_lossy().starts_with(".lumos-tmp") })
    );
}

#[test]
fn segment_rejects_bad_input() {
    let m = small_model();
    let o = SegmentOptions::default();
    let e = m.segment_labels(Array3::<f32>::zeros((3, 8, 8)).view(), &o).unwrap_err().to_string();
    assert!(e.contains("3 channels") && e.contains("expects 2"), "{e}");
    let mut x = Array3::<f32>::zeros((2, 8, 8));
    x[[1, 2, 3]] = f32::NAN;
    assert!(m.segment_labels(x.view(), &o).unwrap_err().to_string().contains("row 2, column 3"));
    assert!(m.segment_labels(Array3::<f32>::zeros((2, 0, 8)).view(), &o).is_err());
    assert!(m.check_decompose().unwrap_err().to_string().contains("not supported"));
    // frames smaller than a tile work (padding)
    let small = m.segment_labels(Array3::<f32>::ones((2, 5, 7)).view(), &o).unwrap();
    assert_eq!(small.dim(), (5, 7));
}
