//! Instances: one label per cell, for every segmentation method.
//!
//! Training from instance label masks converts each mask to pixel classes the network
//! learns ([`targets_from_instances`]); inference turns the predicted class map back into
//! instance labels ([`instances_from_classes`]). Both are method-independent: nnU-Net,
//! DM-QPMNet and PG-DiffSeg learn the same targets, and each method's own segment verb
//! produces the class map the post-processing reads.
//!
//! **Targets.** With [`InstanceTargets::Boundary`] (the default, chosen by measurement;
//! see docs/instances.md) a model learns `background`, one interior class per cell class
//! (`cell`, or for example `live` and `dead`) and a last class `boundary`: the pixels of
//! an object that touch another object or the background (4-neighbourhood; the frame edge
//! does not count). Two touching cells are then separated by a two-pixel boundary band.
//! With [`InstanceTargets::Foreground`] the model learns the cell classes only and objects
//! are the connected regions of the prediction (touching cells merge).
//!
//! **Post-processing (boundary targets).** Seeds are the 4-connected regions of predicted
//! interior pixels (of any cell class). Each seed grows over the predicted foreground
//! (interior and boundary pixels) in breadth-first order, so that every foreground pixel
//! joins the seed nearest to it by geodesic distance inside the foreground: a seeded
//! watershed whose relief is flat inside the boundary band. Foreground regions that no
//! seed reaches become objects of their own. Objects smaller than `min_size` pixels are
//! removed, the rest are numbered 1..N in raster order of their first pixel, and each
//! gets the class that most of its interior pixels were predicted as (majority vote; ties
//! go to the lower class).
//!
//! The post-processing runs on the whole stitched class map of a frame, never on single
//! tiles, so a cell that crosses a tile seam keeps one label. It needs the `(H, W)` class
//! map, a `u32` label per pixel and a queue of at most `H * W` pixel indices, whatever the
//! number of cells.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::image::{Labels, Mask};

/// What a model trained from instance masks learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InstanceTargets {
    /// Background, the cell classes' interiors, and a last `boundary` class.
    #[default]
    Boundary,
    /// Background and the cell classes; objects are connected regions.
    Foreground,
}

impl InstanceTargets {
    pub fn name(self) -> &'static str {
        match self {
            InstanceTargets::Boundary => "boundary",
            InstanceTargets::Foreground => "foreground",
        }
    }
}

/// Recorded in a model trained from instance masks: how its classes map to objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    pub targets: InstanceTargets,
    /// The index of the `boundary` class (the last class) with boundary targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boundary_class: Option<u8>,
}

/// Options of the post-processing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InstanceOptions {
    /// Objects with fewer pixels are removed.
    pub min_size: usize,
}

impl Default for InstanceOptions {
    fn default() -> Self {
        InstanceOptions { min_size: 10 }
    }
}

/// Instance labels of one frame, with a class per object.
#[derive(Debug, Clone, PartialEq)]
pub struct Instances {
    /// `(H, W)`: 0 = background, objects 1..=N.
    pub labels: Labels,
    /// `classes[i]` is the class index (>= 1) of object `i + 1`.
    pub classes: Vec<u8>,
}

impl Instances {
    pub fn count(&self) -> usize {
        self.classes.len()
    }
}

const NEIGHBOURS: [(isize, isize); 4] = [(-1, 0), (1, 0), (0, -1), (0, 1)];

/// Visits the in-frame 4-neighbours of pixel `i` of an `h x w` frame.
#[inline]
fn for_neighbours(i: usize, h: usize, w: usize, mut f: impl FnMut(usize)) {
    let (y, x) = (i / w, i % w);
    for (dy, dx) in NEIGHBOURS {
        let (ny, nx) = (y as isize + dy, x as isize + dx);
        if ny >= 0 && nx >= 0 && (ny as usize) < h && (nx as usize) < w {
            f(ny as usize * w + nx as usize);
        }
    }
}

