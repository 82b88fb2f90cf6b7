//! Every file the tool writes goes through here, and every file it reads that a user or
//! another program may have put in its way (a config, a checkpoint) is read bounded.
//!
//! Writing ([`write_atomic`], [`write_bytes_atomic`]): the bytes go to a temporary file
//! `.NAME.PID.tmp` beside the target, are flushed with every error checked, fsynced, and the
//! temporary file is renamed over the target. A full disk, a failing device or a kill leaves
//! the target as it was (absent, or its old content) and never a 0-byte or partial file under
//! the final name; on an error the temporary file is removed (a kill may leave one, with a
//! name that ends in `.tmp` and that no reader takes for an output). A target that is a
//! symlink is followed (the link stays, the file it names is replaced); a target that exists
//! and is not a regular file (a device such as `/dev/stdout` or `/dev/full`, a FIFO) cannot be
//! replaced, so it is written in place, still with every error checked.
//!
//! Appending ([`append_line`]): `metrics.jsonl` is a log, appended a line at a time. Each
//! line goes out in one `write` call; if that fails, the file is cut back to its length
//! before the line, so a failed append leaves no torn line; a kill in the middle of a write
//! can still leave one partial last line, which [`crate::metrics::MetricsLog::open`] drops on
//! resume and which readers must skip (a last line without its `\n`).
//!
//! Reading ([`read_bounded`]): only regular files are opened (a FIFO is refused without
//! blocking on it, a symlink to `/dev/zero` is refused before a byte is read), and a file
//! longer than the caller's bound is refused before it is read.

use crate::error::{DdpmError, Result};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Writes the file `path` atomically (see the module doc) with what `fill` writes into a
/// buffered writer; creates the parent directory. Errors name the path.
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<()> {
    let ctx = || format!("cannot write {}", path.display());
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::grid::ensure_dir(dir)?;
    }
    let target = resolve(path);
    if let Ok(meta) = fs::metadata(&target) {
        if meta.is_dir() {
            return Err(DdpmError::io(
                ctx(),
                io::Error::new(io::ErrorKind::IsADirectory, "it is a directory"),
            ));
        }
        if !meta.is_file() {
            // A device or FIFO: it cannot be replaced; write to it, checking every error.
            let file = fs::OpenOptions::new()
                .write(true)
                .open(&target)
                .map_err(|e| DdpmError::io(ctx(), e))?;
            let mut w = BufWriter::new(file);
            return fill(&mut w)
                .and_then(|()| w.flush())
                .map_err(|e| DdpmError::io(ctx(), e));
        }
    }
    let tmp = tmp_name(&target);
    let written = (|| {
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let mut w = BufWriter::new(file);
        fill(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, &target)
    })();
    written.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        DdpmError::io(ctx(), e)
    })
}

/// [`write_atomic`] for a writer that wants a path (libtorch's `VarStore::save`): `save` writes
/// a temporary file beside `path` (`.tmp-PID-NAME`: it keeps the extension, from which
/// libtorch picks the format), which is then fsynced and renamed over `path`; on any error
/// the temporary file is removed and `path` left as it was.
pub fn write_via(path: &Path, save: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::grid::ensure_dir(dir)?;
    }
    let target = resolve(path);
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = target.with_file_name(format!(".tmp-{}-{name}", std::process::id()));
    let done = save(&tmp).and_then(|()| {
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|()| fs::rename(&tmp, &target))
            .map_err(|e| DdpmError::io(format!("cannot write {}", path.display()), e))
    });
    if done.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    done
}

/// [`write_atomic`] of `bytes`.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |w| w.write_all(bytes))
}

/// Appends `line` (which ends in `\n`) to `file`, the log at `path`, in one write; on any
/// error cuts the file back to its length before, so that no torn line stays.
pub fn append_line(file: &mut File, path: &Path, line: &str) -> Result<()> {
    let before = file.seek(io::SeekFrom::End(0)).ok();
    let result = file.write_all(line.as_bytes()).and_then(|()| file.flush());
    result.map_err(|e| {
        if let Some(len) = before {
            let _ = file.set_len(len);
        }
        DdpmError::io(format!("cannot append to {}", path.display()), e)
    })
}

/// The bytes of the regular file `path`, refused without reading when it is not a regular
/// file (a device, a FIFO, a directory; symlinks are followed) or longer than `max` bytes;
/// `what` names the file in messages ("the config file", "model.safetensors").
pub fn read_bounded(path: &Path, max: u64, what: &str) -> Result<Vec<u8>> {
    let ctx = || format!("cannot read {what} {}", path.display());
    let refuse =
        |reason: String| DdpmError::io(ctx(), io::Error::new(io::ErrorKind::InvalidInput, reason));
    // Checked before opening: opening a FIFO for reading blocks until a writer comes.
    let meta = fs::metadata(path).map_err(|e| DdpmError::io(ctx(), e))?;
    check_regular(&meta, max).map_err(refuse)?;
    let mut file = open_nonblocking(path).map_err(|e| DdpmError::io(ctx(), e))?;
    // Checked again on what was opened, in case the path changed in between.
    let meta = file.metadata().map_err(|e| DdpmError::io(ctx(), e))?;
    check_regular(&meta, max).map_err(refuse)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    Read::by_ref(&mut file)
        .take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| DdpmError::io(ctx(), e))?;
    if bytes.len() as u64 > max {
        return Err(refuse(format!("it grew past {max} bytes while being read")));
    }
    Ok(bytes)
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_text_bounded(path: &Path, max: u64, what: &str) -> Result<String> {
    String::from_utf8(read_bounded(path, max, what)?).map_err(|e| {
        DdpmError::io(
            format!("cannot read {what} {}", path.display()),
            io::Error::new(io::ErrorKind::InvalidData, e.utf8_error()),
        )
    })
}

