//! Small files kvgate keeps in the save directory (save sidecars, the live
//! settings, the instances file) are written whole: under a temporary name
//! of this process's own (which a restart cleans up), synced, renamed into
//! place, and the directory synced. A reader sees the old file or the new
//! one, never half of one; two processes never share a temporary file; and
//! a failed write leaves no temporary file behind.

use std::collections::hash_map::RandomState;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;

use crate::store::meta::TEMP_PREFIX;

/// Writes `bytes` as `dir/name`, whole and durably.
pub(crate) fn write_whole(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(whole_temp_name(name));
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join(name))?;
        // The new name is on disk too: a write that returned is durable.
        sync_dir(dir)
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// A random number drawn once per process, in every temporary name kvgate
/// makes: process ids repeat across PID namespaces (two containers sharing a
/// volume), so they can't tell two processes' files apart.
pub fn temp_token() -> u64 {
    static TOKEN: OnceLock<u64> = OnceLock::new();
    *TOKEN.get_or_init(|| {
        // `RandomState` is seeded from the OS's random source.
        let mut h = RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish()
    })
}

/// The temporary name [`write_whole`] uses for `name`: this process's own.
/// Within the process, writes of one name never overlap (sidecar names are
/// unique and made under the index lock; the settings and instances files
/// each have a lock serialising their writes).
pub(crate) fn whole_temp_name(name: &str) -> String {
    format!("{TEMP_PREFIX}{:016x}-{name}", temp_token())
}

/// Makes the directory's entries (a rename, a new file) durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_whole_under_a_name_of_this_process_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let name = whole_temp_name("f.json");
        assert!(name.starts_with(TEMP_PREFIX) && name.contains(&format!("{:016x}", temp_token())));
        write_whole(dir.path(), "f.json", b"one").unwrap();
        write_whole(dir.path(), "f.json", b"two").unwrap();
        assert_eq!(fs::read(dir.path().join("f.json")).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["f.json"]);
        // A failed write (here: the target is a directory) leaves no
        // temporary file.
        fs::create_dir(dir.path().join("d")).unwrap();
        assert!(write_whole(dir.path(), "d", b"x").is_err());
        assert!(!dir.path().join(name.replace("f.json", "d")).exists());
    }
}
