//! One kvgate per save directory: kvgate holds an exclusive advisory lock
//! (`flock`) on [`LOCK_FILE`] in the directory for as long as it runs. A
//! second kvgate on the same directory would delete the first one's
//! in-flight temporary files at its start, and its rescans could remove the
//! first one's fresh sidecars; it is refused instead, naming the owner.
//!
//! The lock belongs to the process: openers of the same directory within
//! one process (tests, an embedder) share it, and it is released when the
//! last of them is dropped, or when the process dies (the kernel drops it,
//! so a crash never leaves the directory locked). The file itself stays:
//! removing it would let a newcomer lock a fresh file while the owner still
//! holds the unlinked one.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use rustix::fs::{flock, FlockOperation};

use crate::sync::Unpoisoned;

/// The lock file in the save directory (holds the owner's process id).
pub const LOCK_FILE: &str = ".kvgate.lock";

/// The directories this process holds, by canonical path.
static HELD: Mutex<Vec<(PathBuf, Weak<Held>)>> = Mutex::new(Vec::new());

/// The open, locked file; closing it releases the lock.
#[derive(Debug)]
struct Held {
    _file: File,
}

/// This process's hold on a save directory.
#[derive(Debug, Clone)]
pub struct DirLock {
    _held: Arc<Held>,
}

impl DirLock {
    /// Takes the directory's lock, or shares this process's hold on it.
    /// Refused when another process holds it: the error names the directory
    /// and, when the owner recorded it, its process id.
    pub fn acquire(dir: &Path) -> Result<DirLock, String> {
        let key = dir.canonicalize().map_err(|e| e.to_string())?;
        let mut held = HELD.lock_unpoisoned();
        held.retain(|(_, h)| h.strong_count() > 0);
        if let Some(h) = held
            .iter()
            .find(|(p, _)| *p == key)
            .and_then(|(_, h)| h.upgrade())
        {
            return Ok(DirLock { _held: h });
        }
        let path = key.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("cannot open its lock file {}: {e}", path.display()))?;
        lock_exclusive(&mut file, &path)?;
        // Who holds it, for the message a second kvgate prints. The lock is
        // what counts; the id is only informative.
        let _ = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        let h = Arc::new(Held { _file: file });
        held.push((key, Arc::downgrade(&h)));
        Ok(DirLock { _held: h })
    }
}

/// Takes the lock. When the file names this very process, an earlier hold
/// of ours is being let go: a child this process forked (any thread may
/// start llama-server) keeps a copy of the released descriptor until it
/// execs, and the lock with it, for a moment. That is waited out (2 s at
/// most); another process's hold is refused at once.
fn lock_exclusive(file: &mut File, path: &Path) -> Result<(), String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match flock(&*file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(()),
            Err(e) if e != rustix::io::Errno::WOULDBLOCK => {
                return Err(format!("cannot lock {}: {e}", path.display()));
            }
            Err(_)
                if owner(file) == Some(std::process::id())
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(_) => return Err(in_use(file, path)),
        }
    }
}

/// The process id the lock file names.
fn owner(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

fn in_use(file: &mut File, path: &Path) -> String {
    let owner = match owner(file) {
        Some(pid) => format!("another kvgate (process {pid})"),
        None => "another kvgate".to_string(),
    };
    format!(
        "is in use by {owner}, which holds {}: one kvgate per save directory; \
         give each its own --save-dir",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_of_ours_still_let_go_is_waited_out() {
        // As a forked child keeps a released descriptor until it execs: a
        // second description of the file, locked, naming this process.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOCK_FILE);
        let stale = File::create(&path).unwrap();
        flock(&stale, FlockOperation::NonBlockingLockExclusive).unwrap();
        std::fs::write(&path, format!("{}\n", std::process::id())).unwrap();
        let letting_go = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(stale);
        });
        let lock = DirLock::acquire(dir.path());
        letting_go.join().unwrap();
        assert!(lock.is_ok(), "{lock:?}");
    }

    #[test]
    fn one_process_shares_its_hold_and_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = DirLock::acquire(dir.path()).unwrap();
        let b = DirLock::acquire(dir.path()).unwrap();
        let pid = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        // Another open file description stands for another process.
        let other = File::open(dir.path().join(LOCK_FILE)).unwrap();
        assert_eq!(
            flock(&other, FlockOperation::NonBlockingLockExclusive),
            Err(rustix::io::Errno::WOULDBLOCK)
        );
        drop(a);
        assert!(flock(&other, FlockOperation::NonBlockingLockExclusive).is_err());
        drop(b);
        // The last hold gone, the lock is free.
        flock(&other, FlockOperation::NonBlockingLockExclusive).unwrap();
        let mut other = other;
        assert!(in_use(&mut other, Path::new("/d/.kvgate.lock")).contains(&pid.trim().to_string()));
        assert!(DirLock::acquire(dir.path())
            .unwrap_err()
            .contains("another kvgate"));
    }
}
