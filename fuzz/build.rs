//! The fuzz binaries link libtorch through lumos: give them its rpath (see ../build.rs).
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(lt) = std::env::var("LIBTORCH") {
        let mut p = std::path::PathBuf::from(lt);
        if p.is_relative() {
            p = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("..").join(p);
        }
        let lib = p.join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.canonicalize().unwrap_or(lib).display());
    }
}
