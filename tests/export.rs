//! bioimage.io export: every model kind exports, the package is complete and consistent
//! (sha256 of every file, the reloaded TorchScript reproduces the test output, the
//! engine agrees), bad requests fail without writing anything.
//! (bioimageio.spec / bioimageio.core run the packages in bindings/python/tests/test_bioimageio.py.)

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use lumos::export::{ExportOptions, Person, export_bioimageio};
use sha2::{Digest, Sha256};
use tch::{CModule, Device, IValue, Tensor};

fn train_tiny(method: &str, data: &Path, out: &Path) {
    let mut cfg = lumos::recipes::recipe(method, "tiny").unwrap();
    cfg.device = "cpu".into();
    cfg.val_fraction = 0.0;
    cfg.epochs = 1;
    lumos::engine::train::train(&cfg, data, out, &mut lumos::engine::progress::Monitor::none()).unwrap();
}

/// Tiny models of every kind, trained once for the whole file.
struct Models {
    _dir: tempfile::TempDir,
    dmqpm: PathBuf,
    nnunet_qpi: PathBuf,
    pgdiff: PathBuf,
    musplit: PathBuf,
    hvae: PathBuf,
}

fn models() -> &'static Models {
    static M: OnceLock<Models> = OnceLock::new();
    M.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        lumos::sim::ssqpm::write_dataset(
            &d.join("ss"),
            2,
            0,
            &lumos::sim::ssqpm::SsqpmConfig { size: 64, ..Default::default() },
            1,
        )
        .unwrap();
        lumos::sim::qpi::write_dataset(
            &d.join("qpi"),
            2,
            0,
            &lumos::sim::qpi::QpiConfig { size: 64, ..Default::default() },
            2,
        )
        .unwrap();
        lumos::sim::fluo::write_dataset(
            &d.join("fluo"),
            2,
            0,
            &lumos::sim::fluo::FluoConfig { size: 96, ..Default::default() },
            3,
        )
        .unwrap();
        let m = |name: &str| d.join(format!("{name}.lumos"));
        train_tiny("dm-qpmnet", &d.join("ss/train"), &m("dmqpm"));
        train_tiny("nnunet", &d.join("qpi/train"), &m("nnunet"));
        train_tiny("pg-diffseg", &d.join("qpi/train"), &m("pgdiff"));
        train_tiny("musplit-unet", &d.join("fluo/train"), &m("musplit"));
        train_tiny("musplit-hvae", &d.join("fluo/train"), &m("hvae"));
        Models {
            dmqpm: m("dmqpm"),
            nnunet_qpi: m("nnunet"),
            pgdiff: m("pgdiff"),
            musplit: m("musplit"),
            hvae: m("hvae"),
            _dir: dir,
        }
    })
}

fn sha256(p: &Path) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(p).unwrap()))
}

fn npy(p: &Path) -> Tensor {
    let a: ndarray::Array4<f32> = ndarray_npy::read_npy(p).unwrap();
    let shape: Vec<i64> = a.shape().iter().map(|&d| d as i64).collect();
    Tensor::from_slice(a.as_slice().unwrap()).view(shape.as_slice())
}

