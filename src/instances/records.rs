//! The instances file ([`INSTANCES_FILE`] in the save directory): one
//! record per API-created instance, written whole through a synced
//! temporary file. Read back record by record: each is checked again as if
//! it had just come in, and one that fails costs only itself.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::instances::spec::{recheck, InstanceSpec};
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

/// What the instances file holds, record by record.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    /// Records kvgate can hold, each with why it must not run now, if so
    /// (its parameters are refused by today's checks: a flag no longer
    /// allowed). Such a record is kept, shown `failed` with the reason,
    /// and never started until the operator fixes or deletes it.
    pub(crate) records: Vec<(Record, Option<String>)>,
    /// Entries that are not records at all (or whose id is reserved or
    /// repeated), with why: logged, and written back as they were, so the
    /// operator's data is never dropped by a rewrite.
    pub(crate) unusable: Vec<(Value, String)>,
}

/// The records in `dir` (none when there is no file). A file kvgate can't
/// read or parse as a JSON array is an error: starting without it would
/// forget (and at the next change overwrite) every record. A bad record
/// only costs itself (see [`Loaded`]).
pub(crate) fn read(dir: &Path) -> Result<Loaded, String> {
    let path = dir.join(INSTANCES_FILE);
    let bad = |why: String| format!("{}: {why}", path.display());
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::default()),
        Err(e) => return Err(bad(e.to_string())),
    };
    let entries: Vec<Value> = serde_json::from_slice(&bytes).map_err(|e| {
        bad(format!(
            "{e} (fix or remove the file; kvgate does not start over records it cannot read)"
        ))
    })?;
    let mut loaded = Loaded::default();
    for entry in entries {
        let record = serde_json::from_value::<Record>(entry.clone())
            .map_err(|e| format!("not an instance record: {e}"))
            .and_then(|r| {
                let taken = loaded.records.iter().map(|(r, _)| r.id.as_str());
                check_id(&r.id, taken).map(|()| r)
            });
        match record {
            Ok(r) => {
                let refused = recheck(&r.spec).err().map(|e| format!("{}: {e}", r.id));
                loaded.records.push((r, refused));
            }
            Err(why) => loaded.unusable.push((entry, why)),
        }
    }
    Ok(loaded)
}

/// A record's id must be one kvgate could have given, and not taken.
fn check_id<'a>(id: &str, mut taken: impl Iterator<Item = &'a str>) -> Result<(), String> {
    if id == MAIN_ID || id.is_empty() || taken.any(|t| t == id) {
        return Err(format!("instance id {id:?} is reserved or repeated"));
    }
    Ok(())
}

/// Writes `records`, then the `unusable` entries as they were read, whole
/// (see `store::atomic`): a synced temporary file and a rename, so the file
/// is always whole; the temporary file never stays behind.
pub(crate) fn write(dir: &Path, records: &[Record], unusable: &[Value]) -> std::io::Result<()> {
    let mut all = Vec::with_capacity(records.len() + unusable.len());
    for r in records {
        all.push(serde_json::to_value(r)?);
    }
    all.extend(unusable.iter().cloned());
    write_whole(dir, INSTANCES_FILE, &serde_json::to_vec_pretty(&all)?)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn record(id: &str, slots: u32, args: &[&str]) -> Record {
        Record {
            id: id.into(),
            spec: InstanceSpec {
                model: "/m.gguf".into(),
                slots,
                ctx: 4096,
                port: None,
                args: args.iter().map(|a| a.to_string()).collect(),
            },
            running: true,
            created: 0,
        }
    }

    #[test]
    fn each_record_read_back_is_checked_on_its_own_and_none_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let junk = json!({"id": "llama-9", "model": 7});
        write(
            dir.path(),
            &[
                record("llama-1", 2, &["-t", "2"]),
                record("main", 2, &[]),
                record("llama-2", 0, &[]),
                record("llama-3", 2, &["--tools", "all"]),
                record("llama-1", 2, &[]),
            ],
            std::slice::from_ref(&junk),
        )
        .unwrap();
        let loaded = read(dir.path()).unwrap();
        let refused: Vec<(&str, Option<&str>)> = loaded
            .records
            .iter()
            .map(|(r, why)| (r.id.as_str(), why.as_deref()))
            .collect();
        assert_eq!(refused[0], ("llama-1", None));
        assert!(refused[1].1.unwrap().contains("\"slots\""), "{refused:?}");
        assert!(refused[2].1.unwrap().contains("\"--tools\""), "{refused:?}");
        assert_eq!(refused.len(), 3);
        let unusable: Vec<&str> = loaded.unusable.iter().map(|(_, w)| w.as_str()).collect();
        assert_eq!(loaded.unusable.len(), 3, "{unusable:?}");
        assert!(unusable[0].contains("reserved"), "{unusable:?}");
        assert!(unusable[1].contains("repeated"), "{unusable:?}");
        assert!(
            unusable[2].contains("not an instance record"),
            "{unusable:?}"
        );

        // Written back: the unusable entries as they were.
        let kept: Vec<Value> = loaded.unusable.iter().map(|(v, _)| v.clone()).collect();
        let records: Vec<Record> = loaded.records.into_iter().map(|(r, _)| r).collect();
        write(dir.path(), &records, &kept).unwrap();
        let back: Vec<Value> =
            serde_json::from_slice(&std::fs::read(dir.path().join(INSTANCES_FILE)).unwrap())
                .unwrap();
        assert_eq!(back.len(), 6);
        assert_eq!(back[5], junk);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [INSTANCES_FILE], "no temporary file left");
    }

    #[test]
    fn a_file_that_is_not_a_list_of_records_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(INSTANCES_FILE), b"[{\"id\": ").unwrap();
        assert!(read(dir.path()).unwrap_err().contains(INSTANCES_FILE));
    }
}
