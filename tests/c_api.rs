//! Builds the C test program against include/lumos.h and the cdylib, as C and as C++,
//! and runs it on a tiny simulated data set.

use std::path::{Path, PathBuf};
use std::process::Command;

use lumos::sim::ssqpm::{write_dataset, SsqpmConfig};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// target/<profile>, where cargo puts liblumos.so next to the test's deps folder.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

fn build(compiler: &str, lang_args: &[&str], out: &Path) {
    let lib = lib_dir();
    assert!(lib.join("liblumos.so").is_file(), "liblumos.so not found in {}", lib.display());
    let status = Command::new(compiler)
        .args(lang_args)
        .args(["-Wall", "-Wextra", "-Werror", "-g"])
        .arg("-I")
        .arg(root().join("include"))
        .arg(root().join("tests/c/api_test.c"))
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

fn run(exe: &Path, data: &Path, work: &Path) {
    let out = Command::new(exe).arg(data).arg(work).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
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
