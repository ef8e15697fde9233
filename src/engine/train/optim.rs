//! The optimizers of every trainer behind one interface: SGD (Nesterov momentum, L2
//! weight decay), Adam and Adamax, each with its gradient clipping, over the trainable
//! variables of a model (all of them, or those under some name prefixes), with their state
//! checkpointed next to the weights. The arithmetic is libtorch's multi-tensor kernels
//! ([`crate::backend::optim`]).
//!
//! Checkpoint names: `{prefix}{buffer}.{variable}` for each state buffer (SGD: `momentum`;
//! Adam: `m`, `v`; Adamax: `m`, `u`) and `{prefix}step` for the step count of Adam and
//! Adamax. The prefix is `optimizer.` or, where a model has several optimizers,
//! `optimizer.<tag>.`.

use std::collections::{BTreeMap, HashMap};

use tch::{Device, Tensor};

use crate::backend::optim as kernels;
use crate::error::Result;

/// The update rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// SGD with momentum (dampening 0) and L2 weight decay, Nesterov or not.
    Sgd { momentum: f64, weight_decay: f64, nesterov: bool },
    /// Adam without weight decay.
    Adam { beta1: f64, beta2: f64, eps: f64 },
    /// Adamax (Kingma & Ba, 2015).
    Adamax { beta1: f64, beta2: f64, eps: f64 },
}

impl Rule {
    /// Adam with betas (0.9, 0.999) and eps 1e-8.
    pub const ADAM: Rule = Rule::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 };
    /// Adamax with betas (0.9, 0.999) and eps 1e-8.
    pub const ADAMAX: Rule = Rule::Adamax { beta1: 0.9, beta2: 0.999, eps: 1e-8 };

    fn buffers(&self) -> &'static [&'static str] {
        match self {
            Rule::Sgd { .. } => &["momentum"],
            Rule::Adam { .. } => &["m", "v"],
            Rule::Adamax { .. } => &["m", "u"],
        }
    }
}

/// Gradient clipping before each update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Clip {
    /// The global L2 norm of all gradients at most this (`<= 0`: no clipping).
    Norm(f64),
    /// Every gradient element within `[-v, v]` (`<= 0`: no clipping).
    Value(f64),
}

/// An optimizer over a model's trainable variables.
pub struct Optimizer {
    rule: Rule,
    clip: Clip,
    prefix: String,
    params: Vec<(String, Tensor)>,
    buffers: Vec<HashMap<String, Tensor>>,
    step: i64,
}

