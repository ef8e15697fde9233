//! Builds the C test programs against include/lumos.h and the cdylib, as C and as C++,
//! with AddressSanitizer, and runs them on tiny simulated data sets: each must pass and
//! ASan / LeakSanitizer must report nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use lumos::sim::ssqpm::{SsqpmConfig, write_dataset};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The folder of the cdylib built with this test: `target/<profile>/deps` (where `cargo
/// test` writes the fresh liblumos.so; the copy in `target/<profile>` is only refreshed by
/// `cargo build`), else `target/<profile>`.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap().to_path_buf();
    if deps.join("liblumos.so").is_file() { deps } else { deps.parent().unwrap().to_path_buf() }
}

fn build(compiler: &str, lang_args: &[&str], out: &Path) {
    build_source(compiler, lang_args, "tests/c/api_test.c", out)
}

fn build_source(compiler: &str, lang_args: &[&str], source: &str, out: &Path) {
    let lib = lib_dir();
    assert!(lib.join("liblumos.so").is_file(), "liblumos.so not found in {}", lib.display());
    let status = Command::new(compiler)
        .args(lang_args)
        .args(["-Wall", "-Wextra", "-Werror", "-g"])
        // every C/C++ test program runs under AddressSanitizer + LeakSanitizer
        .args(["-fsanitize=address", "-fno-omit-frame-pointer"])
        .arg("-I")
        .arg(root().join("include"))
        .arg(root().join(source))
        .arg("-o")
        .arg(out)
        .arg(format!("-L{}", lib.display()))
        .arg("-llumos")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lpthread", "-lm"])
        .output()
        .unwrap_or_else(|e| panic!("{compiler}: {e}"));
    assert!(status.status.success(), "{compiler} failed:\n{}", String::from_utf8_lossy(&status.stderr));
}

/// A command for an ASan-built test program: leak checking on, libtorch's one-time
/// allocations suppressed (tests/lsan.supp names no lumos frame).
fn asan(exe: &Path) -> Command {
    let mut c = Command::new(exe);
    c.env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:exitcode=23")
        .env("LSAN_OPTIONS", format!("suppressions={}:print_suppressions=0", root().join("tests/lsan.supp").display()));
    c
}

/// Fails on any AddressSanitizer or LeakSanitizer report in a program's stderr.
fn assert_sanitizer_clean(what: &str, stderr: &str) {
    assert!(!stderr.contains("ERROR: AddressSanitizer"), "{what}: AddressSanitizer error:\n{stderr}");
    assert!(!stderr.contains("ERROR: LeakSanitizer"), "{what}: leak:\n{stderr}");
}

fn run(exe: &Path, data: &Path, work: &Path) {
    let out = asan(exe).arg(data).arg(work).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert_sanitizer_clean(&exe.display().to_string(), &stderr);
    assert!(out.status.success(), "{} failed:\n{stdout}\n{stderr}", exe.display());
    assert!(stdout.contains(", 0 failed"), "{stdout}");
}

#[test]
fn c_and_cpp_programs_exercise_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = SsqpmConfig { size: 64, ..Default::default() };
    write_dataset(&data, 4, 0, &cfg, 5).unwrap();
    let c_exe = dir.path().join("api_test_c");
    build("gcc", &["-std=c11", "-x", "c"], &c_exe);
    let c_work = dir.path().join("c");
    std::fs::create_dir_all(&c_work).unwrap();
    run(&c_exe, &data.join("train"), &c_work);

    let cpp_exe = dir.path().join("api_test_cpp");
    build("g++", &["-std=c++17", "-x", "c++"], &cpp_exe);
    let cpp_work = dir.path().join("cpp");
    std::fs::create_dir_all(&cpp_work).unwrap();
    run(&cpp_exe, &data.join("train"), &cpp_work);
}

/// DM-QPMNet trained through the C API, saved, then loaded in a fresh process and run on a
/// 5-channel TIFF, gives the same masks as in the training process.
#[test]
fn dmqpm_trained_through_the_c_api_segments_identically_in_a_fresh_process() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = SsqpmConfig { size: 64, ..Default::default() };
    write_dataset(&data, 3, 1, &cfg, 21).unwrap();
    let image = std::fs::read_dir(data.join("test/images")).unwrap().next().unwrap().unwrap().path();
    let exe = dir.path().join("dmqpm_roundtrip");
    build_source("gcc", &["-std=c11", "-x", "c"], "tests/c/dmqpm_roundtrip.c", &exe);
    let model = dir.path().join("dmqpm.lumos");
    let (m1, m2) = (dir.path().join("in_training_process.tif"), dir.path().join("fresh_process.tif"));
    let go = |args: &[&std::ffi::OsStr]| {
        let out = asan(&exe).args(args).output().unwrap();
        println!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_sanitizer_clean(&format!("{args:?}"), &String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{:?} failed", args);
    };
    go(&["train".as_ref(), data.join("train").as_os_str(), model.as_os_str(), image.as_os_str(), m1.as_os_str()]);
    assert!(model.is_file());
    go(&["segment".as_ref(), model.as_os_str(), image.as_os_str(), m2.as_os_str()]);
    let a = lumos::io::tiff::read_mask(&m1).unwrap();
    let b = lumos::io::tiff::read_mask(&m2).unwrap();
    assert_eq!(a.dim(), (64, 64));
    assert_eq!(a, b, "the reloaded model segments differently");
    // the saved model says what it is
    let m = lumos::Model::load(&model, tch::Device::Cpu).unwrap();
    assert_eq!(m.meta.kind, lumos::engine::model::ModelKind::Dmqpm);
}