/// The class of each object of `labels` by majority vote of `classes` over its pixels
/// (non-zero classes only; an object with none gets class 1). Returns a map from label to
/// class for labels `0..=max`; index 0 is 0.
fn vote_classes(labels: &[u32], classes: &[u8], n_labels: usize, ignore: Option<u8>) -> Vec<u8> {
    let slots = classes.iter().copied().max().unwrap_or(0) as usize + 1;
    let mut counts = vec![0u32; (n_labels + 1) * slots];
    for (&l, &c) in labels.iter().zip(classes) {
        if l != 0 && c != 0 && Some(c) != ignore {
            counts[l as usize * slots + c as usize] += 1;
        }
    }
    (0..=n_labels)
        .map(|l| {
            if l == 0 {
                return 0;
            }
            let row = &counts[l * slots..(l + 1) * slots];
            // strictly more votes wins, so ties go to the lower class
            (1..slots).fold((1u8, 0u32), |best, k| if row[k] > best.1 { (k as u8, row[k]) } else { best }).0
        })
        .collect()
}

/// Renumbers `labels` 1..=N in raster order of each object's first pixel, dropping
/// objects smaller than `min_size`; `classes_of_old[l]` is the class of old label `l`.
fn relabel(labels: &mut [u32], n_old: usize, min_size: usize, classes_of_old: &[u8]) -> Vec<u8> {
    let mut size = vec![0usize; n_old + 1];
    for &l in labels.iter() {
        size[l as usize] += 1;
    }
    let mut new_of = vec![0u32; n_old + 1];
    let mut classes = Vec::new();
    for l in labels.iter_mut() {
        let old = *l as usize;
        if old == 0 {
            continue;
        }
        if size[old] < min_size {
            *l = 0;
            continue;
        }
        if new_of[old] == 0 {
            classes.push(classes_of_old[old]);
            new_of[old] = classes.len() as u32;
        }
        *l = new_of[old];
    }
    classes
}

/// Labels the 4-connected regions of pixels where `inside` holds, with `same` deciding
/// whether two neighbouring inside pixels belong together. Writes labels 1..=N into
/// `labels` (which must be 0 where not yet labelled) and returns N.
fn components(
    labels: &mut [u32],
    h: usize,
    w: usize,
    mut next: u32,
    inside: impl Fn(usize) -> bool,
    same: impl Fn(usize, usize) -> bool,
) -> Result<u32> {
    let mut stack = Vec::new();
    for start in 0..labels.len() {
        if labels[start] != 0 || !inside(start) {
            continue;
        }
        next = next
            .checked_add(1)
            .ok_or_else(|| Error::InvalidInput("more than 4294967295 objects in one frame".into()))?;
        labels[start] = next;
        stack.push(start);
        while let Some(i) = stack.pop() {
            for_neighbours(i, h, w, |j| {
                if labels[j] == 0 && inside(j) && same(i, j) {
                    labels[j] = next;
                    stack.push(j);
                }
            });
        }
    }
    Ok(next)
}

/// Instance labels from a predicted `(H, W)` class map of a model with `n_classes` classes.
///
/// `spec` is the model's [`InstanceSpec`]; `None` (a model trained on class masks) labels
/// the connected regions of each class separately.
pub fn instances_from_classes(
    pred: &Mask,
    n_classes: usize,
    spec: Option<&InstanceSpec>,
    opts: &InstanceOptions,
) -> Result<Instances> {
    let (h, w) = pred.dim();
    let pred = pred.as_standard_layout();
    let p = pred.as_slice().expect("standard layout");
    if let Some(&bad) = p.iter().find(|&&c| c as usize >= n_classes.max(1)) {
        return Err(Error::InvalidInput(format!("class {bad} found; expected classes 0..{n_classes}")));
    }
    let mut labels = vec![0u32; h * w];
    let boundary = spec.and_then(|s| if s.targets == InstanceTargets::Boundary { s.boundary_class } else { None });
    let n = match (spec, boundary) {
        (Some(_), Some(b)) => {
            let interior = |i: usize| p[i] != 0 && p[i] != b;
            let n_seeds = components(&mut labels, h, w, 0, interior, |_, _| true)?;
            // grow every seed over the foreground, nearest seed first (geodesic distance)
            let mut queue: VecDeque<usize> = (0..h * w).filter(|&i| labels[i] != 0).collect();
            while let Some(i) = queue.pop_front() {
                let l = labels[i];
                for_neighbours(i, h, w, |j| {
                    if labels[j] == 0 && p[j] != 0 {
                        labels[j] = l;
                        queue.push_back(j);
                    }
                });
            }
            // foreground that no seed reached (boundary only) forms objects of its own
            components(&mut labels, h, w, n_seeds, |i| p[i] != 0, |_, _| true)?
        }
        (Some(_), None) => components(&mut labels, h, w, 0, |i| p[i] != 0, |_, _| true)?,
        (None, _) => components(&mut labels, h, w, 0, |i| p[i] != 0, |i, j| p[i] == p[j])?,
    };
    let class_of = vote_classes(&labels, p, n as usize, boundary);
    let classes = relabel(&mut labels, n as usize, opts.min_size, &class_of);
    let labels = Labels::from_shape_vec((h, w), labels).expect("shape");
    Ok(Instances { labels, classes })
}

