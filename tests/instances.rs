//! Instances through the CLI: a model trained from instance masks, `segment --instances`
//! writing labels and a table that agree, `evaluate` reporting object metrics, and
//! `measure` refusing bad input (sizes that differ, float or negative labels, a zero
//! pixel size) with a clear message and no file written.

use std::path::Path;
use std::process::{Command, Output};

use lumos::image::Labels;

const CLI: &str = env!("CARGO_BIN_EXE_lumos");

fn run(args: &[&str]) -> Output {
    Command::new(CLI).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn train_segment_evaluate_and_measure_instances() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("qpi");
    let r = run(&["simulate", "qpi", "--out", s(&data), "--train", "3", "--test", "1", "--size", "64"]);
    assert!(r.status.success(), "{}", text(&r));
    assert!(data.join("train/instances/qpi_0000.tif").is_file() && data.join("train/truth/qpi_0000.csv").is_file());
    let model = dir.path().join("m.lumos");
    let r = run(&[
        "train",
        "--recipe",
        "nnunet",
        "--size",
        "tiny",
        "--data",
        s(&data.join("train")),
        "--out",
        s(&model),
        "--masks",
        "instances",
        "--epochs",
        "1",
    ]);
    assert!(r.status.success(), "{}", text(&r));
    let m = lumos::engine::model::Model::load(&model, tch::Device::Cpu).unwrap();
    assert_eq!(m.meta.classes.last().map(String::as_str), Some("boundary"));
    assert_eq!(m.meta.instances.and_then(|i| i.boundary_class), Some(3), "background, live, dead, boundary");

    let out = dir.path().join("seg");
    let r = run(&[
        "segment",
        "--model",
        s(&model),
        "--input",
        s(&data.join("test/images")),
        "--out",
        s(&out),
        "--instances",
        "--pixel-size",
        "0.6",
        "--wavelength",
        "550",
        "--device",
        "cpu",
        "--min-size",
        "1",
    ]);
    assert!(r.status.success(), "{}", text(&r));
    let labels = lumos::io::tiff::read_labels(&out.join("qpi_0000.tif")).unwrap();
    assert!(labels.wide, "instance labels are written in 16 bits");
    let csv = std::fs::read_to_string(out.join("qpi_0000.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    for col in ["label", "area_px", "area_um2", "eccentricity", "mean_phase", "class", "dry_mass_pg", "class_name"] {
        assert!(header.contains(&col), "{col} missing from {header:?}");
    }
    // one row per object, with its pixel count
    let n = labels.labels.iter().copied().max().unwrap() as usize;
    assert_eq!(csv.lines().count() - 1, n);
    let area_col = header.iter().position(|c| *c == "area_px").unwrap();
    let total: f64 = csv.lines().skip(1).map(|l| l.split(',').nth(area_col).unwrap().parse::<f64>().unwrap()).sum();
    assert_eq!(total as usize, labels.labels.iter().filter(|&&v| v != 0).count());

    let r = run(&["evaluate", "--model", s(&model), "--data", s(&data.join("test")), "--device", "cpu"]);
    assert!(r.status.success() && text(&r).contains("PQ") && text(&r).contains("0.90"), "{}", text(&r));

    // measure: truth labels on their image; then bad input, each refused without output
    let table = dir.path().join("t.csv");
    let r = run(&[
        "measure",
        "--labels",
        s(&data.join("test/instances/qpi_0000.tif")),
        "--image",
        s(&data.join("test/images/qpi_0000.tif")),
        "--out",
        s(&table),
        "--pixel-size",
        "0.6",
        "--wavelength",
        "550",
    ]);
    assert!(r.status.success() && table.is_file(), "{}", text(&r));
    let bad = dir.path().join("bad.csv");
    let img = s(&data.join("test/images/qpi_0000.tif")).to_string();
    let small = dir.path().join("small.tif");
    lumos::io::tiff::write_labels(&small, &Labels::from_elem((8, 8), 1)).unwrap();
    let r = run(&["measure", "--labels", s(&small), "--image", &img, "--out", s(&bad)]);
    assert!(!r.status.success() && text(&r).contains("8 x 8") && text(&r).contains("64 x 64"), "{}", text(&r));
    let r = run(&[
        "measure",
        "--labels",
        s(&data.join("test/instances/qpi_0000.tif")),
        "--pixel-size",
        "0",
        "--out",
        s(&bad),
    ]);
    assert!(!r.status.success() && text(&r).contains("positive"), "{}", text(&r));
    let float = dir.path().join("float.tif");
    let mut f = ndarray::Array3::<f32>::zeros((1, 4, 4));
    f[[0, 1, 1]] = 1.5;
    lumos::io::tiff::write_image_f32(&float, &lumos::Image::new(f.clone())).unwrap();
    let r = run(&["measure", "--labels", s(&float), "--out", s(&bad)]);
    assert!(!r.status.success() && text(&r).contains("1.5"), "{}", text(&r));
    f[[0, 1, 1]] = -2.0;
    lumos::io::tiff::write_image_f32(&float, &lumos::Image::new(f)).unwrap();
    let r = run(&["measure", "--labels", s(&float), "--out", s(&bad)]);
    assert!(!r.status.success() && text(&r).contains("-2"), "{}", text(&r));
    assert!(!bad.exists(), "no table is written for bad input");
}

#[test]
fn class_masks_with_instance_ids_point_to_instances() {
    // a 16-bit mask read as classes: labels above 255 are refused with the way out
    let dir = tempfile::tempdir().unwrap();
    for d in ["images", "masks"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
    }
    lumos::io::tiff::write_image_f32(
        &dir.path().join("images/a.tif"),
        &lumos::Image::new(ndarray::Array3::zeros((1, 32, 32))),
    )
    .unwrap();
    let mut l = Labels::zeros((32, 32));
    l[[3, 3]] = 300;
    lumos::io::tiff::write_labels(&dir.path().join("masks/a.tif"), &l).unwrap();
    let e = lumos::engine::dataset::load_segmentation(
        dir.path(),
        lumos::engine::dataset::MaskMode::Classes,
        Default::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("300") && e.contains("--masks instances"), "{e}");
    // auto: a 16-bit mask is instances
    let l = lumos::engine::dataset::load_segmentation(dir.path(), Default::default(), Default::default()).unwrap();
    assert!(l.instances.is_some());
    assert_eq!(l.samples[0].mask[[3, 3]], 2, "a one-pixel cell is all boundary (class 2)");
}
