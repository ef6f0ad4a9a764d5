//! What llama-server's RAM prompt cache (`--cache-ram`, on by default)
//! holds, as kvgate can tell from the outside. Pure; the slot table keeps
//! one per upstream.
//!
//! When a completion pinned with `id_slot` lands on a slot holding another
//! prompt (one it would keep less than half of), llama-server stashes the
//! slot's state in RAM and loads the best state it has there for the new
//! prompt (`get_available_slot`, then `prompt_save`/`prompt_load`). With
//! `--cache-idle-slots` (also on by default) it copies every idle slot to RAM
//! whenever a task starts. So a character whose slot was taken by another
//! character is usually still in llama-server's RAM: bringing it back costs
//! two copies in memory, where kvgate's own way (save to disk, restore
//! from disk) costs two file transfers on llama-server's single main loop.
//!
//! kvgate therefore remembers which characters were displaced from a slot
//! that held their live cache ([`RamCache::stash`]). When one comes back to
//! a slot that holds something else, it skips its disk restore and lets
//! llama-server load it from RAM ([`RamCache::take`]). Two cases can't use
//! RAM, and restore from disk as before: an *empty* target slot
//! (llama-server skips the RAM lookup for an explicit `id_slot` on an empty
//! slot, llama.cpp issue #28139), and anything after a restart.
//!
//! kvgate can't see the cache's size limit, nor whether it is on at all
//! (`--cache-ram 0`). The answer tells: a turn sent to RAM that comes back
//! with little of its prompt cached was a miss, and the upstream's RAM is
//! then not trusted again until it restarts ([`RamCache::missed`]). A miss
//! costs what llama-server alone would have paid on the same turn.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::identity::content::common_prefix_len;
use crate::tenant::Tenant;

/// How many displaced caches kvgate remembers per upstream; older ones are
/// likely gone from llama-server's RAM too.
pub const MAX_ENTRIES: usize = 64;

/// The least share of a new prompt a stashed cache must hold for kvgate to
/// send the turn to RAM. llama-server loads a RAM entry only when the new
/// prompt keeps at least a quarter of it; below half, a disk restore (which
/// picks the save sharing the most tokens) is the better bet.
pub const MIN_SHARE: f32 = 0.5;

/// One cache llama-server stashed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stashed {
    /// The characters whose cache it is (the slot's owner and its members).
    pub tenants: Vec<Tenant>,
    /// Messages not on disk when it left the slot: they come back with it.
    pub usage: u32,
    /// The last prompt kvgate sent to the slot, if known.
    pub prompt: Option<Arc<str>>,
}

impl Stashed {
    /// The share of `prompt` this cache holds, as far as kvgate can tell
    /// (half when it does not know what the cache held).
    pub fn share_of(&self, prompt: &str) -> f32 {
        match self.prompt.as_deref() {
            Some(p) if !prompt.is_empty() => {
                common_prefix_len(p.as_bytes(), prompt.as_bytes()) as f32 / prompt.len() as f32
            }
            _ => 0.5,
        }
    }
}

/// kvgate's picture of one llama-server's RAM prompt cache.
#[derive(Clone, Debug)]
pub struct RamCache {
    /// Whether to rely on it (kvgate's setting, until a miss).
    trusted: bool,
    /// Counts llama-server restarts: a miss judged on a turn granted before
    /// the latest one says nothing about the fresh cache.
    epoch: u64,
    /// Oldest first.
    entries: VecDeque<Stashed>,
}

impl Default for RamCache {
    fn default() -> Self {
        RamCache::new(true)
    }
}

impl RamCache {
    /// A picture of an empty cache, relied on when `trusted`.
    pub fn new(trusted: bool) -> Self {
        RamCache {
            trusted,
            epoch: 0,
            entries: VecDeque::new(),
        }
    }

    /// Whether kvgate relies on llama-server's RAM cache now.
    pub fn trusted(&self) -> bool {
        self.trusted
    }

    /// A cache left its slot: llama-server has it in RAM. It replaces any
    /// older entry of the same characters.
    pub fn stash(&mut self, entry: Stashed) {
        if !self.trusted || entry.tenants.is_empty() {
            return;
        }
        self.entries
            .retain(|e| !e.tenants.iter().any(|t| entry.tenants.contains(t)));
        self.entries.push_back(entry);
        while self.entries.len() > MAX_ENTRIES {
            self.entries.pop_front();
        }
    }

    /// Takes `t`'s cache out (llama-server moves it into the slot), if
    /// kvgate believes RAM holds it.
    pub fn take(&mut self, t: &Tenant) -> Option<Stashed> {
        if !self.trusted {
            return None;
        }
        let i = self.entries.iter().position(|e| e.tenants.contains(t))?;
        self.entries.remove(i)
    }

    /// The current restart count (see [`RamCache::missed`]).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// `t`'s stashed cache is on disk too: nothing of it is unsaved.
    pub fn mark_saved(&mut self, t: &Tenant) {
        for e in self.entries.iter_mut().filter(|e| e.tenants.contains(t)) {
            e.usage = 0;
        }
    }

    /// Forgets `t`'s entry: its cache is in a slot again by another way (a
    /// restore, a load), or llama-server never stashed it (a restore
    /// overwrote the slot); llama-server's stale copy would lose anyway.
    pub fn forget(&mut self, t: &Tenant) {
        self.entries.retain(|e| !e.tenants.contains(t));
    }