/// Checks a package folder: every file the rdf names exists with the sha256 it states,
/// and the TorchScript reproduces test_output from test_input (after the declared
/// preprocessing).
fn check_package(dir: &Path) -> serde_json::Value {
    let rdf: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(dir.join("rdf.yaml")).unwrap()).unwrap();
    assert_eq!(rdf["type"], "model");
    assert!(rdf["format_version"].as_str().unwrap().starts_with("0.5."));
    for key in
        ["name", "description", "authors", "cite", "license", "tags", "documentation", "covers", "timestamp", "version"]
    {
        assert!(!rdf[key].is_null(), "rdf lacks {key}");
    }
    let mut named = vec![
        (rdf["weights"]["torchscript"]["source"].clone(), rdf["weights"]["torchscript"]["sha256"].clone()),
        (rdf["inputs"][0]["test_tensor"]["source"].clone(), rdf["inputs"][0]["test_tensor"]["sha256"].clone()),
        (rdf["outputs"][0]["test_tensor"]["source"].clone(), rdf["outputs"][0]["test_tensor"]["sha256"].clone()),
        (rdf["inputs"][0]["sample_tensor"]["source"].clone(), rdf["inputs"][0]["sample_tensor"]["sha256"].clone()),
        (rdf["outputs"][0]["sample_tensor"]["source"].clone(), rdf["outputs"][0]["sample_tensor"]["sha256"].clone()),
    ];
    for a in rdf["attachments"].as_array().unwrap() {
        named.push((a["source"].clone(), a["sha256"].clone()));
    }
    for (src, sha) in named {
        let p = dir.join(src.as_str().unwrap());
        assert_eq!(sha256(&p), sha.as_str().unwrap(), "sha256 of {}", p.display());
    }
    for f in ["README.md", "cover.png"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    // the TorchScript reproduces the test output
    let module = CModule::load_on_device(dir.join("weights.pt"), Device::Cpu).unwrap();
    let x = npy(&dir.join("test_input.npy"));
    let per_image =
        rdf["inputs"][0]["preprocessing"].as_array().unwrap().iter().any(|p| p["id"] == "zero_mean_unit_variance");
    let x = if per_image {
        let m = x.mean_dim(&[2i64, 3][..], true, tch::Kind::Double);
        let s = x.to_kind(tch::Kind::Double).std_correction(&[2i64, 3][..], 0, true);
        ((x.to_kind(tch::Kind::Double) - m) / (s + lumos::export::ZMUV_EPS)).to_kind(tch::Kind::Float)
    } else {
        x
    };
    let IValue::Tensor(y) = module.forward_is(&[IValue::Tensor(x)]).unwrap() else { panic!("not a tensor") };
    let want = npy(&dir.join("test_output.npy"));
    assert_eq!(y.size(), want.size());
    let d = (&y - &want).abs().max().double_value(&[]);
    assert!(d < 1e-5, "the reloaded TorchScript differs from test_output.npy by {d}");
    rdf
}

fn export(model: &Path, out: &Path) -> lumos::export::ExportReport {
    let opts = ExportOptions {
        authors: vec![Person::parse("Ada Tester; Imaging Lab; 0000-0002-1825-0097").unwrap()],
        maintainers: vec![Person { name: "Ada".into(), github_user: Some("ada-tester".into()), ..Default::default() }],
        ..Default::default()
    };
    let r = export_bioimageio(model, out, &opts).unwrap();
    assert!(r.self_check < lumos::export::SELF_CHECK_TOLERANCE, "self-check {}", r.self_check);
    r
}

#[test]
fn dmqpm_export_is_complete_and_consistent() {
    let out = tempfile::tempdir().unwrap();
    let pkg = out.path().join("dmqpm");
    let r = export(&models().dmqpm, &pkg);
    assert_eq!(r.input_shape, vec![1, 5, 32, 32]);
    assert_eq!(r.output_shape, vec![1, 2, 32, 32]);
    let rdf = check_package(&pkg);
    // ssQPM: fitted normalization inside the graph, no per-image preprocessing
    assert!(
        !rdf["inputs"][0]["preprocessing"].as_array().unwrap().iter().any(|p| p["id"] == "zero_mean_unit_variance")
    );
    assert_eq!(rdf["inputs"][0]["axes"][1]["channel_names"], serde_json::json!(["I0", "I45", "I90", "I135", "phase"]));
    assert_eq!(rdf["authors"][0]["orcid"], "0000-0002-1825-0097");
    assert_eq!(rdf["maintainers"][0]["github_user"], "ada-tester");
    // probabilities sum to one
    let y = npy(&pkg.join("test_output.npy"));
    let s = y.sum_dim_intlist(1, false, tch::Kind::Float);
    assert!((s - 1.0).abs().max().double_value(&[]) < 1e-5);
}

#[test]
fn per_image_normalization_becomes_rdf_preprocessing() {
    let out = tempfile::tempdir().unwrap();
    let pkg = out.path().join("nn");
    export(&models().nnunet_qpi, &pkg);
    let rdf = check_package(&pkg);
    let pre = rdf["inputs"][0]["preprocessing"].as_array().unwrap();
    let z = pre.iter().find(|p| p["id"] == "zero_mean_unit_variance").expect("per-image z-score declared");
    assert_eq!(z["kwargs"]["axes"], serde_json::json!(["y", "x"]));
}

