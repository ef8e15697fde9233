//! Tensors to and from safetensors files with string metadata, written atomically
//! (temporary file in the target folder, fsync, rename): a failed or interrupted write
//! never leaves a partial file behind.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if path.file_name().is_none() {
        return Err(Error::InvalidArgument(format!("'{}' is not a file path", path.display())));
    }
    let mut builder = tempfile::Builder::new();
    builder.prefix(".lumos-tmp-");
    // a temporary file is created 0600; a model, checkpoint or record is shared like any file
    // the user creates (0666 minus the umask): another user's Fiji must be able to read it
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut tmp = builder.tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(path, e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    // the rename itself survives a power cut once the folder is synced (best effort: some
    // filesystems refuse to sync a directory handle)
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Float32 tensors by name, as read from a file (CPU).
pub struct TensorFile {
    pub metadata: HashMap<String, String>,
    pub tensors: BTreeMap<String, Tensor>,
}

/// Serializes float tensors (converted to f32 on the CPU) with metadata, atomically.
pub fn save(path: &Path, tensors: &[(String, Tensor)], metadata: HashMap<String, String>) -> Result<()> {
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let v = Vec::<f32>::try_from(t.f_view([-1])?)?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        owned.push((name.clone(), shape, bytes));
    }
    let views = owned
        .iter()
        .map(|(n, s, b)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::ModelFormat(format!("cannot serialize tensors: {e}")))?;
    let buf = safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::ModelFormat(format!("cannot serialize tensors: {e}")))?;
    write_atomic(path, &buf)
}

/// Reads a safetensors file: metadata and all tensors as f32.
pub fn load(path: &Path) -> Result<TensorFile> {
    let buf = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let what = |e: safetensors::SafeTensorError| {
        Error::ModelFormat(format!(
            "'{}' is not a readable safetensors file ({e}); expected a lumos model or checkpoint",
            path.display()
        ))
    };
    let (_, meta) = SafeTensors::read_metadata(&buf).map_err(what)?;
    let st = SafeTensors::deserialize(&buf).map_err(what)?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(Error::ModelFormat(format!("tensor '{name}' has dtype {:?}; expected F32", view.dtype())));
        }
        let data: Vec<f32> =
            view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        tensors.insert(name, Tensor::f_from_slice(&data)?.f_view(shape.as_slice())?);
    }
    Ok(TensorFile { metadata: meta.metadata().clone().unwrap_or_default(), tensors })
}

/// Copies `tensors` into the variables of `vs` (names must match exactly; names that
/// start with one of `ignore_prefixes` are skipped).
pub fn copy_into(vs: &tch::nn::VarStore, tensors: &BTreeMap<String, Tensor>, ignore_prefixes: &[&str]) -> Result<()> {
    let mut vars = vs.variables();
    for (name, src) in tensors {
        if ignore_prefixes.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let dst = vars.remove(name).ok_or_else(|| {
            Error::ModelFormat(format!("the file has a weight '{name}' that this architecture does not have"))
        })?;
        if dst.size() != src.size() {
            return Err(Error::ModelFormat(format!(
                "weight '{name}' has shape {:?} in the file; the architecture expects {:?}",
                src.size(),
                dst.size()
            )));
        }
        let mut dst = dst;
        tch::no_grad(|| dst.f_copy_(src))?;
    }
    if let Some(missing) = vars.keys().next() {
        return Err(Error::ModelFormat(format!(
            "the file lacks weight '{missing}' (and {} more) that the architecture needs",
            vars.len() - 1
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Model files are written like any file the user creates: 0666 minus the umask (not
    /// the temporary file's 0600), also when they replace an existing file.
    #[cfg(target_os = "linux")]
    #[test]
    fn written_files_get_ordinary_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let umask = status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.lumos");
        for round in 0..2 {
            write_atomic(&p, b"bytes").unwrap();
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o666 & !umask, "round {round}: mode {mode:o}, umask {umask:o}");
        }
        // nothing else is left in the folder
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
