//! The bad-input matrix: every C function, called the way a careless or malicious host
//! would (NULL pointers, zero / huge / mismatched shapes, NaN and Inf pixels, wrong
//! channel counts, a verb the model kind does not support, invalid UTF-8, missing,
//! unreadable, corrupt and truncated model files), returns its documented status and a
//! message that names what was wrong. Calls go through the exported `extern "C"`
//! functions themselves, exactly as a C host calls them.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr::{null, null_mut};
use std::sync::OnceLock;

use lumos::ffi::*;

fn last() -> String {
    unsafe { CStr::from_ptr(lumos_last_error_message()) }.to_string_lossy().into_owned()
}

/// Asserts a status and that the message mentions every one of `words`.
#[track_caller]
fn expect(status: LumosStatus, want: LumosStatus, words: &[&str]) {
    let msg = last();
    assert_eq!(status, want, "message: {msg}");
    for w in words {
        assert!(msg.contains(w), "the message {msg:?} does not mention {w:?}");
    }
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn cpath(p: &Path) -> CString {
    c(p.to_str().unwrap())
}

struct Models {
    _dir: tempfile::TempDir,
    seg: PathBuf,
    split: PathBuf,
    diff: PathBuf,
    dir: PathBuf,
}

/// Tiny trained models of each verb, shared by the tests of this file.
fn models() -> &'static Models {
    static M: OnceLock<Models> = OnceLock::new();
    M.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let train = |method: &str, data: &Path, out: &Path| {
            let mut cfg = lumos::recipes::recipe(method, "tiny").unwrap();
            cfg.device = "cpu".into();
            cfg.val_fraction = 0.0;
            cfg.epochs = 1;
            cfg.iterations_per_epoch = 1;
            lumos::engine::train::train(&cfg, data, out, &mut lumos::engine::progress::Monitor::none()).unwrap();
        };
        let ss = root.join("ssqpm");
        lumos::sim::ssqpm::write_dataset(
            &ss,
            2,
            0,
            &lumos::sim::ssqpm::SsqpmConfig { size: 64, ..Default::default() },
            1,
        )
        .unwrap();
        train("dm-qpmnet", &ss.join("train"), &root.join("seg.lumos"));
        let fl = root.join("fluo");
        lumos::sim::fluo::write_dataset(&fl, 2, 0, &lumos::sim::fluo::FluoConfig { size: 48, ..Default::default() }, 1)
            .unwrap();
        train("musplit-unet", &fl.join("train"), &root.join("split.lumos"));
        let q = root.join("qpi");
        lumos::sim::qpi::write_dataset(&q, 2, 0, &lumos::sim::qpi::QpiConfig { size: 64, ..Default::default() }, 1)
            .unwrap();
        train("pg-diffseg", &q.join("train"), &root.join("diff.lumos"));
        Models {
            seg: root.join("seg.lumos"),
            split: root.join("split.lumos"),
            diff: root.join("diff.lumos"),
            dir: root,
            _dir: dir,
        }
    })
}

fn load(p: &Path) -> *mut LumosModel {
    let mut m = null_mut();
    let st = unsafe { lumos_model_load(cpath(p).as_ptr(), c("cpu").as_ptr(), &mut m) };
    assert_eq!(st, LumosStatus::Ok, "{}", last());
    m
}

#[test]
fn version_and_status_functions_never_fail() {
    assert!(!unsafe { CStr::from_ptr(lumos_version()) }.to_str().unwrap().is_empty());
    assert_eq!(lumos_abi_version(), 1);
    for s in 0..=14u32 {
        assert!(unsafe { CStr::from_ptr(lumos_status_name(s)) }.to_str().unwrap().starts_with("LUMOS_STATUS_"));
    }
    assert_eq!(unsafe { CStr::from_ptr(lumos_status_name(999)) }.to_str().unwrap(), "unknown");
    expect(lumos_set_num_threads(0), LumosStatus::InvalidArgument, &["n_threads"]);
}