#[test]
fn pgdiff_and_musplit_export_and_zip() {
    let out = tempfile::tempdir().unwrap();
    for (name, model, shape_in, shape_out) in [
        ("pg", &models().pgdiff, vec![1, 1, 32, 32], vec![1, 3, 32, 32]),
        ("mu", &models().musplit, vec![1, 1, 64, 64], vec![1, 2, 16, 16]),
        ("hv", &models().hvae, vec![1, 1, 64, 64], vec![1, 2, 16, 16]),
    ] {
        let pkg = out.path().join(name);
        let r = export(model, &pkg);
        assert_eq!((r.input_shape, r.output_shape), (shape_in, shape_out), "{name}");
        check_package(&pkg);
    }
    // a .zip package holds the same files
    let z = out.path().join("mu.zip");
    export(&models().musplit, &z);
    let mut archive = zip::ZipArchive::new(std::fs::File::open(&z).unwrap()).unwrap();
    let names: Vec<String> =
        (0..archive.len()).map(|i| archive.by_index(i).unwrap().name().unwrap().to_string()).collect();
    for f in ["rdf.yaml", "weights.pt", "test_input.npy", "test_output.npy", "README.md", "cover.png"] {
        assert!(names.iter().any(|n| n == f), "{f} missing from the zip: {names:?}");
    }
    // exporting twice is deterministic in its tensors
    let again = out.path().join("mu2");
    export(&models().musplit, &again);
    assert_eq!(sha256(&out.path().join("mu/test_output.npy")), sha256(&again.join("test_output.npy")));
}

#[test]
fn refusals_write_nothing() {
    let out = tempfile::tempdir().unwrap();
    // random PG-DiffSeg sampling cannot be traced faithfully
    let m = lumos::engine::model::Model::load(&models().pgdiff, Device::Cpu).unwrap();
    let mut meta = m.meta.clone();
    let mut arch: lumos::pgdiff::PgDiffConfig = serde_json::from_value(meta.architecture.clone()).unwrap();
    arch.sampling.start = lumos::pgdiff::StartNoise::Random;
    meta.architecture = serde_json::to_value(&arch).unwrap();
    let random = lumos::engine::model::Model::new(meta, Device::Cpu).unwrap();
    let rp = out.path().join("random.lumos");
    random.save(&rp).unwrap();
    let e = export_bioimageio(&rp, &out.path().join("r"), &ExportOptions::default()).unwrap_err();
    assert!(e.to_string().contains("random draws cannot be exported"), "{e}");
    assert!(!out.path().join("r").exists());

    // a folder that is not an earlier export is never replaced
    let keep = out.path().join("mine");
    std::fs::create_dir(&keep).unwrap();
    std::fs::write(keep.join("notes.txt"), "precious").unwrap();
    let e = export_bioimageio(&models().musplit, &keep, &ExportOptions::default()).unwrap_err();
    assert!(e.to_string().contains("not an earlier export"), "{e}");
    assert_eq!(std::fs::read_to_string(keep.join("notes.txt")).unwrap(), "precious");

    // names bioimage.io would reject, tiles the network cannot take, a sample too small
    let bad_name = ExportOptions { name: Some("a:b".into()), ..Default::default() };
    assert!(
        export_bioimageio(&models().dmqpm, &out.path().join("x"), &bad_name)
            .unwrap_err()
            .to_string()
            .contains("model name")
    );
    // what the bioimage.io validator rejects is refused before the trace
    let x = out.path().join("x");
    let refuse = |o: ExportOptions, what: &str| {
        let e = export_bioimageio(&models().dmqpm, &x, &o).unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
    };
    refuse(ExportOptions { license: "MIT License".into(), ..Default::default() }, "not an SPDX identifier");
    refuse(ExportOptions { description: Some("x".repeat(1025)), ..Default::default() }, "at most 1024");
    refuse(
        ExportOptions { authors: vec![Person::parse("Ada; Lab; 0000-0002-1825-0098").unwrap()], ..Default::default() },
        "not a valid ORCID",
    );
    // "Name; ORCID" puts the ORCID where it belongs
    let p = Person::parse("Ada Tester; 0000-0002-1825-0097").unwrap();
    assert_eq!((p.affiliation, p.orcid.as_deref()), (None, Some("0000-0002-1825-0097")));
    let bad_tile = ExportOptions { tile: Some([30, 32]), ..Default::default() };
    assert!(
        export_bioimageio(&models().dmqpm, &out.path().join("x"), &bad_tile)
            .unwrap_err()
            .to_string()
            .contains("multiples of")
    );
    let small = out.path().join("small.tif");
    let f = lumos::sim::simulate_frame("ssqpm", r#"{"size": 16}"#, 0).unwrap();
    lumos::io::tiff::write_image_f32(&small, &f.image).unwrap();
    let e = export_bioimageio(
        &models().dmqpm,
        &out.path().join("x"),
        &ExportOptions { sample: Some(small), ..Default::default() },
    )
    .unwrap_err();
    assert!(e.to_string().contains("at least 32 x 32"), "{e}");
    // no staging folder or temporary file is left behind
    let left: Vec<_> =
        std::fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    assert!(!left.iter().any(|n| n.starts_with(".lumos-export")), "{left:?}");
    assert!(!out.path().join("x").exists());
}
