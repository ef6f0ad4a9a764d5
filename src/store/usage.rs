//! How much disk the save directory takes, and how much its filesystem has
//! left: `GET /health`'s `disk`, which the dashboard charts over time.

use std::io;
use std::path::Path;

/// The save directory on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskUsage {
    /// Plain files directly in the directory: saves, their sidecars,
    /// kvgate's own files, and whatever else llama-server's clients saved
    /// there.
    pub files: u64,
    /// Their sizes added up.
    pub bytes: u64,
    /// Bytes the filesystem still lets an unprivileged writer use (`None`
    /// when it can't tell).
    pub free_bytes: Option<u64>,
}

/// Measures `dir`. Symlinks and subfolders are not followed or counted
/// (kvgate never writes either), and a file that vanishes meanwhile (a
/// rotation) is left out.
pub fn disk_usage(dir: &Path) -> io::Result<DiskUsage> {
    let mut usage = DiskUsage {
        files: 0,
        bytes: 0,
        free_bytes: None,
    };
    for entry in std::fs::read_dir(dir)?.flatten() {
        let Ok(md) = std::fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if md.file_type().is_file() {
            usage.files += 1;
            usage.bytes += md.len();
        }
    }
    usage.free_bytes = rustix::fs::statvfs(dir)
        .ok()
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize));
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_plain_files_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.bin"), vec![0u8; 1000]).unwrap();
        std::fs::write(dir.path().join("a.meta.json"), b"{}").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/big.bin"), vec![0u8; 5000]).unwrap();
        std::os::unix::fs::symlink(dir.path().join("sub/big.bin"), dir.path().join("link.bin"))
            .unwrap();
        let u = disk_usage(dir.path()).unwrap();
        assert_eq!((u.files, u.bytes), (2, 1002));
        assert!(u.free_bytes.is_some_and(|f| f > 0), "{u:?}");
        assert!(disk_usage(&dir.path().join("none")).is_err());
    }
}