    /// `t`'s stashed cache, if kvgate believes RAM holds it.
    pub fn peek(&self, t: &Tenant) -> Option<&Stashed> {
        self.entries
            .iter()
            .find(|e| e.tenants.contains(t))
            .filter(|_| self.trusted)
    }

    /// Whether kvgate believes RAM holds `t`'s cache.
    pub fn holds(&self, t: &Tenant) -> bool {
        self.peek(t).is_some()
    }

    /// llama-server restarted: its RAM is empty.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// A turn granted in `epoch` and sent to RAM found nothing there: stop
    /// relying on it (the cache is off, too small, or cleared) until a
    /// restart ([`RamCache::restarted`]). A turn granted before the latest
    /// restart says nothing about the fresh cache.
    pub fn missed(&mut self, epoch: u64) {
        if epoch != self.epoch {
            return;
        }
        self.trusted = false;
        self.entries.clear();
    }

    /// llama-server restarted with `configured` trust: a fresh, empty
    /// cache, worth trying again.
    pub fn restarted(&mut self, configured: bool) {
        self.entries.clear();
        self.trusted = configured;
        self.epoch += 1;
    }
}

/// Whether a turn sent to RAM expecting `expect_percent` of its prompt
/// cached found it there, from the answer's `timings` (`cache_n`,
/// `prompt_n`); `None` when the answer does not say. Less than half of what
/// was expected is a miss: a disk restore would have done better.
pub fn came_back(expect_percent: u8, cache_n: Option<u64>, prompt_n: Option<u64>) -> Option<bool> {
    let (cached, evaluated) = (cache_n?, prompt_n?);
    let total = cached + evaluated;
    if total == 0 {
        return None;
    }
    Some(cached * 200 >= u64::from(expect_percent) * total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> Tenant {
        Tenant::Character {
            chat: "chat".into(),
            name: name.into(),
        }
    }

    fn stashed(names: &[&str], usage: u32) -> Stashed {
        Stashed {
            tenants: names.iter().map(|n| t(n)).collect(),
            usage,
            prompt: None,
        }
    }

    #[test]
    fn a_stashed_cache_is_taken_once() {
        let mut ram = RamCache::default();
        ram.stash(stashed(&["Alice"], 2));
        assert!(ram.holds(&t("Alice")));
        let e = ram.take(&t("Alice")).expect("in RAM");
        assert_eq!(e.usage, 2);
        assert!(
            ram.take(&t("Alice")).is_none(),
            "llama-server moved it into the slot"
        );
    }

    #[test]
    fn a_newer_stash_replaces_the_characters_older_one() {
        let mut ram = RamCache::default();
        ram.stash(stashed(&["Alice", "Bob"], 1));
        ram.stash(stashed(&["Bob"], 3));
        assert!(!ram.holds(&t("Alice")), "the older entry went with Bob's");
        assert_eq!(ram.take(&t("Bob")).map(|e| e.usage), Some(3));
    }

    #[test]
    fn a_miss_stops_trust_until_a_restart() {
        let mut ram = RamCache::default();
        ram.stash(stashed(&["Alice"], 0));
        ram.missed(ram.epoch());
        assert!(!ram.trusted());
        assert!(ram.take(&t("Alice")).is_none());
        ram.stash(stashed(&["Bob"], 0));
        assert!(
            !ram.holds(&t("Bob")),
            "nothing is remembered while untrusted"
        );
        ram.restarted(true);
        assert!(ram.trusted());
        ram.stash(stashed(&["Bob"], 0));
        assert!(ram.holds(&t("Bob")));
    }

    #[test]
    fn a_miss_from_before_a_restart_does_not_count() {
        let mut ram = RamCache::default();
        let before = ram.epoch();
        ram.restarted(true);
        ram.missed(before);
        assert!(ram.trusted());
    }

    #[test]
    fn a_saved_stash_has_nothing_unsaved() {
        let mut ram = RamCache::default();
        ram.stash(stashed(&["Alice"], 3));
        ram.mark_saved(&t("Alice"));
        assert_eq!(ram.take(&t("Alice")).map(|e| e.usage), Some(0));
    }

    #[test]
    fn off_by_setting_it_remembers_nothing() {
        let mut ram = RamCache::new(false);
        ram.stash(stashed(&["Alice"], 0));
        assert!(ram.take(&t("Alice")).is_none());
        ram.restarted(false);
        assert!(!ram.trusted());
    }

    #[test]
    fn old_entries_fall_out() {
        let mut ram = RamCache::default();
        for i in 0..=MAX_ENTRIES {
            ram.stash(stashed(&[&format!("c{i}")], 0));
        }
        assert!(!ram.holds(&t("c0")));
        assert!(ram.holds(&t(&format!("c{MAX_ENTRIES}"))));
    }

    #[test]
    fn a_turn_with_little_cached_was_a_miss() {
        assert_eq!(came_back(90, Some(950), Some(50)), Some(true));
        assert_eq!(came_back(90, Some(450), Some(550)), Some(true));
        assert_eq!(came_back(90, Some(100), Some(900)), Some(false));
        assert_eq!(came_back(50, Some(0), Some(10)), Some(false));
        assert_eq!(came_back(90, None, Some(10)), None);
        assert_eq!(came_back(90, Some(0), Some(0)), None);
    }

    #[test]
    fn forget_drops_an_entry() {
        let mut ram = RamCache::default();
        ram.stash(stashed(&["Alice"], 0));
        ram.forget(&t("Alice"));
        assert!(!ram.holds(&t("Alice")));
    }
}