#[test]
fn loading_bad_model_files() {
    let m = models();
    let mut h = null_mut();
    let ok = c("cpu");
    unsafe {
        expect(lumos_model_load(null(), ok.as_ptr(), &mut h), LumosStatus::NullPointer, &["path"]);
        expect(
            lumos_model_load(cpath(&m.seg).as_ptr(), ok.as_ptr(), null_mut()),
            LumosStatus::NullPointer,
            &["out_model"],
        );
        // invalid UTF-8 path
        let bad = CString::new(vec![b'/', b't', 0xff, 0xfe]).unwrap();
        expect(lumos_model_load(bad.as_ptr(), ok.as_ptr(), &mut h), LumosStatus::InvalidArgument, &["path", "UTF-8"]);
        expect(
            lumos_model_load(cpath(&m.dir.join("missing.lumos")).as_ptr(), ok.as_ptr(), &mut h),
            LumosStatus::Io,
            &["missing.lumos"],
        );
        // a folder is not readable as a file
        expect(
            lumos_model_load(cpath(&m.dir).as_ptr(), ok.as_ptr(), &mut h),
            LumosStatus::Io,
            &[m.dir.to_str().unwrap()],
        );
        expect(
            lumos_model_load(cpath(&m.seg).as_ptr(), c("tpu").as_ptr(), &mut h),
            LumosStatus::Device,
            &["tpu", "cuda:N"],
        );
    }
    let bytes = std::fs::read(&m.seg).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("header only", bytes[..64].to_vec()),
        ("garbage", (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect()),
        (
            "a TIFF",
            std::fs::read(std::fs::read_dir(m.dir.join("ssqpm/train/images")).unwrap().next().unwrap().unwrap().path())
                .unwrap(),
        ),
        ("flipped header length", {
            let mut b = bytes.clone();
            b[7] ^= 0x40;
            b
        }),
    ];
    for (what, content) in cases {
        let p = m.dir.join(format!("bad-{}.lumos", what.replace(' ', "-")));
        std::fs::write(&p, content).unwrap();
        let st = unsafe { lumos_model_load(cpath(&p).as_ptr(), ok.as_ptr(), &mut h) };
        let msg = last();
        assert_eq!(st, LumosStatus::ModelFormat, "{what}: {msg}");
        assert!(msg.contains(p.file_name().unwrap().to_str().unwrap()) || msg.contains("safetensors"), "{what}: {msg}");
        assert!(h.is_null(), "{what}: out_model written on failure");
    }
    // valid safetensors, but the metadata says nothing of lumos
    let plain = m.dir.join("plain.safetensors");
    let t = tch::Tensor::zeros([2, 2], (tch::Kind::Float, tch::Device::Cpu));
    lumos::engine::weights::save(&plain, &[("w".into(), t)], Default::default()).unwrap();
    let st = unsafe { lumos_model_load(cpath(&plain).as_ptr(), ok.as_ptr(), &mut h) };
    expect(st, LumosStatus::ModelFormat, &["plain.safetensors"]);
}

#[test]
fn model_queries_with_null_and_out_of_range() {
    let m = load(&models().seg);
    let mut s: *const std::os::raw::c_char = null();
    let mut info = std::mem::MaybeUninit::<LumosModelInfo>::uninit();
    unsafe {
        expect(lumos_model_info(null(), info.as_mut_ptr()), LumosStatus::NullPointer, &["model"]);
        expect(lumos_model_info(m, null_mut()), LumosStatus::NullPointer, &["out_info"]);
        expect(lumos_model_kind_name(m, null_mut()), LumosStatus::NullPointer, &["out_name"]);
        expect(lumos_model_channel_name(m, 5, &mut s), LumosStatus::InvalidArgument, &["5"]);
        expect(lumos_model_class_name(m, 2, &mut s), LumosStatus::InvalidArgument, &["2"]);
        expect(lumos_model_metadata_json(null(), &mut s), LumosStatus::NullPointer, &["model"]);
        expect(lumos_model_save(m, null()), LumosStatus::NullPointer, &["path"]);
        let nowhere = models().dir.join("no/such/folder/m.lumos");
        expect(lumos_model_save(m, cpath(&nowhere).as_ptr()), LumosStatus::Io, &["no/such/folder"]);
        assert!(!nowhere.exists());
        lumos_model_free(m);
        lumos_model_free(null_mut());
    }
}

