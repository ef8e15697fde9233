// Shared by the fuzz targets: the readers take paths (as hosts call them), so each input
// is written to a per-process file in a RAM-backed folder first.
use std::path::PathBuf;

pub fn scratch(ext: &str, data: &[u8]) -> PathBuf {
    let dir = if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let p = dir.join(format!("lumos-fuzz-{}.{ext}", std::process::id()));
    std::fs::write(&p, data).expect("scratch file");
    p
}