fn check_regular(meta: &fs::Metadata, max: u64) -> std::result::Result<(), String> {
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "a device, FIFO or socket"
        };
        return Err(format!("it is {kind}, not a regular file"));
    }
    if meta.len() > max {
        return Err(format!(
            "it holds {} bytes, more than the {max} its format allows",
            meta.len()
        ));
    }
    Ok(())
}

#[cfg(unix)]
fn open_nonblocking(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // O_NONBLOCK: a FIFO swapped in after the check opens at once instead of blocking; it
    // changes nothing for a regular file.
    const O_NONBLOCK: i32 = if cfg!(target_os = "linux") {
        0o4000
    } else {
        0x0004
    };
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(path)
}

#[cfg(not(unix))]
fn open_nonblocking(path: &Path) -> io::Result<File> {
    File::open(path)
}

/// `path` with its symlinks followed (the path itself when it does not exist yet).
fn resolve(path: &Path) -> PathBuf {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => fs::canonicalize(path).unwrap_or_else(|_| {
            // A dangling link: write where it points.
            fs::read_link(path)
                .map(|to| match path.parent() {
                    Some(dir) if to.is_relative() => dir.join(to),
                    _ => to,
                })
                .unwrap_or_else(|_| path.to_path_buf())
        }),
        _ => path.to_path_buf(),
    }
}

/// `.NAME.PID.tmp` beside `target`.
fn tmp_name(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    target.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_dir;

    #[test]
    fn a_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = test_dir("fsio_replace");
        let path = dir.join("sub").join("a.txt");
        write_bytes_atomic(&path, b"one").unwrap();
        write_bytes_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.join("sub")).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_failed_fill_keeps_the_old_file() {
        let dir = test_dir("fsio_fail");
        let path = dir.join("a.txt");
        write_bytes_atomic(&path, b"old").unwrap();
        let err = write_atomic(&path, |w| {
            w.write_all(b"partial")?;
            Err(io::Error::other("boom"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[test]
    fn a_symlink_is_followed_and_kept() {
        let dir = test_dir("fsio_link");
        let real = dir.join("real.txt");
        let link = dir.join("link.txt");
        fs::write(&real, "old").unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&real, &link).unwrap();
            write_bytes_atomic(&link, b"new").unwrap();
            assert!(fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink());
            assert_eq!(fs::read(&real).unwrap(), b"new");
        }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_device_that_fails_every_write_is_an_error() {
        let err = write_bytes_atomic(Path::new("/dev/full"), b"x").unwrap_err();
        assert!(err.to_string().contains("/dev/full"), "{err}");
    }

    #[test]
    fn reads_are_bounded_and_regular_files_only() {
        let dir = test_dir("fsio_read");
        let path = dir.join("a.bin");
        fs::write(&path, [7u8; 10]).unwrap();
        assert_eq!(read_bounded(&path, 10, "a").unwrap(), [7u8; 10]);
        let err = read_bounded(&path, 9, "a").unwrap_err().to_string();
        assert!(err.contains("10 bytes, more than the 9"), "{err}");
        let err = read_bounded(&dir, 9, "a").unwrap_err().to_string();
        assert!(err.contains("a directory"), "{err}");
        #[cfg(target_os = "linux")]
        {
            let err = read_bounded(Path::new("/dev/zero"), 9, "a")
                .unwrap_err()
                .to_string();
            assert!(err.contains("not a regular file"), "{err}");
        }
    }

    #[test]
    fn a_path_writer_publishes_whole_files_only() {
        let dir = test_dir("fsio_via");
        let path = dir.join("w.bin");
        write_via(&path, |tmp| {
            fs::write(tmp, b"whole").map_err(|e| DdpmError::io("test", e))
        })
        .unwrap();
        let err = write_via(&path, |tmp| {
            fs::write(tmp, b"part").unwrap();
            Err(DdpmError::io("test", io::Error::other("boom")))
        });
        assert!(err.is_err());
        assert_eq!(fs::read(&path).unwrap(), b"whole");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[test]
    fn appends_whole_lines() {
        let dir = test_dir("fsio_append");
        let path = dir.join("log");
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        append_line(&mut file, &path, "one\n").unwrap();
        append_line(&mut file, &path, "two\n").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "one\ntwo\n");
    }
}
