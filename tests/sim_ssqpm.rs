//! Tests of the ssQPM polarization-camera simulator.

use lumos::Error;
use lumos::sim::ssqpm::*;

fn cfg(size: usize) -> SsqpmConfig {
    SsqpmConfig { size, ..SsqpmConfig::default() }
}

fn plane(s: &SsqpmSample, c: usize) -> Vec<f32> {
    s.image.data.index_axis(ndarray::Axis(0), c).iter().copied().collect()
}

fn median(mut v: Vec<f32>) -> f32 {
    assert!(!v.is_empty());
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn bits(s: &SsqpmSample) -> Vec<u32> {
    s.image.data.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn same_seed_is_bit_identical_and_seeds_differ() {
    let c = cfg(128);
    let a = simulate(&c, 7).unwrap();
    let b = simulate(&c, 7).unwrap();
    assert_eq!(bits(&a), bits(&b));
    assert_eq!(a.mask, b.mask);
    assert_eq!(a.instances, b.instances);
    assert_eq!(a.confluence, b.confluence);
    let d = simulate(&c, 8).unwrap();
    assert_ne!(bits(&a), bits(&d));
    assert_ne!(a.instances, d.instances);
}

#[test]
fn noise_settings_do_not_change_the_cells() {
    let c = cfg(96);
    let noisy = simulate(&c, 3).unwrap();
    let clean = simulate(&c.clone().without_noise(), 3).unwrap();
    assert_eq!(noisy.instances, clean.instances);
    assert_ne!(bits(&noisy), bits(&clean));
}

#[test]
fn shapes_and_channel_names() {
    let s = simulate(&cfg(96), 1).unwrap();
    assert_eq!(s.image.data.dim(), (5, 96, 96));
    assert_eq!(s.image.channel_names, CHANNEL_NAMES.to_vec());
    assert_eq!(CHANNEL_NAMES, ["I0", "I45", "I90", "I135", "phase"]);
    assert_eq!(s.mask.dim(), (96, 96));
    assert_eq!(s.instances.dim(), (96, 96));
    assert!(s.image.data.iter().all(|v| v.is_finite()));
    // Intensities are integral ADU within the 12-bit range.
    let max_adu = 4095.0;
    for c in 0..4 {
        assert!(plane(&s, c).iter().all(|&v| v.fract() == 0.0 && (0.0..=max_adu).contains(&v)));
    }
}

#[test]
fn mask_is_binary_and_matches_instances() {
    for seed in 0..3 {
        let s = simulate(&cfg(128), seed).unwrap();
        assert!(s.mask.iter().all(|&m| m <= 1));
        assert!(s.mask.iter().zip(s.instances.iter()).all(|(&m, &i)| (m == 1) == (i > 0)));
        // Instance ids are consecutive 1..=n.
        let n = s.n_cells();
        assert!(n > 0);
        let mut seen = vec![false; n + 1];
        s.instances.iter().for_each(|&i| seen[i as usize] = true);
        assert!(seen[1..].iter().all(|&x| x), "instance ids are not 1..={n}");
    }
}

#[test]
fn confluence_levels_are_ordered_and_within_their_bands() {
    let base = SsqpmConfig::default();
    let mut means = Vec::new();
    for conf in [Confluence::Low, Confluence::Medium, Confluence::High] {
        let c = SsqpmConfig { confluence: conf, ..base.clone() };
        let band = c.coverage_band(conf).unwrap();
        let mut sum = 0.0;
        for seed in 0..4 {
            let s = simulate(&c, seed).unwrap();
            assert_eq!(s.confluence, conf);
            let f = s.foreground_fraction();
            assert!(
                f >= band[0] - 0.02 && f <= band[1] + 0.02,
                "{conf:?} seed {seed}: fraction {f:.3} outside {band:?}"
            );
            sum += f;
        }
        means.push(sum / 4.0);
    }
    assert!(means[0] < means[1] && means[1] < means[2], "mean fractions {means:?}");
}

#[test]
fn mixed_confluence_picks_a_concrete_level() {
    let c = SsqpmConfig { confluence: Confluence::Mixed, ..cfg(96) };
    let mut levels: Vec<Confluence> = (0..12).map(|seed| simulate(&c, seed).unwrap().confluence).collect();
    assert!(levels.iter().all(|&l| l != Confluence::Mixed));
    levels.dedup();
    assert!(levels.len() > 1, "12 seeds gave a single confluence level");
}

#[test]
fn phase_is_flat_in_background_and_positive_in_cells() {
    for seed in 0..3 {
        let s = simulate(&cfg(128), seed).unwrap();
        let phase = plane(&s, 4);
        let m: Vec<u8> = s.mask.iter().copied().collect();
        let bg: Vec<f32> = phase.iter().zip(&m).filter(|(_, m)| **m == 0).map(|(p, _)| *p).collect();
        let fg: Vec<f32> = phase.iter().zip(&m).filter(|(_, m)| **m != 0).map(|(p, _)| *p).collect();
        let (bg_med, fg_med) = (median(bg), median(fg.clone()));
        let peak = fg.iter().copied().fold(f32::MIN, f32::max);
        assert!(fg_med > 0.2, "seed {seed}: median cell phase {fg_med}");
        assert!(bg_med.abs() < 0.1 * fg_med, "seed {seed}: background {bg_med} vs cells {fg_med}");
        assert!((0.3..6.0).contains(&peak), "seed {seed}: peak phase {peak} rad");
    }
}

/// Mean |(I0 - I90) / (I0 + I90)| + |(I45 - I135) / (I45 + I135)| and the standard
/// deviation of the first term, over cells and over background.
fn polarization_stats(s: &SsqpmSample, black: f32) -> ([f64; 2], [f64; 2]) {
    let i: Vec<Vec<f32>> = (0..4).map(|c| plane(s, c).iter().map(|v| v - black).collect()).collect();
    let mut acc = [[0.0f64; 4]; 2]; // [cell, bg] x [sum |d|, sum d1, sum d1^2, count]
    for (p, &m) in s.mask.iter().enumerate() {
        let d1 = ((i[0][p] - i[2][p]) / (i[0][p] + i[2][p])) as f64;
        let d2 = ((i[1][p] - i[3][p]) / (i[1][p] + i[3][p])) as f64;
        let a = &mut acc[usize::from(m == 0)];
        a[0] += d1.abs() + d2.abs();
        a[1] += d1;
        a[2] += d1 * d1;
        a[3] += 1.0;
    }
    let mean_abs = [acc[0][0] / acc[0][3], acc[1][0] / acc[1][3]];
    let sd = |a: &[f64; 4]| (a[2] / a[3] - (a[1] / a[3]).powi(2)).max(0.0).sqrt();
    (mean_abs, [sd(&acc[0]), sd(&acc[1])])
}

#[test]
fn analyser_channels_differ_inside_cells_by_retardance() {
    // Without noise and channel mismatch the background is unpolarized-looking
    // (circular light gives equal intensities) while birefringent cells are not.
    let clean = SsqpmConfig { analyser_gain_spread: 0.0, ..cfg(128) }.without_noise();
    for seed in 0..3 {
        let s = simulate(&clean, seed).unwrap();
        let (mean_abs, _) = polarization_stats(&s, clean.black_level_adu as f32);
        assert!(mean_abs[1] < 0.002, "seed {seed}: background channel difference {}", mean_abs[1]);
        assert!(mean_abs[0] > 0.015, "seed {seed}: cell channel difference {}", mean_abs[0]);
    }
    // With the default (noisy, mismatched) camera the cells still vary far more.
    let noisy = cfg(128);
    let (mut cell, mut bg) = (0.0, 0.0);
    for seed in 0..4 {
        let (_, sd) = polarization_stats(&simulate(&noisy, seed).unwrap(), noisy.black_level_adu as f32);
        cell += sd[0];
        bg += sd[1];
    }
    assert!(cell > 1.5 * bg, "spread of I0/I90 contrast: cells {cell}, background {bg}");
}

#[test]
fn stokes_identity_holds() {
    // I0 + I90 = I45 + I135 = S0 before noise: exact up to ADU rounding.
    let clean = SsqpmConfig { analyser_gain_spread: 0.0, ..cfg(128) }.without_noise();
    for seed in 0..3 {
        let s = simulate(&clean, seed).unwrap();
        let i: Vec<Vec<f32>> = (0..4).map(|c| plane(&s, c)).collect();
        let worst = (0..i[0].len()).map(|p| ((i[0][p] + i[2][p]) - (i[1][p] + i[3][p])).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 2.0, "seed {seed}: |I0 + I90 - I45 - I135| up to {worst} ADU");
        // ... and the cells do polarize: the channels are not all equal.
        assert!((0..i[0].len()).any(|p| (i[0][p] - i[2][p]).abs() > 20.0));
    }
    // With noise it holds on average.
    let noisy = SsqpmConfig { analyser_gain_spread: 0.0, ..cfg(128) };
    let s = simulate(&noisy, 5).unwrap();
    let i: Vec<Vec<f32>> = (0..4).map(|c| plane(&s, c)).collect();
    let (mut diff, mut s0) = (0.0f64, 0.0f64);
    for (((a, b), c), d) in i[0].iter().zip(&i[1]).zip(&i[2]).zip(&i[3]) {
        diff += ((a + c) - (b + d)) as f64;
        s0 += (a + c) as f64;
    }
    assert!((diff / s0).abs() < 2e-3, "relative mean Stokes mismatch {}", diff / s0);
}

fn has_touching_instances(inst: &ndarray::Array2<u16>) -> bool {
    let (h, w) = inst.dim();
    (0..h).any(|y| {
        (0..w).any(|x| {
            let a = inst[[y, x]];
            a != 0
                && ((x + 1 < w && inst[[y, x + 1]] != 0 && inst[[y, x + 1]] != a)
                    || (y + 1 < h && inst[[y + 1, x]] != 0 && inst[[y + 1, x]] != a))
        })
    })
}

/// Number of 4-connected pieces of each instance.
fn pieces_per_instance(inst: &ndarray::Array2<u16>) -> Vec<usize> {
    let (h, w) = inst.dim();
    let n = inst.iter().copied().max().unwrap_or(0) as usize;
    let mut pieces = vec![0; n + 1];
    let mut seen = vec![false; h * w];
    for start in 0..h * w {
        let l = inst[[start / w, start % w]];
        if l == 0 || seen[start] {
            continue;
        }
        pieces[l as usize] += 1;
        let mut stack = vec![start];
        seen[start] = true;
        while let Some(p) = stack.pop() {
            let (y, x) = (p / w, p % w);
            let mut nb = Vec::new();
            if x > 0 {
                nb.push(p - 1);
            }
            if x + 1 < w {
                nb.push(p + 1);
            }
            if y > 0 {
                nb.push(p - w);
            }
            if y + 1 < h {
                nb.push(p + w);
            }
            for q in nb {
                if !seen[q] && inst[[q / w, q % w]] == l {
                    seen[q] = true;
                    stack.push(q);
                }
            }
        }
    }
    pieces[1..].to_vec()
}

#[test]
fn high_confluence_has_touching_cells_and_connected_instances() {
    let c = SsqpmConfig { confluence: Confluence::High, ..cfg(192) };
    for seed in 0..3 {
        let s = simulate(&c, seed).unwrap();
        assert!(s.n_cells() >= 5, "seed {seed}: only {} cells", s.n_cells());
        assert!(has_touching_instances(&s.instances), "seed {seed}: no touching cells at high confluence");
        let pieces = pieces_per_instance(&s.instances);
        assert!(pieces.iter().all(|&p| p == 1), "seed {seed}: pieces per instance {pieces:?}");
    }
}

#[test]
fn write_dataset_layout_json_and_readback() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    let c = cfg(96);
    let summary = write_dataset(&dir, 2, 1, &c, 42).unwrap();
    assert_eq!(summary.train, vec!["ssqpm_0000", "ssqpm_0001"]);
    assert_eq!(summary.test, vec!["ssqpm_0000"]);
    for (split, names) in [("train", &summary.train), ("test", &summary.test)] {
        for name in names {
            for sub in ["images", "masks", "instances"] {
                let p = dir.join(split).join(sub).join(format!("{name}.tif"));
                assert!(p.is_file(), "missing {}", p.display());
            }
        }
    }
    // simulation.json: config, seed and names.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("simulation.json")).unwrap()).unwrap();
    assert_eq!(json["seed"], 42);
    assert_eq!(json["train"], serde_json::json!(["ssqpm_0000", "ssqpm_0001"]));
    assert_eq!(json["test"], serde_json::json!(["ssqpm_0000"]));
    let back: SsqpmConfig = serde_json::from_value(json["config"].clone()).unwrap();
    assert_eq!(back, c);
    // Mixed confluence cycles low, medium, high.
    assert_eq!(json["samples"]["train"][0]["confluence"], "low");
    assert_eq!(json["samples"]["train"][1]["confluence"], "medium");

    // The files hold what simulate() gives for the derived seed.
    let expect =
        simulate(&SsqpmConfig { confluence: Confluence::Medium, ..c.clone() }, sample_seed(42, false, 1)).unwrap();
    let mask = lumos::io::tiff::read_mask(&dir.join("train/masks/ssqpm_0001.tif")).unwrap();
    assert_eq!(mask, expect.mask);
    let img = lumos::io::tiff::read_image(&dir.join("train/images/ssqpm_0001.tif")).unwrap();
    assert_eq!(img.data, expect.image.data);

    // Image i does not depend on how many images are written.
    let dir2 = tmp.path().join("ds2");
    write_dataset(&dir2, 1, 0, &c, 42).unwrap();
    let a = std::fs::read(dir.join("train/images/ssqpm_0000.tif")).unwrap();
    let b = std::fs::read(dir2.join("train/images/ssqpm_0000.tif")).unwrap();
    assert_eq!(a, b);
    // Train and test images differ.
    let t = std::fs::read(dir.join("test/images/ssqpm_0000.tif")).unwrap();
    assert_ne!(a, t);
}

fn config_error(c: &SsqpmConfig) -> String {
    match simulate(c, 0) {
        Err(Error::Config(msg)) => msg,
        Err(e) => panic!("expected a config error, got {e}"),
        Ok(_) => panic!("expected a config error, got a sample"),
    }
}

#[test]
fn invalid_configs_are_rejected_naming_the_field() {
    let d = SsqpmConfig::default();
    let cases: Vec<(SsqpmConfig, &str)> = vec![
        (SsqpmConfig { size: 0, ..d.clone() }, "size"),
        (SsqpmConfig { pixel_size_um: f64::NAN, ..d.clone() }, "pixel_size_um"),
        (SsqpmConfig { pixel_size_um: -0.5, ..d.clone() }, "pixel_size_um"),
        (SsqpmConfig { wavelength_um: 0.0, ..d.clone() }, "wavelength_um"),
        (SsqpmConfig { n_medium: f64::NAN, ..d.clone() }, "n_medium"),
        (SsqpmConfig { numerical_aperture: 2.0, ..d.clone() }, "numerical_aperture"),
        (SsqpmConfig { cell_diameter_um: [30.0, 10.0], ..d.clone() }, "cell_diameter_um"),
        (SsqpmConfig { cell_height_um: [-1.0, 3.0], ..d.clone() }, "cell_height_um"),
        (SsqpmConfig { birefringence: [f64::NAN, 1e-3], ..d.clone() }, "birefringence"),
        (SsqpmConfig { full_well_e: 0.0, ..d.clone() }, "full_well_e"),
        (SsqpmConfig { read_noise_e: -1.0, ..d.clone() }, "read_noise_e"),
        (SsqpmConfig { phase_noise_rad: f64::INFINITY, ..d.clone() }, "phase_noise_rad"),
        (SsqpmConfig { bit_depth: 0, ..d.clone() }, "bit_depth"),
        (SsqpmConfig { coverage_high: [0.7, 0.5], ..d.clone() }, "coverage_high"),
    ];
    for (c, field) in cases {
        let msg = config_error(&c);
        assert!(msg.contains(field), "error for {field} does not name it: {msg}");
    }
    // write_dataset validates before touching the disk.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("never");
    let bad = SsqpmConfig { size: 0, ..d };
    assert!(matches!(write_dataset(&dir, 1, 1, &bad, 0), Err(Error::Config(_))));
    assert!(!dir.exists());
}

#[test]
fn config_json_defaults_and_roundtrip() {
    let c: SsqpmConfig = serde_json::from_str(r#"{"size": 64, "confluence": "high"}"#).unwrap();
    assert_eq!(c.size, 64);
    assert_eq!(c.confluence, Confluence::High);
    assert_eq!(c.wavelength_um, SsqpmConfig::default().wavelength_um);
    let d = SsqpmConfig::default();
    assert_eq!((d.size, d.wavelength_um, d.n_medium), (256, 0.532, 1.337));
    let back: SsqpmConfig = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
    assert_eq!(back, d);
    // Typos are caught rather than silently ignored.
    assert!(serde_json::from_str::<SsqpmConfig>(r#"{"sise": 64}"#).is_err());
    assert_eq!(serde_json::to_string(&Confluence::Mixed).unwrap(), "\"mixed\"");
}
