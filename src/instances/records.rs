//! The instances file ([`INSTANCES_FILE`] in the save directory): one
//! record per API-created instance, read back only when kvgate could have
//! written it, and written whole through a synced temporary file.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::instances::spec::{parse_create, InstanceSpec};
use crate::store::atomic::write_whole;

/// Where API-created instances are recorded, inside the save directory.
pub use crate::store::reserved::INSTANCES_FILE;
/// The id of the instance `--model` starts (never recorded).
pub const MAIN_ID: &str = "main";

/// One line of [`INSTANCES_FILE`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) id: String,
    #[serde(flatten)]
    pub(crate) spec: InstanceSpec,
    /// Whether it should run (it was left running).
    pub(crate) running: bool,
    pub(crate) created: u64,
}

/// The records in `dir` (none when there is no file). A file kvgate can't
/// read, or whose records don't hold, is an error: starting without it
/// would forget (and later overwrite) the records.
pub(crate) fn read(dir: &Path) -> Result<Vec<Record>, String> {
    let path = dir.join(INSTANCES_FILE);
    let bad = |why: String| format!("{}: {why}", path.display());
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(bad(e.to_string())),
    };
    let records: Vec<Record> = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    for (i, r) in records.iter().enumerate() {
        check_record(r, &records[..i]).map_err(bad)?;
    }
    Ok(records)
}

/// A record read back must be one kvgate could have written.
fn check_record(r: &Record, before: &[Record]) -> Result<(), String> {
    if r.id == MAIN_ID || r.id.is_empty() || before.iter().any(|i| i.id == r.id) {
        return Err(format!("instance id {:?} is reserved or repeated", r.id));
    }
    let mut body = serde_json::to_value(&r.spec).map_err(|e| e.to_string())?;
    if let Some(o) = body.as_object_mut() {
        o.retain(|_, v| !v.is_null());
    }
    parse_create(&body)
        .map(drop)
        .map_err(|e| format!("{}: {e}", r.id))
}

/// Writes `records` whole (see `store::atomic`): a synced temporary file and a rename, so the
/// file is always whole; the temporary file never stays behind.
pub(crate) fn write(dir: &Path, records: &[Record]) -> std::io::Result<()> {
    write_whole(dir, INSTANCES_FILE, &serde_json::to_vec_pretty(records)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_must_be_ones_kvgate_could_write() {
        let record = |id: &str, slots: u32| Record {
            id: id.into(),
            spec: InstanceSpec {
                model: "/m.gguf".into(),
                slots,
                ctx: 4096,
                port: None,
                args: vec![],
            },
            running: true,
            created: 0,
        };
        assert!(check_record(&record("llama-1", 2), &[]).is_ok());
        assert!(check_record(&record("main", 2), &[])
            .unwrap_err()
            .contains("reserved"));
        assert!(check_record(&record("llama-1", 0), &[])
            .unwrap_err()
            .contains("\"slots\""));
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &[record("llama-1", 2)]).unwrap();
        let back: Vec<Record> =
            serde_json::from_slice(&std::fs::read(dir.path().join(INSTANCES_FILE)).unwrap())
                .unwrap();
        assert_eq!(back[0].id, "llama-1");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [INSTANCES_FILE], "no temporary file left");
    }
}
