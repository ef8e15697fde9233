//! Concurrency through the C API, as a multi-threaded host uses it: many threads sharing
//! one model handle get the results of a single thread; a training runs while another
//! thread segments; a cancel token stops segmentation and training from another thread.

use std::ffi::{CStr, CString};
use std::path::Path;
use std::ptr::{null, null_mut};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use lumos::ffi::*;

/// A raw handle handed to other threads (the C API documents handles as thread-safe).
struct Shared<T>(*mut T);
impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Shared<T> {}
impl<T> Shared<T> {
    /// (a method, so closures capture the wrapper and not the raw field)
    fn get(self) -> *mut T {
        self.0
    }
}
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

fn last() -> String {
    unsafe { CStr::from_ptr(lumos_last_error_message()) }.to_string_lossy().into_owned()
}

fn cpath(p: &Path) -> CString {
    CString::new(p.to_str().unwrap()).unwrap()
}

fn tiny_model(dir: &Path, steps: usize) -> std::path::PathBuf {
    let data = dir.join("data");
    lumos::sim::ssqpm::write_dataset(
        &data,
        2,
        0,
        &lumos::sim::ssqpm::SsqpmConfig { size: 64, ..Default::default() },
        3,
    )
    .unwrap();
    let mut cfg = lumos::recipes::recipe("dm-qpmnet", "tiny").unwrap();
    cfg.device = "cpu".into();
    cfg.val_fraction = 0.0;
    cfg.epochs = 1;
    cfg.iterations_per_epoch = steps;
    let out = dir.join("m.lumos");
    lumos::engine::train::train(&cfg, &data.join("train"), &out, &mut lumos::engine::progress::Monitor::none())
        .unwrap();
    out
}