#[test]
fn segment_matrix() {
    let m = load(&models().seg);
    let (cc, h, w) = (5usize, 40usize, 48usize);
    let x = vec![1.0f32; cc * h * w];
    let mut out = vec![0u8; h * w];
    let mut probs = vec![0f32; 2 * h * w];
    let seg = |input: *const f32,
               c: usize,
               hh: usize,
               ww: usize,
               opts: *const LumosTileOptions,
               o: *mut u8,
               len: usize| unsafe { lumos_segment(m, input, c, hh, ww, opts, null(), o, len) };
    let o = out.as_mut_ptr();
    expect(
        unsafe { lumos_segment(null(), x.as_ptr(), cc, h, w, null(), null(), o, h * w) },
        LumosStatus::NullPointer,
        &["model"],
    );
    expect(seg(null(), cc, h, w, null(), o, h * w), LumosStatus::NullPointer, &["input"]);
    expect(seg(x.as_ptr(), cc, h, w, null(), null_mut(), h * w), LumosStatus::NullPointer, &["out_labels"]);
    expect(seg(x.as_ptr(), cc, 0, w, null(), o, h * w), LumosStatus::ShapeMismatch, &["zero"]);
    expect(seg(x.as_ptr(), 0, h, w, null(), o, h * w), LumosStatus::ShapeMismatch, &["zero"]);
    // huge: rejected from the sizes alone, before any read of the buffer
    expect(seg(x.as_ptr(), cc, 1 << 20, 1 << 20, null(), o, usize::MAX), LumosStatus::ShapeMismatch, &["too large"]);
    expect(seg(x.as_ptr(), cc, usize::MAX, 2, null(), o, usize::MAX), LumosStatus::ShapeMismatch, &["too large"]);
    expect(seg(x.as_ptr(), 4, h, w, null(), o, h * w), LumosStatus::ShapeMismatch, &["5", "4"]);
    expect(seg(x.as_ptr(), cc, h, w, null(), o, h * w - 1), LumosStatus::BufferTooSmall, &["out_labels"]);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut y = x.clone();
        y[3 * h * w + 7 * w + 9] = bad;
        expect(
            seg(y.as_ptr(), cc, h, w, null(), o, h * w),
            LumosStatus::InvalidInput,
            &["channel 3, row 7, column 9", "finite"],
        );
    }
    let mut opts = std::mem::MaybeUninit::<LumosTileOptions>::uninit();
    assert_eq!(unsafe { lumos_tile_options_default(opts.as_mut_ptr()) }, LumosStatus::Ok);
    let good = unsafe { opts.assume_init() };
    for (what, o2) in [
        ("step_fraction", LumosTileOptions { step_fraction: 0.0, ..good }),
        ("step_fraction", LumosTileOptions { step_fraction: f64::NAN, ..good }),
        ("batch_size", LumosTileOptions { batch_size: 0, ..good }),
        ("tile_height", LumosTileOptions { tile_height: 7, ..good }),
    ] {
        expect(seg(x.as_ptr(), cc, h, w, &o2, o, h * w), LumosStatus::InvalidArgument, &[what]);
    }
    expect(unsafe { lumos_tile_options_default(null_mut()) }, LumosStatus::NullPointer, &["out_options"]);
    expect(
        unsafe {
            lumos_segment_probabilities(m, x.as_ptr(), cc, h, w, null(), null(), probs.as_mut_ptr(), 2 * h * w - 1)
        },
        LumosStatus::BufferTooSmall,
        &["out_probabilities"],
    );
    // the good call still works after all of that
    assert_eq!(seg(x.as_ptr(), cc, h, w, null(), o, h * w), LumosStatus::Ok, "{}", last());
    assert_eq!(last(), "");
    // a segmentation model does not decompose, nor take diffusion options
    let mut two = vec![0f32; 2 * h * w];
    expect(
        unsafe { lumos_decompose(m, x.as_ptr(), h, w, null(), null(), two.as_mut_ptr(), 2 * h * w) },
        LumosStatus::Unsupported,
        &["dmqpm"],
    );
    let mut d = std::mem::MaybeUninit::<LumosDiffusionOptions>::uninit();
    expect(unsafe { lumos_model_diffusion_options(m, d.as_mut_ptr()) }, LumosStatus::Unsupported, &["dmqpm"]);
    unsafe { lumos_model_free(m) };
}