impl Optimizer {
    /// Over the trainable variables of `vs` whose names start with one of `only` (all of
    /// them when `only` is empty), in name order; state checkpointed under `prefix`.
    pub fn new(vs: &tch::nn::VarStore, rule: Rule, clip: Clip, prefix: &str, only: &[&str]) -> Self {
        let mut params: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(n, t)| t.requires_grad() && (only.is_empty() || only.iter().any(|p| n.starts_with(p))))
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let buffers = rule.buffers().iter().map(|_| HashMap::new()).collect();
        Optimizer { rule, clip, prefix: prefix.to_string(), params, buffers, step: 0 }
    }

    /// Drops the gradients (the next backward pass writes fresh ones).
    pub fn zero_grad(&mut self) -> Result<()> {
        kernels::drop_grads(self.params.iter().map(|(_, p)| p))
    }

    /// Clips the gradients, then one update at learning rate `lr` of every variable that
    /// has a gradient. Returns the gradient norm before clipping for norm clipping, NaN
    /// for value clipping.
    pub fn step(&mut self, lr: f64) -> Result<f64> {
        self.step += 1;
        let mut maps: Vec<&mut HashMap<String, Tensor>> = self.buffers.iter_mut().collect();
        let (ps, gs, st) = kernels::gather(&self.params, &mut maps);
        let norm = match self.clip {
            Clip::Norm(max) => kernels::clip_grad_norm_(&gs, max)?,
            Clip::Value(v) => {
                if v > 0.0 {
                    kernels::clamp_(&gs, -v, v)?;
                }
                f64::NAN
            }
        };
        match self.rule {
            Rule::Sgd { momentum, weight_decay, nesterov } => {
                kernels::sgd_(&ps, &gs, &st[0], lr, momentum, weight_decay, nesterov)?
            }
            Rule::Adam { beta1, beta2, eps } => {
                kernels::adam_(&ps, &gs, &st[0], &st[1], self.step, lr, beta1, beta2, eps)?
            }
            Rule::Adamax { beta1, beta2, eps } => {
                kernels::adamax_(&ps, &gs, &st[0], &st[1], self.step, lr, beta1, beta2, eps)?
            }
        }
        Ok(norm)
    }

    /// The state to checkpoint, named as the module documentation says. SGD keeps no
    /// step count (its rule does not use one).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = Vec::new();
        for (buf, map) in self.rule.buffers().iter().zip(&self.buffers) {
            v.extend(map.iter().map(|(n, t)| (format!("{}{buf}.{n}", self.prefix), t.shallow_clone())));
        }
        if !matches!(self.rule, Rule::Sgd { .. }) {
            v.push((format!("{}step", self.prefix), Tensor::from_slice(&[self.step as f32])));
        }
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Restores the state from a checkpoint's tensors (those under this optimizer's
    /// names; others are ignored), moved to `device`.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, device: Device) {
        let step_name = format!("{}step", self.prefix);
        for (n, t) in tensors {
            if *n == step_name {
                self.step = t.double_value(&[0]) as i64;
                continue;
            }
            let Some(rest) = n.strip_prefix(&self.prefix) else {
                continue;
            };
            for (buf, map) in self.rule.buffers().iter().zip(self.buffers.iter_mut()) {
                if let Some(name) = rest.strip_prefix(buf).and_then(|r| r.strip_prefix('.')) {
                    map.insert(name.to_string(), t.to_device(device));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, nn};

    fn model(seed: i64) -> nn::VarStore {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = vs.root().sub("a").randn("w", &[3, 4], 0.0, 1.0);
        let _ = vs.root().sub("b").randn("w", &[5], 0.0, 1.0);
        vs
    }

    fn backward(vs: &nn::VarStore) {
        let loss =
            vs.variables().values().map(|t| t.square().sum(Kind::Float)).fold(Tensor::from(0.0f32), |a, b| a + b);
        loss.backward();
    }

    #[test]
    fn state_round_trips_and_resumed_steps_match() {
        for rule in [Rule::Sgd { momentum: 0.9, weight_decay: 1e-3, nesterov: true }, Rule::ADAM, Rule::ADAMAX] {
            let (a, b) = (model(1), model(1));
            let mut oa = Optimizer::new(&a, rule, Clip::Norm(1.0), "optimizer.", &[]);
            for _ in 0..2 {
                oa.zero_grad().unwrap();
                backward(&a);
                oa.step(0.1).unwrap();
            }
            // b: one step, then a fresh optimizer restored from a's state after... the same
            // two steps taken through a checkpoint in the middle
            let mut ob = Optimizer::new(&b, rule, Clip::Norm(1.0), "optimizer.", &[]);
            ob.zero_grad().unwrap();
            backward(&b);
            ob.step(0.1).unwrap();
            let saved: BTreeMap<String, Tensor> = ob.state().into_iter().collect();
            let mut ob2 = Optimizer::new(&b, rule, Clip::Norm(1.0), "optimizer.", &[]);
            ob2.load_state(&saved, Device::Cpu);
            ob2.zero_grad().unwrap();
            backward(&b);
            ob2.step(0.1).unwrap();
            for (n, t) in a.variables() {
                let d = (&t - &b.variables()[&n]).abs().max().double_value(&[]);
                assert!(d < 1e-6, "{rule:?} {n}: resumed step differs by {d}");
            }
            let names: Vec<String> = saved.keys().cloned().collect();
            let want_step = !matches!(rule, Rule::Sgd { .. });
            assert_eq!(names.contains(&"optimizer.step".to_string()), want_step, "{rule:?}: {names:?}");
        }
    }

    #[test]
    fn prefixes_pick_the_variables_and_value_clipping_bounds_the_update() {
        let vs = model(2);
        let before = vs.variables();
        let before: HashMap<String, Tensor> = before.iter().map(|(n, t)| (n.clone(), t.detach().copy())).collect();
        let mut o = Optimizer::new(
            &vs,
            Rule::Sgd { momentum: 0.5, weight_decay: 0.0, nesterov: false },
            Clip::Value(0.01),
            "optimizer.x.",
            &["a."],
        );
        o.zero_grad().unwrap();
        backward(&vs);
        assert!(o.step(1.0).unwrap().is_nan());
        let after = vs.variables();
        let moved = |n: &str| (&after[n] - &before[n]).abs().max().double_value(&[]);
        assert!((moved("a.w") - 0.01).abs() < 1e-6, "a.w moved by {}", moved("a.w"));
        assert_eq!(moved("b.w"), 0.0);
        assert!(o.state().iter().all(|(n, _)| n.starts_with("optimizer.x.momentum.a.")));
    }
}
