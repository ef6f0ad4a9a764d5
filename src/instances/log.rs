//! The tail of an instance's llama-server output, kept for the admin API
//! (`GET /instances/{id}/log`) and for start errors. It lives with the
//! instance, not the process, so it outlasts a crash, a stop and a failed
//! start: what llama-server said last is what the operator needs then.
//!
//! Bounded: at most [`MAX_LINES`] lines of at most [`MAX_LINE_BYTES`] bytes
//! each, whatever llama-server prints.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::sync::Unpoisoned;

/// Lines kept.
pub const MAX_LINES: usize = 200;
/// Bytes kept of one line; a longer line is cut at a character boundary
/// and ends with `…`.
pub const MAX_LINE_BYTES: usize = 1000;

/// The last lines llama-server printed (stdout and stderr, interleaved as
/// they were read).
#[derive(Debug, Default)]
pub struct LogTail {
    /// A std mutex: it is held only to push or copy lines, never across an
    /// `.await`.
    inner: Mutex<Tail>,
}

#[derive(Debug, Default)]
struct Tail {
    lines: VecDeque<String>,
    /// Lines ever pushed, so a reader can ask for those after a mark.
    total: u64,
}

/// `line` cut to at most [`MAX_LINE_BYTES`] bytes (plus the `…`).
fn bounded(line: &str) -> String {
    if line.len() <= MAX_LINE_BYTES {
        return line.to_string();
    }
    let mut cut = MAX_LINE_BYTES;
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &line[..cut])
}

// === impl LogTail ===

impl LogTail {
    /// Keeps `line`, dropping the oldest beyond [`MAX_LINES`].
    pub fn push(&self, line: &str) {
        let mut t = self.inner.lock_unpoisoned();
        if t.lines.len() == MAX_LINES {
            t.lines.pop_front();
        }
        t.lines.push_back(bounded(line));
        t.total += 1;
    }

    /// Lines pushed so far (a mark for [`LogTail::since`]).
    pub fn mark(&self) -> u64 {
        self.inner.lock_unpoisoned().total
    }

    /// The kept lines, oldest first, and how many were ever pushed.
    pub fn lines(&self) -> (Vec<String>, u64) {
        let t = self.inner.lock_unpoisoned();
        (t.lines.iter().cloned().collect(), t.total)
    }

    /// The last `n` (at most) of the lines pushed after `mark`, still kept.
    pub fn since(&self, mark: u64, n: usize) -> Vec<String> {
        let t = self.inner.lock_unpoisoned();
        let after = usize::try_from(t.total.saturating_sub(mark)).unwrap_or(usize::MAX);
        let take = after.min(n).min(t.lines.len());
        t.lines.iter().skip(t.lines.len() - take).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_each_bounded() {
        let log = LogTail::default();
        for i in 0..MAX_LINES + 5 {
            log.push(&format!("line {i}"));
        }
        let (lines, total) = log.lines();
        assert_eq!(total, (MAX_LINES + 5) as u64);
        assert_eq!(lines.len(), MAX_LINES);
        assert_eq!(lines[0], "line 5");
        assert_eq!(lines[MAX_LINES - 1], format!("line {}", MAX_LINES + 4));

        // A long line of multi-byte characters is cut on a boundary.
        log.push(&"é".repeat(MAX_LINE_BYTES));
        let (lines, _) = log.lines();
        let last = lines.last().unwrap();
        assert!(last.ends_with('…'));
        assert!(
            last.len() <= MAX_LINE_BYTES + '…'.len_utf8(),
            "{}",
            last.len()
        );
    }

    #[test]
    fn since_a_mark_gives_only_later_lines() {
        let log = LogTail::default();
        log.push("old run");
        let mark = log.mark();
        assert!(log.since(mark, 20).is_empty());
        for i in 0..30 {
            log.push(&format!("new {i}"));
        }
        let tail = log.since(mark, 20);
        assert_eq!(tail.len(), 20);
        assert_eq!(tail[0], "new 10");
        assert_eq!(
            log.since(mark, 100).len(),
            30,
            "the old run's line is left out"
        );
        assert_eq!(
            log.since(0, 100).first().map(String::as_str),
            Some("old run")
        );
    }
}
