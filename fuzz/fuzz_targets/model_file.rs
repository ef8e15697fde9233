//! The model-file loader on arbitrary bytes: a lumos model, a checkpoint, or anything else
//! must load or fail with MODEL_FORMAT / IO, never crash or allocate without bound.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let p = common::scratch("lumos", data);
    if let Err(e) = lumos::Model::load(&p, tch::Device::Cpu) {
        assert!(matches!(e, lumos::Error::ModelFormat(_) | lumos::Error::Io { .. } | lumos::Error::Config(_)), "{e:?}");
    }
});