/// The decompose verb's "Done when": train a muSplit model through the C API, decompose,
/// then load the saved model in a fresh process: the output must be identical.
#[test]
fn musplit_train_then_decompose_in_a_fresh_process() {
    use lumos::sim::fluo::{FluoConfig, write_dataset};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_dataset(&data, 2, 1, &FluoConfig { size: 40, ..Default::default() }, 5).unwrap();
    let image = data.join("test/inputs/fluo_0000.tif");
    let exe = dir.path().join("decompose_roundtrip");
    build_source("gcc", &["-std=c11", "-x", "c"], "tests/c/decompose_roundtrip.c", &exe);
    let model = dir.path().join("split.lumos");
    let (o1, o2) = (dir.path().join("in_training_process.bin"), dir.path().join("fresh_process.bin"));
    let go = |args: &[&std::ffi::OsStr]| {
        let out = asan(&exe).args(args).output().unwrap();
        println!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_sanitizer_clean(&format!("{args:?}"), &String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{:?} failed", args);
    };
    go(&["train".as_ref(), data.join("train").as_os_str(), model.as_os_str(), image.as_os_str(), o1.as_os_str()]);
    go(&["decompose".as_ref(), model.as_os_str(), image.as_os_str(), o2.as_os_str()]);
    let (a, b) = (std::fs::read(&o1).unwrap(), std::fs::read(&o2).unwrap());
    assert_eq!(a.len(), 2 * 40 * 40 * 4);
    assert!(a == b, "the reloaded model decomposes differently");
    let m = lumos::Model::load(&model, tch::Device::Cpu).unwrap();
    assert_eq!(m.meta.kind, lumos::engine::model::ModelKind::Musplit);
}

#[test]
fn pgdiff_train_save_reload_segment_in_a_fresh_process() {
    use lumos::sim::qpi::{QpiConfig, write_dataset};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_dataset(&data, 3, 1, &QpiConfig { size: 48, ..Default::default() }, 6).unwrap();
    let image = data.join("test/images/qpi_0000.tif");
    let exe = dir.path().join("pgdiff_roundtrip");
    build_source("gcc", &["-std=c11", "-x", "c"], "tests/c/pgdiff_roundtrip.c", &exe);
    let model = dir.path().join("pg.lumos");
    let (o1, o2) = (dir.path().join("in_training_process.bin"), dir.path().join("fresh_process.bin"));
    let go = |args: &[&std::ffi::OsStr]| {
        let out = asan(&exe).args(args).output().unwrap();
        println!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_sanitizer_clean(&format!("{args:?}"), &String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{:?} failed", args);
    };
    go(&["train".as_ref(), data.join("train").as_os_str(), model.as_os_str(), image.as_os_str(), o1.as_os_str()]);
    go(&["segment".as_ref(), model.as_os_str(), image.as_os_str(), o2.as_os_str()]);
    let (a, b) = (std::fs::read(&o1).unwrap(), std::fs::read(&o2).unwrap());
    assert_eq!(a.len(), 2 * 48 * 48);
    assert!(a == b, "the reloaded model segments differently");
    let m = lumos::Model::load(&model, tch::Device::Cpu).unwrap();
    assert_eq!(m.meta.kind, lumos::engine::model::ModelKind::Pgdiff);
}

fn train_tiny(method: &str, data: &Path, out: &Path) {
    let mut cfg = lumos::recipes::recipe(method, "tiny").unwrap();
    cfg.device = "cpu".into();
    cfg.val_fraction = 0.0;
    lumos::engine::train::train(&cfg, data, out, &mut lumos::engine::progress::Monitor::none()).unwrap();
}

/// Builds a program (with AddressSanitizer, as every test program) and runs it: it must
/// succeed, and ASan must report no memory error and no leak. libtorch's own one-time
/// allocations (thread pools, kernel registries) are suppressed by `tests/lsan.supp`,
/// which names only libtorch, libgomp and libstdc++ frames: a leak in lumos is reported.
fn run_under_asan(compiler: &str, lang_args: &[&str], source: &str, exe: &Path, args: &[&std::ffi::OsStr]) -> String {
    let mut lang: Vec<&str> = lang_args.to_vec();
    lang.extend(["-I", "bindings/cpp"]);
    build_source(compiler, &lang, source, exe);
    let out = asan(exe).current_dir(root()).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}{stderr}");
    assert_sanitizer_clean(source, &stderr);
    assert!(out.status.success(), "{source} failed ({:?}):\n{stderr}", out.status);
    stdout
}

/// The acquisition-style examples for C and C++ integrators: load once, process a stream
/// of frames, check every status, free everything; clean under AddressSanitizer.
#[test]
fn acquisition_examples_run_clean_under_address_sanitizer() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_dataset(&data, 3, 0, &SsqpmConfig { size: 64, ..Default::default() }, 8).unwrap();
    let model = dir.path().join("dmqpm.lumos");
    train_tiny("dm-qpmnet", &data.join("train"), &model);
    let masks = dir.path().join("masks");
    std::fs::create_dir_all(&masks).unwrap();

    let c = run_under_asan(
        "gcc",
        &["-std=c11", "-x", "c"],
        "bindings/c/acquire.c",
        &dir.path().join("acquire_c"),
        &[model.as_os_str(), "simulate".as_ref(), "ssqpm".as_ref(), "4".as_ref(), masks.as_os_str()],
    );
    assert!(c.contains("segmented 4 frames"), "{c}");
    assert_eq!(c.matches("frame ").count(), 4);
    let m = lumos::io::tiff::read_mask(&masks.join("mask_0003.tif")).unwrap();
    assert_eq!(m.dim(), (128, 128));

    // TIFF frames, and a frame with the wrong channel count is refused with a message
    let tif = dir.path().join("frame.tif");
    let frame = lumos::sim::simulate_frame("ssqpm", r#"{"size": 64}"#, 1).unwrap();
    lumos::io::tiff::write_image_f32(&tif, &frame.image).unwrap();
    run_under_asan(
        "gcc",
        &["-std=c11", "-x", "c"],
        "bindings/c/acquire.c",
        &dir.path().join("acquire_c2"),
        &[model.as_os_str(), tif.as_os_str(), tif.as_os_str()],
    );
    let out = Command::new(dir.path().join("acquire_c2"))
        .args([model.as_os_str(), "simulate".as_ref(), "qpi".as_ref(), "1".as_ref()])
        .env("ASAN_OPTIONS", "detect_leaks=0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has 1 channels; the model takes 5"));

    // the check can fail: the same program without lumos_model_free is reported as leaking
    let leaky = dir.path().join("leaky.c");
    let src = std::fs::read_to_string(root().join("bindings/c/acquire.c")).unwrap();
    std::fs::write(&leaky, src.replace("lumos_model_free(model);", "")).unwrap();
    build_source("gcc", &["-std=c11", "-x", "c"], leaky.to_str().unwrap(), &dir.path().join("leaky"));
    let out = Command::new(dir.path().join("leaky"))
        .args([model.as_os_str(), "simulate".as_ref(), "ssqpm".as_ref(), "1".as_ref()])
        .env("ASAN_OPTIONS", "detect_leaks=1")
        .env("LSAN_OPTIONS", format!("suppressions={}", root().join("tests/lsan.supp").display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ERROR: LeakSanitizer") && stderr.contains("lumos_model_load"),
        "the leak went unseen:\n{stderr}"
    );

    // C++: the wrapper checks an Image's size before the library reads C * H * W floats
    let short_src = dir.path().join("short_image.cpp");
    std::fs::write(
        &short_src,
        r#"#include "lumos.hpp"
#include <cstdio>
int main(int argc, char **argv) {
    if (argc < 2) return 2;
    lumos::Model model(argv[1], "cpu");
    lumos::Image x;
    x.channels = 5;
    x.height = 64;
    x.width = 64;
    x.data.assign(10, 0.0f);
    try {
        model.segment(x);
    } catch (const std::invalid_argument &e) {
        std::printf("refused: %s\n", e.what());
        return 0;
    }
    return 1;
}
"#,
    )
    .unwrap();
    let out = run_under_asan(
        "g++",
        &["-std=c++17", "-x", "c++"],
        short_src.to_str().unwrap(),
        &dir.path().join("short_image"),
        &[model.as_os_str()],
    );
    assert!(out.contains("refused") && out.contains("channels * height * width = 20480"), "{out}");

    // C++: segmentation, then decomposition with a muSplit model
    let cpp = run_under_asan(
        "g++",
        &["-std=c++17", "-x", "c++"],
        "bindings/cpp/acquire.cpp",
        &dir.path().join("acquire_cpp"),
        &[model.as_os_str(), "ssqpm".as_ref(), "3".as_ref()],
    );
    assert!(cpp.contains("processed 3 frames"), "{cpp}");
    let fluo = dir.path().join("fluo");
    lumos::sim::fluo::write_dataset(&fluo, 2, 0, &lumos::sim::fluo::FluoConfig { size: 48, ..Default::default() }, 3)
        .unwrap();
    let split = dir.path().join("split.lumos");
    train_tiny("musplit-hvae", &fluo.join("train"), &split);
    let cpp = run_under_asan(
        "g++",
        &["-std=c++17", "-x", "c++"],
        "bindings/cpp/acquire.cpp",
        &dir.path().join("acquire_cpp2"),
        &[split.as_os_str(), "fluo".as_ref(), "2".as_ref()],
    );
    assert!(cpp.contains("model musplit") && cpp.contains("processed 2 frames"), "{cpp}");
}
