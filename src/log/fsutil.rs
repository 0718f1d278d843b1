//! Small durable file-system steps shared by everything that persists metadata (checkpoint,
//! consumer offsets, the shape file, the name server's tables).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Replaces `path` with `bytes` so that a crash leaves either the old file (or none) or the
/// whole new one: write `path.tmp`, fsync it, rename it over `path`, fsync the directory
/// (the rename is durable only once the directory entry is).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    sync_dir(parent_or_cwd(path))
}

/// Runs blocking file work (fsync, rename, unlink) on the shard's blocking thread pool, so the
/// shard's own thread goes on serving meanwhile. Replacing or deleting a file frees its blocks,
/// and on a filesystem mounted with `discard` that waits for the device: 25-85 ms measured here,
/// which stalled every send and pull of the shard when done on its thread.
pub async fn off_shard<R: Send + 'static>(work: impl FnOnce() -> R + Send + 'static) -> R {
    glommio::executor().spawn_blocking(work).await
}

/// [`write_atomically`] off the shard's thread; gives the bytes back to a caller that keeps
/// what it last wrote.
pub async fn write_atomically_off_shard(path: PathBuf, bytes: Vec<u8>) -> io::Result<Vec<u8>> {
    off_shard(move || write_atomically(&path, &bytes).map(|()| bytes)).await
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_or_cwd(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Makes the entries of `dir` (created, renamed or removed files) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes back every dirty page of the file system holding `dir` and commits its journal
/// (syncfs(2)): one call makes the buffered writes to many files durable.
pub fn sync_filesystem(dir: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let d = File::open(dir)?;
    // SAFETY: syncfs on a descriptor we own, open for the duration of the call.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_whole_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_atomically(&p, b"one").unwrap();
        write_atomically(&p, b"two!").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two!");
        assert!(!d.path().join("f.tmp").exists());
    }

    #[test]
    fn syncing_the_file_system_of_a_missing_directory_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        sync_filesystem(d.path()).unwrap();
        let e = sync_filesystem(&d.path().join("gone")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
