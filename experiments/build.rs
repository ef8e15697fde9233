//! The same run-time search path as the engine's own binaries (see ../build.rs): libtorch's
//! lib folder and the bootstrapped oneDNN, so that the comparison binary and its tests run
//! from the build tree.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if !matches!(os.as_str(), "linux" | "macos" | "freebsd") {
        return;
    }
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("..");
    if let Ok(lt) = std::env::var("LIBTORCH") {
        let p = PathBuf::from(lt);
        let lib = if p.is_relative() { root.join(p) } else { p }.join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.canonicalize().unwrap_or(lib).display());
    }
    let onednn = root.join(".onednn/lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", onednn.canonicalize().unwrap_or(onednn).display());
}
