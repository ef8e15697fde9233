//! torch-sys puts no rpath into final binaries: add libtorch's lib folder so the
//! CLI, the tests and the cdylib find libtorch without LD_LIBRARY_PATH.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(lt) = std::env::var("LIBTORCH") {
        let mut p = PathBuf::from(lt);
        if p.is_relative() {
            p = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join(p);
        }
        let lib = p.join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