fn frame(seed: u64, size: usize) -> Vec<f32> {
    let f = lumos::sim::simulate_frame("ssqpm", &format!(r#"{{"size": {size}}}"#), seed).unwrap();
    f.image.data.iter().copied().collect()
}

fn segment(m: Shared<LumosModel>, x: &[f32], size: usize, cancel: *const LumosCancelToken) -> (LumosStatus, Vec<u8>) {
    let mut out = vec![0u8; size * size];
    let st = unsafe { lumos_segment(m.get(), x.as_ptr(), 5, size, size, null(), cancel, out.as_mut_ptr(), out.len()) };
    (st, out)
}

#[test]
fn threads_sharing_one_handle_match_one_thread() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path(), 2);
    let mut m = null_mut();
    assert_eq!(
        unsafe { lumos_model_load(cpath(&path).as_ptr(), c"cpu".as_ptr(), &mut m) },
        LumosStatus::Ok,
        "{}",
        last()
    );
    let m = Shared(m);
    let frames: Vec<Vec<f32>> = (0..4).map(|s| frame(s, 64)).collect();
    let alone: Vec<Vec<u8>> = frames.iter().map(|x| segment(m, x, 64, null()).1).collect();
    let frames = Arc::new(frames);
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let frames = Arc::clone(&frames);
            std::thread::spawn(move || {
                (0..6)
                    .map(|k| {
                        let i = (t + k) % frames.len();
                        let (st, y) = segment(m, &frames[i], 64, null());
                        assert_eq!(st, LumosStatus::Ok, "{}", last());
                        (i, y)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for h in handles {
        for (i, y) in h.join().unwrap() {
            assert_eq!(y, alone[i], "frame {i} differs between one thread and eight");
        }
    }
    unsafe { lumos_model_free(m.get()) };
}

#[test]
fn training_in_one_thread_while_another_segments() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path(), 1);
    let mut m = null_mut();
    assert_eq!(unsafe { lumos_model_load(cpath(&path).as_ptr(), c"cpu".as_ptr(), &mut m) }, LumosStatus::Ok);
    let m = Shared(m);
    let x = frame(9, 64);
    let expected = segment(m, &x, 64, null()).1;
    let training_done = Arc::new(AtomicBool::new(false));
    let trainer = {
        let done = Arc::clone(&training_done);
        let data = cpath(&dir.path().join("data/train"));
        let out = cpath(&dir.path().join("second.lumos"));
        std::thread::spawn(move || {
            let cfg = CString::new(r#"{"kind": "dmqpm", "dmqpm": {"n_stages": 3, "base_features": 4, "max_features": 16, "fusion_stage": 1, "heads": 2}, "epochs": 2, "iterations_per_epoch": 3, "batch_size": 2, "patch_size": [32, 32], "device": "cpu", "val_fraction": 0.0}"#).unwrap();
            let st =
                unsafe { lumos_train(cfg.as_ptr(), data.as_ptr(), out.as_ptr(), None, null_mut(), null(), null_mut()) };
            done.store(true, Ordering::SeqCst);
            assert_eq!(st, LumosStatus::Ok, "{}", last());
        })
    };
    let mut rounds = 0;
    while !training_done.load(Ordering::SeqCst) || rounds < 2 {
        let (st, y) = segment(m, &x, 64, null());
        assert_eq!(st, LumosStatus::Ok, "{}", last());
        assert_eq!(y, expected, "segmentation changed while another thread trained");
        rounds += 1;
    }
    trainer.join().unwrap();
    assert!(dir.path().join("second.lumos").is_file());
    unsafe { lumos_model_free(m.get()) };
}

#[test]
fn cancelling_from_another_thread() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path(), 1);
    let mut m = null_mut();
    assert_eq!(unsafe { lumos_model_load(cpath(&path).as_ptr(), c"cpu".as_ptr(), &mut m) }, LumosStatus::Ok);
    let m = Shared(m);
    let mut tok = null_mut();
    assert_eq!(unsafe { lumos_cancel_token_new(&mut tok) }, LumosStatus::Ok);
    let tok = Shared(tok);

    // a large frame, cancelled shortly after it starts
    let x = frame(1, 1024);
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(unsafe { lumos_cancel_token_cancel(tok.get()) }, LumosStatus::Ok);
    });
    let t0 = std::time::Instant::now();
    let (st, _) = segment(m, &x, 1024, tok.get());
    canceller.join().unwrap();
    assert_eq!(st, LumosStatus::Cancelled, "{}", last());
    assert!(last().contains("cancel"), "{}", last());
    let stopped_after = t0.elapsed();
    // reset: the same token serves the next call, which completes
    assert_eq!(unsafe { lumos_cancel_token_reset(tok.get()) }, LumosStatus::Ok);
    let small = frame(2, 64);
    assert_eq!(segment(m, &small, 64, tok.get()).0, LumosStatus::Ok, "{}", last());
    // cancelling stopped the big frame well before it would have finished
    let t1 = std::time::Instant::now();
    assert_eq!(segment(m, &x, 1024, null()).0, LumosStatus::Ok);
    assert!(stopped_after < t1.elapsed(), "cancel took {stopped_after:?}; the whole frame {:?}", t1.elapsed());

    // a training cancelled from another thread keeps its checkpoint and writes no model
    let out = dir.path().join("cancelled.lumos");
    let (data, outc) = (cpath(&dir.path().join("data/train")), cpath(&out));
    let cfg = CString::new(r#"{"kind": "dmqpm", "dmqpm": {"n_stages": 3, "base_features": 4, "max_features": 16, "fusion_stage": 1, "heads": 2}, "epochs": 1000, "iterations_per_epoch": 2, "batch_size": 2, "patch_size": [32, 32], "device": "cpu", "val_fraction": 0.0}"#).unwrap();
    assert_eq!(unsafe { lumos_cancel_token_reset(tok.get()) }, LumosStatus::Ok);
    let ckpt = dir.path().join("cancelled.lumos.ckpt");
    let watcher = {
        let ckpt = ckpt.clone();
        std::thread::spawn(move || {
            while !ckpt.exists() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            assert_eq!(unsafe { lumos_cancel_token_cancel(tok.get()) }, LumosStatus::Ok);
        })
    };
    let st =
        unsafe { lumos_train(cfg.as_ptr(), data.as_ptr(), outc.as_ptr(), None, null_mut(), tok.get(), null_mut()) };
    watcher.join().unwrap();
    assert_eq!(st, LumosStatus::Cancelled, "{}", last());
    assert!(!out.exists(), "a cancelled training wrote a model file");
    assert!(lumos::Model::load(&ckpt, tch::Device::Cpu).is_ok(), "the kept checkpoint must load");
    unsafe {
        lumos_cancel_token_free(tok.get());
        lumos_model_free(m.get());
    }
}