/// Training targets from an `(H, W)` instance label image.
///
/// `classes` (optional, same shape) gives a class per pixel; each object takes the class
/// most of its pixels have (majority vote of the non-zero classes; class 1 when there is
/// none or no class mask). With boundary targets, boundary pixels get `boundary_class`.
pub fn targets_from_instances(
    instances: &Labels,
    classes: Option<&Mask>,
    targets: InstanceTargets,
    boundary_class: u8,
) -> Result<Mask> {
    let (h, w) = instances.dim();
    if let Some(c) = classes
        && c.dim() != (h, w)
    {
        return Err(Error::Shape(format!(
            "the class mask is {} x {} but its instance labels are {h} x {w}",
            c.dim().0,
            c.dim().1
        )));
    }
    let inst = instances.as_standard_layout();
    let l = inst.as_slice().expect("standard layout");
    // dense ids, so that the vote needs memory for the objects present, not for the
    // largest label value
    let mut ids: Vec<u32> = l.iter().copied().filter(|&v| v != 0).collect();
    ids.sort_unstable();
    ids.dedup();
    let dense: Vec<u32> =
        l.iter().map(|v| if *v == 0 { 0 } else { ids.binary_search(v).unwrap() as u32 + 1 }).collect();
    let class_of = match classes {
        Some(c) => {
            let c = c.as_standard_layout();
            vote_classes(&dense, c.as_slice().expect("standard layout"), ids.len(), None)
        }
        None => {
            let mut v = vec![1u8; ids.len() + 1];
            v[0] = 0;
            v
        }
    };
    if class_of.iter().any(|&c| c >= boundary_class && targets == InstanceTargets::Boundary) {
        return Err(Error::InvalidInput(format!(
            "an object has class {} but the boundary class is {boundary_class}; the classes must be below it",
            class_of.iter().max().unwrap()
        )));
    }
    let mut out = vec![0u8; h * w];
    for i in 0..h * w {
        let d = dense[i];
        if d == 0 {
            continue;
        }
        let mut edge = false;
        if targets == InstanceTargets::Boundary {
            for_neighbours(i, h, w, |j| edge |= dense[j] != d);
        }
        out[i] = if edge { boundary_class } else { class_of[d as usize] };
    }
    Ok(Mask::from_shape_vec((h, w), out).expect("shape"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(rows: &[&str]) -> Mask {
        let h = rows.len();
        let w = rows[0].len();
        let v: Vec<u8> = rows.iter().flat_map(|r| r.bytes().map(|b| b - b'0')).collect();
        Mask::from_shape_vec((h, w), v).unwrap()
    }

    const BOUNDARY: InstanceSpec = InstanceSpec { targets: InstanceTargets::Boundary, boundary_class: Some(2) };

    #[test]
    fn touching_cells_become_two_objects_through_their_boundary() {
        // two touching 4x4 cells; boundary targets, then back to instances
        let mut inst = Labels::zeros((6, 10));
        for y in 1..5 {
            for x in 1..5 {
                inst[[y, x]] = 7;
                inst[[y, x + 4]] = 300;
            }
        }
        let t = targets_from_instances(&inst, None, InstanceTargets::Boundary, 2).unwrap();
        // interior 2x2 of each cell is class 1, the rest of the cell boundary
        assert_eq!(t[[2, 2]], 1);
        assert_eq!(t[[1, 1]], 2);
        assert_eq!(t[[2, 4]], 2);
        assert_eq!(t[[2, 5]], 2);
        assert_eq!(t.iter().filter(|&&c| c == 1).count(), 8);
        let out = instances_from_classes(&t, 3, Some(&BOUNDARY), &InstanceOptions { min_size: 1 }).unwrap();
        assert_eq!(out.count(), 2);
        assert_eq!(out.classes, vec![1, 1]);
        // every pixel of the truth maps to exactly one predicted object, and back
        for y in 0..6 {
            for x in 0..10 {
                let (a, b) = (inst[[y, x]], out.labels[[y, x]]);
                assert_eq!(a == 0, b == 0, "({y}, {x})");
                if a == 7 {
                    assert_eq!(b, 1);
                }
                if a == 300 {
                    assert_eq!(b, 2);
                }
            }
        }
        // foreground targets merge them
        let f = targets_from_instances(&inst, None, InstanceTargets::Foreground, 2).unwrap();
        let spec = InstanceSpec { targets: InstanceTargets::Foreground, boundary_class: None };
        assert_eq!(instances_from_classes(&f, 2, Some(&spec), &InstanceOptions { min_size: 1 }).unwrap().count(), 1);
    }

    #[test]
    fn classes_by_majority_vote_and_small_objects_removed() {
        // class map of a live/dead model with boundary class 3
        let pred = mask(&["0000000000", "0333303330", "0311303223", "0312303223", "0333303330", "0000000001"]);
        let spec = InstanceSpec { targets: InstanceTargets::Boundary, boundary_class: Some(3) };
        let out = instances_from_classes(&pred, 4, Some(&spec), &InstanceOptions { min_size: 2 }).unwrap();
        // left cell: interior 1,1,1,2 -> live (1); right cell: 2,2,2,2 -> dead (2); the single
        // pixel at the bottom right is removed
        assert_eq!(out.count(), 2);
        assert_eq!(out.classes, vec![1, 2]);
        assert_eq!(out.labels[[5, 9]], 0);
        // a class model (no spec): each class's regions separately
        let cls = mask(&["1122", "1122", "0000"]);
        let o = instances_from_classes(&cls, 3, None, &InstanceOptions { min_size: 1 }).unwrap();
        assert_eq!(o.classes, vec![1, 2]);
        assert!(instances_from_classes(&cls, 2, None, &InstanceOptions::default()).is_err());
    }

    #[test]
    fn class_per_instance_from_a_class_mask() {
        let inst = Labels::from_shape_vec((1, 6), vec![5, 5, 5, 9, 9, 9]).unwrap();
        let cls = Mask::from_shape_vec((1, 6), vec![2, 2, 1, 1, 0, 1]).unwrap();
        let t = targets_from_instances(&inst, Some(&cls), InstanceTargets::Foreground, 3).unwrap();
        assert_eq!(t.as_slice().unwrap(), &[2, 2, 2, 1, 1, 1]);
        let e = targets_from_instances(&inst, Some(&cls), InstanceTargets::Boundary, 2).unwrap_err();
        assert!(e.to_string().contains("boundary class"), "{e}");
    }

    #[test]
    fn more_objects_than_u16_holds() {
        // 300 x 300 isolated single-pixel... use 2x2 cells on a 3-pixel grid: 100,489 cells
        let (h, w) = (951, 951);
        let mut pred = Mask::zeros((h, w));
        for y in (0..h - 1).step_by(3) {
            for x in (0..w - 1).step_by(3) {
                for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                    pred[[y + dy, x + dx]] = 1;
                }
            }
        }
        let out = instances_from_classes(&pred, 2, None, &InstanceOptions { min_size: 1 }).unwrap();
        assert_eq!(out.count(), 317 * 317);
        assert_eq!(out.labels.iter().copied().max().unwrap() as usize, 317 * 317);
    }
}