#[test]
fn decompose_matrix() {
    let m = load(&models().split);
    let (h, w) = (40usize, 36usize);
    let x = vec![5.0f32; h * w];
    let mut out = vec![0f32; 2 * h * w];
    let o = out.as_mut_ptr();
    let mut opts = std::mem::MaybeUninit::<LumosDecomposeOptions>::uninit();
    assert_eq!(unsafe { lumos_decompose_options_default(opts.as_mut_ptr()) }, LumosStatus::Ok);
    let good = unsafe { opts.assume_init() };
    let dec = |input: *const f32, hh: usize, ww: usize, op: *const LumosDecomposeOptions, len: usize| unsafe {
        lumos_decompose(m, input, hh, ww, op, null(), o, len)
    };
    expect(dec(null(), h, w, null(), 2 * h * w), LumosStatus::NullPointer, &["input"]);
    expect(
        unsafe { lumos_decompose(m, x.as_ptr(), h, w, null(), null(), null_mut(), 2 * h * w) },
        LumosStatus::NullPointer,
        &["out"],
    );
    expect(dec(x.as_ptr(), 0, w, null(), 2 * h * w), LumosStatus::ShapeMismatch, &["zero"]);
    expect(dec(x.as_ptr(), usize::MAX / 2, 4, null(), usize::MAX), LumosStatus::ShapeMismatch, &["too large"]);
    expect(dec(x.as_ptr(), h, w, null(), 2 * h * w - 1), LumosStatus::BufferTooSmall, &["out"]);
    let mut y = x.clone();
    y[100] = f32::NAN;
    expect(dec(y.as_ptr(), h, w, null(), 2 * h * w), LumosStatus::InvalidInput, &["finite"]);
    expect(
        dec(x.as_ptr(), h, w, &LumosDecomposeOptions { keep: 7, ..good }, 2 * h * w),
        LumosStatus::InvalidArgument,
        &["even"],
    );
    expect(
        dec(x.as_ptr(), h, w, &LumosDecomposeOptions { samples: 0, ..good }, 2 * h * w),
        LumosStatus::InvalidArgument,
        &["samples"],
    );
    expect(unsafe { lumos_decompose_options_default(null_mut()) }, LumosStatus::NullPointer, &["out_options"]);
    assert_eq!(dec(x.as_ptr(), h, w, null(), 2 * h * w), LumosStatus::Ok, "{}", last());
    // a decomposition model does not segment
    let mut labels = vec![0u8; h * w];
    expect(
        unsafe { lumos_segment(m, x.as_ptr(), 1, h, w, null(), null(), labels.as_mut_ptr(), h * w) },
        LumosStatus::Unsupported,
        &["musplit"],
    );
    unsafe { lumos_model_free(m) };
}

#[test]
fn diffusion_matrix() {
    let m = load(&models().diff);
    let (h, w) = (32usize, 32usize);
    let x = vec![0.1f32; h * w];
    let mut out = vec![0u8; h * w];
    let o = out.as_mut_ptr();
    let mut d = std::mem::MaybeUninit::<LumosDiffusionOptions>::uninit();
    assert_eq!(unsafe { lumos_model_diffusion_options(m, d.as_mut_ptr()) }, LumosStatus::Ok);
    let good = unsafe { d.assume_init() };
    let run = |o2: &LumosDiffusionOptions| unsafe {
        lumos_segment_diffusion(m, x.as_ptr(), 1, h, w, null(), o2, null(), o, h * w)
    };
    // NULL options: the model's saved sampling, as documented
    assert_eq!(
        unsafe { lumos_segment_diffusion(m, x.as_ptr(), 1, h, w, null(), null(), null(), o, h * w) },
        LumosStatus::Ok,
        "{}",
        last()
    );
    let with_null = out.clone();
    assert_eq!(run(&good), LumosStatus::Ok, "{}", last());
    assert_eq!(with_null, out, "NULL options and the model's own options differ");
    for (what, opt) in [
        ("sampling_steps", LumosDiffusionOptions { sampling_steps: 0, ..good }),
        ("sampling_steps", LumosDiffusionOptions { sampling_steps: 5000, ..good }),
        ("inversion_steps", LumosDiffusionOptions { inversion_steps: 0, ..good }),
        ("samples", LumosDiffusionOptions { samples: 0, ..good }),
        ("eta", LumosDiffusionOptions { eta: -1.0, ..good }),
        ("eta", LumosDiffusionOptions { eta: f64::NAN, ..good }),
        ("start", LumosDiffusionOptions { start: 7, ..good }),
        ("forward_t", LumosDiffusionOptions { start: 2, forward_t: 1000, ..good }),
    ] {
        expect(run(&opt), LumosStatus::InvalidArgument, &[what]);
    }
    expect(
        unsafe { lumos_segment_diffusion(m, x.as_ptr(), 2, h, w, null(), &good, null(), o, h * w) },
        LumosStatus::ShapeMismatch,
        &["1"],
    );
    assert_eq!(run(&good), LumosStatus::Ok, "{}", last());
    expect(unsafe { lumos_diffusion_options_default(null_mut()) }, LumosStatus::NullPointer, &["out_options"]);
    unsafe { lumos_model_free(m) };
}

