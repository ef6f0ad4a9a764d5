//! Small files kvgate keeps in the save directory (save sidecars, the live
//! settings, the instances file) are written whole: under a temporary name
//! unique to this write (which a restart cleans up), synced, then renamed
//! into place. A reader sees the old file or the new one, never half of
//! one; two writes of the same file never share a temporary file; and a
//! failed write leaves no temporary file behind.

use std::collections::hash_map::RandomState;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::store::meta::TEMP_PREFIX;

/// Writes `bytes` as `dir/name`, whole.
pub(crate) fn write_whole(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(temp_name(name));
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create_new(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join(name))
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// A temporary name for `name` no other write uses: a random token for this
/// process (process ids repeat across PID namespaces, so they can't tell
/// two processes apart) and a counter within it.
pub(crate) fn temp_name(name: &str) -> String {
    static TOKEN: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let token = TOKEN.get_or_init(|| {
        // `RandomState` is seeded from the OS's random source.
        let mut h = RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish()
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{TEMP_PREFIX}{token:016x}-{n}-{name}")
}

/// Makes the directory's entries (a rename, a new file) durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_are_never_reused() {
        let names: std::collections::HashSet<String> = (0..1000)
            .map(|_| temp_name("kvgate-settings.json"))
            .collect();
        assert_eq!(names.len(), 1000);
        assert!(names.iter().all(|n| n.starts_with(TEMP_PREFIX)));
    }
}
