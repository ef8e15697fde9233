//! The checked-in header must be what cbindgen generates from the sources now, and it
//! must compile cleanly as C and as C++ (included twice).

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn header_is_current() {
    let cfg = cbindgen::Config::from_file(root().join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(cfg)
        .with_src(root().join("src/ffi/mod.rs"))
        .generate()
        .expect("cbindgen generates");
    let mut buf = Vec::new();
    bindings.write(&mut buf);
    let generated = String::from_utf8(buf).unwrap();
    let path = root().join("include/lumos.h");
    if std::env::var_os("LUMOS_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == generated,
        "include/lumos.h is stale: regenerate it with `LUMOS_BLESS=1 cargo test --test header` and commit it"
    );
}

#[test]
fn header_compiles_as_c_and_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("h.c");
    std::fs::write(&src, "#include \"lumos.h\"\n#include \"lumos.h\"\nint main(void) { return LUMOS_STATUS_OK; }\n")
        .unwrap();
    let inc = root().join("include");
    for (cc, args) in [
        ("gcc", vec!["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"]),
        ("g++", vec!["-std=c++17", "-Wall", "-Wextra", "-Werror", "-x", "c++"]),
    ] {
        let out = Command::new(cc)
            .args(&args)
            .arg("-I")
            .arg(&inc)
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(dir.path().join("h.o"))
            .output()
            .unwrap_or_else(|e| panic!("{cc} not found: {e}"));
        assert!(out.status.success(), "{cc} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
}
