//! torch-sys puts no rpath into final binaries: add libtorch's lib folder so the
//! CLI, the tests and the cdylib find libtorch without LD_LIBRARY_PATH. These are the
//! build tree's absolute paths; the release artefacts replace them with paths relative to
//! the binary (scripts/release.py), and no shipped binary keeps one. Only ELF and Mach-O
//! linkers take `-rpath`: Windows finds DLLs on PATH or beside the executable.
//!
//! Also compiles `src/backend/optim_shim.cpp` (libtorch's multi-tensor optimizer kernels, which
//! tch does not bind) against libtorch's headers, with the flags torch-sys uses for its
//! own C++ wrapper (C++17, the C++11 ABI that `LIBTORCH_CXX11_ABI` names).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let rpath = matches!(os.as_str(), "linux" | "macos" | "freebsd");
    if let Ok(lt) = std::env::var("LIBTORCH")
        && rpath
    {
        let mut p = PathBuf::from(lt);
        if p.is_relative() {
            p = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join(p);
        }
        let lib = p.join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
    println!("cargo:rerun-if-changed=src/backend/optim_shim.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let libtorch = match std::env::var("LIBTORCH") {
        Ok(lt) if PathBuf::from(&lt).is_relative() => root.join(lt),
        Ok(lt) => PathBuf::from(lt),
        Err(_) => root.join(".libtorch/torch"),
    };
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    // C++ against libtorch's headers, with torch-sys's flags
    let torch_cpp = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .include(libtorch.join("include"))
            .include(libtorch.join("include/torch/csrc/api/include"))
            .std("c++17")
            .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
            .flag("-DGLOG_USE_GLOG_EXPORT")
            .flag_if_supported("-Wno-unused-parameter")
            .warnings(false);
        b
    };
    torch_cpp().file("src/backend/optim_shim.cpp").compile("lumos_optim");

    // src/backend/onednn.cpp: blocked-layout training convolutions through a oneDNN library of
    // its own (dlopen'ed at run time, so nothing here links it) and the norm kernels, which
    // are loops the compiler vectorizes: optimized in every profile
    println!("cargo:rerun-if-changed=src/backend/onednn.cpp");
    torch_cpp()
        .file("src/backend/onednn.cpp")
        .opt_level(3)
        // lets GCC turn the kernels' selects on a comparison into vector blends (no FP
        // exception flags are read anywhere in the engine)
        .flag_if_supported("-fno-trapping-math")
        .compile("lumos_onednn");
    if os == "linux" {
        // dlopen lives in libdl before glibc 2.34 (in libc on macOS and since 2.34)
        println!("cargo:rustc-link-lib=dl");
    }
    if rpath {
        // where scripts/bootstrap.sh puts that oneDNN (libdnnl.so.3): dlopen searches the
        // binary's RUNPATH
        let onednn = root.join(".onednn/lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", onednn.canonicalize().unwrap_or(onednn).display());
    }
}
