//! The one progress and cancellation mechanism, shared by the trainer, the tiling engine,
//! the CLI (progress bars), the C API (callback + cancel token) and the plugins.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

/// A cancellation flag that can be set from any thread.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn reset(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    /// `Err(Error::Cancelled)` once cancelled.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() { Err(Error::Cancelled) } else { Ok(()) }
    }
}

/// What a long operation is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Stage {
    /// Loading and normalizing data.
    Preparing = 0,
    /// A training iteration finished.
    Training = 1,
    /// A validation pass finished (`val_metric` is set).
    Validation = 2,
    /// A checkpoint was written.
    Checkpoint = 3,
    /// Tiles processed during inference.
    Inference = 4,
    /// The operation finished.
    Done = 5,
}

/// One progress event. Counters are 0-based for the current item and totals are counts;
/// `loss` and `val_metric` are NaN when not applicable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    pub stage: Stage,
    pub epoch: usize,
    pub epochs: usize,
    pub iteration: usize,
    pub iterations: usize,
    pub loss: f64,
    pub val_metric: f64,
}

impl Progress {
    pub fn new(stage: Stage) -> Self {
        Progress { stage, epoch: 0, epochs: 0, iteration: 0, iterations: 0, loss: f64::NAN, val_metric: f64::NAN }
    }
}

/// Receives progress events; may be called from the working thread only.
pub type ProgressFn<'a> = dyn FnMut(&Progress) + 'a;

/// Progress sink plus cancel token, handed to every long operation.
pub struct Monitor<'a> {
    pub progress: Option<&'a mut ProgressFn<'a>>,
    pub cancel: Option<CancelToken>,
}

impl<'a> Monitor<'a> {
    pub fn none() -> Self {
        Monitor { progress: None, cancel: None }
    }
    /// A monitor that shares this one's cancel token and reports nothing (for work inside
    /// an operation whose own progress the caller does not follow, such as validation).
    pub fn cancel_only(&self) -> Monitor<'static> {
        Monitor { progress: None, cancel: self.cancel.clone() }
    }
    pub fn emit(&mut self, p: Progress) {
        if let Some(f) = self.progress.as_mut() {
            f(&p);
        }
    }
    pub fn check(&self) -> Result<()> {
        match &self.cancel {
            Some(c) => c.check(),
            None => Ok(()),
        }
    }
}
