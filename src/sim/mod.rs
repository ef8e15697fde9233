//! Physically grounded simulators of the three modalities: single-shot QPM (`ssqpm`),
//! live/dead QPI (`qpi`) and two-structure fluorescence (`fluo`).

pub mod fluo;
pub mod qpi;
pub mod ssqpm;

use crate::error::{Error, Result};
use crate::image::Image;

/// The simulated modalities, by the names the CLI, the C API and the plugins use.
pub const MODALITIES: [&str; 3] = ["ssqpm", "qpi", "fluo"];

/// One simulated frame with its ground truth.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The input image: ssqpm `(5, H, W)` I0, I45, I90, I135 (ADU) and phase (rad);
    /// qpi `(1, H, W)` phase (rad); fluo `(1, H, W)` the superimposed image (photo-electrons).
    pub image: Image,
    /// The truth: ssqpm `(1, H, W)` mask 0 background / 1 cell; qpi `(1, H, W)` mask
    /// 0 background / 1 live / 2 dead; fluo `(2, H, W)` the two structures (photons).
    pub truth: Image,
}

fn parse_config<T: serde::de::DeserializeOwned + Default>(modality: &str, json: &str) -> Result<T> {
    if json.trim().is_empty() {
        return Ok(T::default());
    }
    serde_json::from_str(json).map_err(|e| Error::Config(format!("{modality} simulator settings: {e}")))
}

fn mask_image(mask: &crate::image::Mask, name: &str) -> Image {
    let (h, w) = mask.dim();
    let data = mask.mapv(f32::from).into_shape_with_order((1, h, w)).expect("same length");
    Image { data, channel_names: vec![name.to_string()] }
}

/// Simulates one frame of `modality` ("ssqpm", "qpi" or "fluo") with the simulator's
/// settings given as JSON (the same fields as `lumos simulate --config`; empty means the
/// defaults; unknown fields are an error). The same seed gives the same frame.
pub fn simulate_frame(modality: &str, config_json: &str, seed: u64) -> Result<Frame> {
    match modality {
        "ssqpm" => {
            let cfg: ssqpm::SsqpmConfig = parse_config(modality, config_json)?;
            let s = ssqpm::simulate(&cfg, seed)?;
            Ok(Frame { truth: mask_image(&s.mask, "cell"), image: s.image })
        }
        "qpi" => {
            let cfg: qpi::QpiConfig = parse_config(modality, config_json)?;
            let s = qpi::simulate(&cfg, seed)?;
            Ok(Frame { truth: mask_image(&s.mask, "class"), image: s.image })
        }
        "fluo" => {
            let cfg: fluo::FluoConfig = parse_config(modality, config_json)?;
            let s = fluo::simulate(&cfg, seed)?;
            Ok(Frame { image: s.input, truth: s.targets })
        }
        other => Err(Error::InvalidArgument(format!(
            "unknown modality '{other}'; expected one of {}",
            MODALITIES.join(", ")
        ))),
    }
}

/// Writes the truth of each cell of a frame as CSV: `label`, `class` (the class most of
/// the cell's pixels have in `mask`, when given, named by `class_names`) and
/// `dry_mass_pg` (`dry_mass_pg[i]` for label `i + 1`).
pub(crate) fn write_truth(
    path: &std::path::Path,
    instances: &crate::image::Labels,
    mask: Option<&crate::image::Mask>,
    dry_mass_pg: &[f64],
    class_names: &[&str],
) -> Result<()> {
    let n = dry_mass_pg.len();
    let mut votes = vec![[0u32; 256]; n + 1];
    if let Some(m) = mask {
        for (&l, &c) in instances.iter().zip(m.iter()) {
            if l != 0 && (l as usize) <= n {
                votes[l as usize][c as usize] += 1;
            }
        }
    }
    let mut columns = vec!["label".to_string()];
    if mask.is_some() {
        columns.push("class".into());
    }
    columns.push("dry_mass_pg".into());
    let mut values = Vec::with_capacity(n * columns.len());
    for (i, &dm) in dry_mass_pg.iter().enumerate() {
        values.push((i + 1) as f64);
        if mask.is_some() {
            let v = &votes[i + 1];
            let class = (1..256).fold(1usize, |b, k| if v[k] > v[b] { k } else { b });
            values.push(class as f64);
        }
        values.push(dm);
    }
    let t = crate::engine::measure::Table {
        columns,
        values,
        class_names: class_names.iter().map(|s| s.to_string()).collect(),
    };
    t.save_csv(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_the_documented_shapes_and_are_seeded() {
        for (m, cfg, c, t) in
            [("ssqpm", r#"{"size": 64}"#, 5, 1), ("qpi", r#"{"size": 64}"#, 1, 1), ("fluo", r#"{"size": 64}"#, 1, 2)]
        {
            let a = simulate_frame(m, cfg, 3).unwrap();
            assert_eq!(a.image.data.dim(), (c, 64, 64), "{m}");
            assert_eq!(a.truth.data.dim(), (t, 64, 64), "{m}");
            let b = simulate_frame(m, cfg, 3).unwrap();
            assert_eq!(a.image.data, b.image.data, "{m}: same seed, same frame");
        }
        assert!(matches!(simulate_frame("sem", "", 0), Err(Error::InvalidArgument(_))));
        let e = simulate_frame("qpi", r#"{"sise": 64}"#, 0).unwrap_err().to_string();
        assert!(e.contains("sise"), "{e}");
    }
}
