//! The comparisons end to end at their tiny sizes: every variant trains, is scored and
//! lands in the report.

use lumos::dmqpm::recipes::Preset;
use lumos::engine::progress::Monitor;
use lumos_experiments::dmqpm::{self as compare, CompareOptions, VariantSet};

#[test]
fn the_comparison_runs_every_variant_and_writes_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let opts = CompareOptions {
        preset: Preset::Tiny,
        set: VariantSet::All,
        seeds: vec![0],
        data: None,
        data_seed: 1,
        work: dir.path().join("work"),
        device: "cpu".into(),
        epochs: Some(1),
        iterations: Some(1),
    };
    let mut seen = 0;
    let report = compare::run(&opts, &mut Monitor::none(), |_| seen += 1).unwrap();
    // stage 1 and 2 fit a 4-stage tiny network (stage 3 needs a tail), + concat,
    // bidirectional, early fusion, angles, phase, 4 leave-one-out
    let labels: Vec<&str> = report.summary.iter().map(|v| v.variant.as_str()).collect();
    assert_eq!(seen, labels.len());
    for want in [
        "DM-QPMNet stage 2 MHA",
        "DM-QPMNet stage 1 MHA",
        "DM-QPMNet stage 2 concat",
        "DM-QPMNet stage 2 MHA bidirectional",
        "early fusion (5-ch nnU-Net)",
        "angles only",
        "phase only",
        "early fusion [I45, I90, I135, phase]",
    ] {
        assert!(labels.contains(&want), "{want} missing from {labels:?}");
    }
    // dropping the phase is the angles-only baseline, which is not run twice
    assert_eq!(labels.len(), 11);
    for r in &report.runs {
        assert_eq!(r.dice.len(), 2);
        assert!(r.dice.iter().all(|d| (0.0..=1.0).contains(d)));
    }
    // parameter counts differ between the variants that should differ
    let p = |l: &str| report.summary.iter().find(|v| v.variant == l).unwrap().parameters;
    assert!(p("DM-QPMNet stage 2 MHA bidirectional") > p("DM-QPMNet stage 2 MHA"));
    assert!(p("angles only") > p("phase only"));
    let out = dir.path().join("report");
    report.write(&out).unwrap();
    let md = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(md.contains("| DM-QPMNet stage 2 MHA |") && md.contains("Machine:"));
    let js: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(js["runs"].as_array().unwrap().len(), 11);
}

#[test]
fn tiny_comparison_writes_both_tables() {
    use lumos::pgdiff::recipes::DiffPreset;
    use lumos_experiments::pgdiff::{DiffCompareOptions, run};
    let dir = tempfile::tempdir().unwrap();
    let opts = DiffCompareOptions {
        preset: DiffPreset::Tiny,
        seeds: vec![0],
        data: None,
        data_seed: 1,
        work: dir.path().join("work"),
        device: "cpu".into(),
        eval_seed: 0,
    };
    let mut seen = 0;
    let report = run(&opts, "test", |_| seen += 1).unwrap();
    assert_eq!(seen, report.runs.len());
    // nnU-Net + 18 sampling rows
    assert_eq!(report.runs.len(), 19);
    for r in &report.runs {
        assert!(r.miou.iter().all(|v| (0.0..=1.0).contains(v)), "{}: {:?}", r.row, r.miou);
    }
    let random = report.runs.iter().find(|r| r.row == "Random ×1").unwrap();
    // random starting noise is standard normal: KLD near 0 and no content
    let kld = lumos::engine::metrics::mean(&random.noise_kld);
    assert!(kld < 0.3, "random noise KLD {kld}");
    let md = report.markdown();
    for needle in ["Table 2", "Table 3", "Forward Diff. 300", "LDM-P 50", "network evaluations"] {
        assert!(md.contains(needle), "report lacks {needle}");
    }
    report.write(&dir.path().join("report")).unwrap();
    assert!(dir.path().join("report/results.json").is_file());
}
