//! Direct-I/O helpers around glommio's DMA files.

use std::path::Path;

use glommio::io::DmaFile;

/// Bytes of the probe file: one O_DIRECT block.
const PROBE_LEN: usize = 4096;

/// Makes glommio probe the device of `dir` on a non-empty file.
///
/// glommio decides whether a device supports polled I/O (the poll ring) by reading the first
/// block of the first DMA file this thread opens on it, and remembers the answer per thread.
/// Probing an *empty* file returns success whatever the device supports, and every later read
/// then fails with EOPNOTSUPP on devices without poll queues. So each shard thread opens a
/// one-block file first.
///
/// `existing` files (a store's segments) are tried first, so a full disk does not stop a
/// restart; a one-block probe file is written only when none is at least a block long.
pub async fn probe_device(dir: &Path, existing: &[std::path::PathBuf]) -> std::io::Result<()> {
    let usable = existing
        .iter()
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() >= PROBE_LEN as u64));
    if let Some(p) = usable {
        let f = DmaFile::open(p).await.map_err(std::io::Error::from)?;
        let _ = f.close().await;
        return Ok(());
    }
    let p = dir.join(".dma-probe");
    std::fs::write(&p, [0u8; PROBE_LEN])?;
    let r = DmaFile::open(&p).await;
    let _ = std::fs::remove_file(&p);
    let f = r.map_err(std::io::Error::from)?;
    let _ = f.close().await;
    Ok(())
}
