//! Helpers shared by the fuzz targets: a scratch directory per process (on tmpfs when there is
//! one, reused for every input) and the split of one input into several files.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// This process's scratch directory, created once: `/dev/shm/ddpm-fuzz-<pid>` (or under the
/// system temporary directory where there is no /dev/shm).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("ddpm-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("cannot create the fuzz scratch directory");
        dir
    })
}

/// A fresh (emptied) directory `name` inside [`scratch`].
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = scratch().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("cannot create a fuzz directory");
    dir
}

/// Writes `bytes` to `dir/name`, replacing what was there.
pub fn put(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("cannot write a fuzz input file");
    path
}

/// The separator between the files of one multi-file input (see the dictionaries).
pub const PART: &[u8] = b"\n@@PART@@\n";

/// `data` cut at every [`PART`].
pub fn split_parts(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(PART.len()).position(|w| w == PART) {
        parts.push(&rest[..i]);
        rest = &rest[i + PART.len()..];
    }
    parts.push(rest);
    parts
}