#[test]
fn train_tiff_simulate_recipe_and_token_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = null_mut();
    let out = cpath(&dir.path().join("m.lumos"));
    let data = cpath(&models().dir.join("ssqpm/train"));
    unsafe {
        expect(
            lumos_train(null(), null(), out.as_ptr(), None, null_mut(), null(), &mut h),
            LumosStatus::NullPointer,
            &["data_dir"],
        );
        expect(
            lumos_train(c("{").as_ptr(), data.as_ptr(), out.as_ptr(), None, null_mut(), null(), &mut h),
            LumosStatus::InvalidConfig,
            &[],
        );
        expect(
            lumos_train(
                c(r#"{"epochs": 1, "learning_rat": 0.1}"#).as_ptr(),
                data.as_ptr(),
                out.as_ptr(),
                None,
                null_mut(),
                null(),
                &mut h,
            ),
            LumosStatus::InvalidConfig,
            &["learning_rat"],
        );
        expect(
            lumos_train(c(r#"{"epochs": 0}"#).as_ptr(), data.as_ptr(), out.as_ptr(), None, null_mut(), null(), &mut h),
            LumosStatus::InvalidConfig,
            &["epochs"],
        );
        expect(
            lumos_train(
                c("").as_ptr(),
                cpath(&dir.path().join("nothing")).as_ptr(),
                out.as_ptr(),
                None,
                null_mut(),
                null(),
                &mut h,
            ),
            LumosStatus::InvalidArgument,
            &["nothing", "images"],
        );
        assert!(h.is_null());
        assert!(!dir.path().join("m.lumos").exists(), "no model file after a failed training");

        let mut im = std::mem::MaybeUninit::<LumosImage>::zeroed().assume_init();
        let mut tr = std::mem::MaybeUninit::<LumosImage>::zeroed().assume_init();
        expect(lumos_image_read_tiff(null(), &mut im), LumosStatus::NullPointer, &["path"]);
        let garbage = dir.path().join("garbage.tif");
        std::fs::write(&garbage, b"II*\0\x08\0\0\0\xff\xff").unwrap();
        expect(lumos_image_read_tiff(cpath(&garbage).as_ptr(), &mut im), LumosStatus::Tiff, &["garbage.tif"]);
        assert!(im.data.is_null());
        expect(
            lumos_image_write_tiff(cpath(&garbage).as_ptr(), null(), 1, 2, 2, null()),
            LumosStatus::NullPointer,
            &["data"],
        );
        let px = [0f32; 4];
        expect(
            lumos_image_write_tiff(cpath(&garbage).as_ptr(), px.as_ptr(), 1, 0, 2, null()),
            LumosStatus::ShapeMismatch,
            &["zero"],
        );
        let badname = [CString::new(vec![0xffu8]).unwrap()];
        let names = [badname[0].as_ptr()];
        expect(
            lumos_image_write_tiff(cpath(&garbage).as_ptr(), px.as_ptr(), 1, 2, 2, names.as_ptr()),
            LumosStatus::InvalidArgument,
            &["channel_names[0]"],
        );
        expect(
            lumos_mask_write_tiff(cpath(&dir.path().join("x/y.tif")).as_ptr(), [0u8; 4].as_ptr(), 2, 2),
            LumosStatus::Io,
            &["x/y.tif"],
        );
        expect(
            lumos_simulate(c("sem").as_ptr(), null(), 0, &mut im, &mut tr),
            LumosStatus::InvalidArgument,
            &["sem", "ssqpm"],
        );
        expect(
            lumos_simulate(c("qpi").as_ptr(), c(r#"{"size": 4}"#).as_ptr(), 0, &mut im, &mut tr),
            LumosStatus::InvalidConfig,
            &["size"],
        );
        expect(
            lumos_simulate(c("qpi").as_ptr(), null(), 0, &mut im, null_mut()),
            LumosStatus::NullPointer,
            &["out_truth"],
        );
        lumos_image_free(null_mut());
        lumos_image_free(&mut im); // zeroed: harmless

        let mut j: *const std::os::raw::c_char = null();
        expect(
            lumos_train_recipe(c("dm-qpmnet").as_ptr(), c("huge").as_ptr(), &mut j),
            LumosStatus::InvalidArgument,
            &["huge"],
        );
        expect(
            lumos_train_recipe(c("dm-qpmnet").as_ptr(), c("cpu").as_ptr(), null_mut()),
            LumosStatus::NullPointer,
            &["out_json"],
        );

        expect(lumos_cancel_token_new(null_mut()), LumosStatus::NullPointer, &["out_token"]);
        expect(lumos_cancel_token_cancel(null()), LumosStatus::NullPointer, &["token"]);
        expect(lumos_cancel_token_reset(null()), LumosStatus::NullPointer, &["token"]);
        lumos_cancel_token_free(null_mut());
    }
}
