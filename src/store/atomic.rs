//! Small files kvgate keeps in the save directory (save sidecars, the live
//! settings, the instances file) are written whole: under a temporary name
//! (which a restart cleans up), synced, then renamed into place. A reader
//! sees the old file or the new one, never half of one, and a failed write
//! leaves no temporary file behind.

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::store::meta::TEMP_PREFIX;

/// Writes `bytes` as `dir/name`, whole.
pub(crate) fn write_whole(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{TEMP_PREFIX}{name}"));
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join(name))
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}
