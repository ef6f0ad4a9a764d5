//! Unit and property tests of the slot table's rules.

use super::*;

fn ch(name: &str) -> Tenant {
    Tenant::Character {
        chat: "c".into(),
        name: name.into(),
    }
}

fn want(name: &str) -> Want {
    Want::Tenant(ch(name))
}

/// Enqueues and expects an immediate grant.
fn take(t: &mut SlotTable, w: Want) -> Grant {
    let (ticket, grants) = t.enqueue(w).expect("enqueue");
    grants
        .into_iter()
        .find(|(k, _)| *k == ticket)
        .map(|(_, g)| g)
        .expect("granted at once")
}

/// [`take`] for a request of client `by`.
fn take_by(t: &mut SlotTable, w: Want, by: &Option<ClientTag>) -> Grant {
    let (ticket, grants) = t.enqueue_by(w, by.clone()).expect("enqueue");
    grants
        .into_iter()
        .find(|(k, _)| *k == ticket)
        .map(|(_, g)| g)
        .expect("granted at once")
}

fn finish(t: &mut SlotTable, g: &Grant, kind: Kind) -> Vec<(Ticket, Grant)> {
    t.release(g.slot, g.lease, Outcome::Generated(kind))
}

#[test]
fn lowest_free_slot_then_resident() {
    let mut t = SlotTable::new(3, 8);
    let a = take(&mut t, want("A"));
    assert_eq!(a.slot, 0);
    assert!(!a.resident);
    finish(&mut t, &a, Kind::Normal);
    let b = take(&mut t, want("B"));
    assert_eq!(b.slot, 1);
    finish(&mut t, &b, Kind::Normal);
    let a2 = take(&mut t, want("A"));
    assert_eq!(a2.slot, 0);
    assert!(a2.resident);
    assert_eq!(a2.evicted, None);
}

#[test]
fn restored_from_lasts_as_long_as_the_restored_cache() {
    let mut t = SlotTable::new(1, 8);
    let from = |t: &SlotTable| t.slots()[0].restored_from.clone();
    let a = take(&mut t, want("A"));
    t.mark_restored(0, "a.bin");
    finish(&mut t, &a, Kind::Normal);
    assert_eq!(from(&t).as_deref(), Some("a.bin"), "generations extend it");
    let a = take(&mut t, want("A"));
    t.release(a.slot, a.lease, Outcome::Failed);
    assert_eq!(from(&t), None, "a failed generation");
    let a = take(&mut t, want("A"));
    t.mark_restored(0, "a.bin");
    t.release(a.slot, a.lease, Outcome::Cleared);
    assert_eq!(from(&t), None, "cleared (chat switch, erase)");
    let a = take(&mut t, want("A"));
    t.mark_restored(0, "a.bin");
    finish(&mut t, &a, Kind::Normal);
    let b = take(&mut t, want("B"));
    assert_eq!(from(&t), None, "another character took the slot");
    t.mark_restored(0, "b.bin");
    finish(&mut t, &b, Kind::Normal);
    t.invalidate_all();
    assert_eq!(from(&t), None, "llama-server restarted");
    let b = take(&mut t, want("B"));
    t.mark_restored(0, "b.bin");
    t.mark_empty(0);
    assert_eq!(from(&t), None, "a failed restore");
    finish(&mut t, &b, Kind::Normal);
}

#[test]
fn evicts_least_usage_then_lru() {
    let mut t = SlotTable::new(2, 8);
    let a = take(&mut t, want("A"));
    finish(&mut t, &a, Kind::Normal);
    let a = take(&mut t, want("A"));
    finish(&mut t, &a, Kind::Normal); // A usage 2
    let b = take(&mut t, want("B"));
    finish(&mut t, &b, Kind::Normal); // B usage 1
    let c = take(&mut t, want("C"));
    assert_eq!(c.slot, 1, "B has the smallest usage");
    assert_eq!(
        c.evicted,
        Some(Evicted {
            tenant: ch("B"),
            usage: 1,
            live: true
        })
    );
    finish(&mut t, &c, Kind::Normal); // C usage 1, A usage 2
    t.mark_saved(0); // A usage 0
    let d = take(&mut t, want("D"));
    assert_eq!(d.slot, 0);
    finish(&mut t, &d, Kind::Impersonate); // D usage 0
    t.mark_saved(1); // C usage 0 too: tie, D used more recently
    let e = take(&mut t, want("E"));
    assert_eq!(e.slot, 1, "tie on usage goes to the least recently used");
}

#[test]
fn busy_slots_are_never_evicted_and_waiters_are_fifo() {
    let mut t = SlotTable::new(2, 8);
    let a = take(&mut t, want("A"));
    let b = take(&mut t, want("B"));
    let (tc, g) = t.enqueue(want("C")).unwrap();
    assert!(g.is_empty(), "both slots busy: C waits");
    let (td, g) = t.enqueue(want("D")).unwrap();
    assert!(g.is_empty());
    let (ta2, g) = t.enqueue(want("A")).unwrap();
    assert!(g.is_empty(), "A's own slot is busy: A waits behind it");
    // B finishes: C (first in line) takes slot 1, D still waits.
    let grants = finish(&mut t, &b, Kind::Normal);
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].0, tc);
    assert_eq!(grants[0].1.slot, 1);
    // A finishes: A's waiter gets its slot back before D may evict it.
    let grants = finish(&mut t, &a, Kind::Normal);
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].0, ta2);
    assert!(grants[0].1.resident);
    assert_eq!(t.queued(), 1);
    assert!(!t.cancel(tc), "granted tickets are no longer queued");
    assert!(t.cancel(td));
}

#[test]
fn queue_bound_refuses_extra_waiters() {
    let mut t = SlotTable::new(1, 1);
    let _a = take(&mut t, want("A"));
    assert!(t.enqueue(want("B")).unwrap().1.is_empty());
    assert_eq!(
        t.enqueue(want("C")),
        Err(TableError::QueueFull {
            slots: 1,
            queued: 1
        })
    );
    assert_eq!(t.queued(), 1);
}

#[test]
fn one_client_cannot_fill_the_queue_for_everyone() {
    let mut t = SlotTable::new(2, 4);
    t.set_client_bound(2);
    let greedy = Some(ClientTag::from("client-greedy"));
    let by = |t: &mut SlotTable, w: Want, c: &Option<ClientTag>| t.enqueue_by(w, c.clone());
    // Two generations hold both slots, two more wait: the greedy
    // client's share.
    for name in ["A", "B", "C", "D"] {
        by(&mut t, want(name), &greedy).unwrap();
    }
    assert_eq!(
        by(&mut t, want("E"), &greedy).unwrap_err(),
        TableError::ClientQueueFull { queued: 2 }
    );
    // Another client still gets in line, and so does kvgate's own work.
    let other = Some(ClientTag::from("client-other"));
    by(&mut t, want("F"), &other).unwrap();
    t.enqueue(want("G")).unwrap();
    assert_eq!(t.queued(), 4);
}

#[test]
fn a_freed_slot_goes_to_the_client_holding_fewest() {
    let mut t = SlotTable::new(2, 8);
    let greedy = Some(ClientTag::from("client-greedy"));
    let other = Some(ClientTag::from("client-other"));
    let a = take_by(&mut t, want("A"), &greedy);
    t.enqueue_by(want("B"), greedy.clone()).unwrap();
    // The greedy client queues first, the other client after it.
    let (greedy_next, _) = t.enqueue_by(want("C"), greedy.clone()).unwrap();
    let (other_next, _) = t.enqueue_by(want("D"), other.clone()).unwrap();
    let grants = finish(&mut t, &a, Kind::Normal);
    assert_eq!(grants.len(), 1);
    assert_eq!(
        grants[0].0, other_next,
        "the client with no slot goes before the one holding one"
    );
    assert!(t.is_queued(greedy_next));
    // The table remembers whose work each slot shows, once it is done.
    let d = grants[0].1.clone();
    let me = other.clone().unwrap();
    assert!(!t.shown_to(d.slot, &me), "not before the generation ends");
    assert!(t.cancel(greedy_next));
    finish(&mut t, &d, Kind::Normal);
    assert!(t.shown_to(d.slot, &me));
    let greedy_tag = greedy.clone().unwrap();
    assert!(!t.shown_to(d.slot, &greedy_tag));
    // Another client's lease hides it again; an erase forgets it.
    let p = take_by(&mut t, Want::Pinned(d.slot), &greedy);
    assert!(!t.shown_to(d.slot, &me), "someone else works in it");
    t.release(p.slot, p.lease, Outcome::Cleared);
    assert!(!t.shown_to(d.slot, &me), "erased: nobody's");
}

#[test]
fn a_clients_queued_residents_step_back_for_an_older_newcomer() {
    let mut t = SlotTable::new(1, 8);
    let greedy = Some(ClientTag::from("client-greedy"));
    let other = Some(ClientTag::from("client-other"));
    let a = take_by(&mut t, want("A"), &greedy);
    // The other client's newcomer waits first, then the greedy client's
    // next turn for its resident character.
    let (newcomer, _) = t.enqueue_by(want("B"), other.clone()).unwrap();
    let (again, _) = t.enqueue_by(want("A"), greedy.clone()).unwrap();
    let grants = finish(&mut t, &a, Kind::Normal);
    assert_eq!(grants.len(), 1);
    assert_eq!(
        grants[0].0, newcomer,
        "the slot is not kept by the resident"
    );
    assert!(t.is_queued(again));
    // Without known clients the resident goes first, as always.
    let mut t = SlotTable::new(1, 8);
    let a = take(&mut t, want("A"));
    t.enqueue(want("B")).unwrap();
    let (again, _) = t.enqueue(want("A")).unwrap();
    let grants = finish(&mut t, &a, Kind::Normal);
    assert_eq!(grants[0].0, again);
}

#[test]
fn usage_rules_per_kind() {
    assert_eq!(next_usage(0, Kind::Normal), 1);
    assert_eq!(next_usage(3, Kind::Normal), 4);
    for k in [Kind::Regenerate, Kind::Swipe, Kind::Continue, Kind::Quiet] {
        assert_eq!(next_usage(0, k), 1, "{k:?} counts when 0");
        assert_eq!(next_usage(2, k), 2, "{k:?} does not count otherwise");
    }
    assert_eq!(next_usage(0, Kind::Impersonate), 0);
    assert_eq!(next_usage(5, Kind::Impersonate), 5);
}

#[test]
fn anonymous_never_counts() {
    let mut t = SlotTable::new(1, 4);
    let g = take(&mut t, Want::Tenant(Tenant::Anonymous { key: "x".into() }));
    finish(&mut t, &g, Kind::Normal);
    assert_eq!(t.slots()[0].usage, 0);
}

#[test]
fn pinned_waits_for_busy_slot_and_clears_owner() {
    let mut t = SlotTable::new(2, 4);
    let a = take(&mut t, want("A"));
    let (tp, g) = t.enqueue(Want::Pinned(0)).unwrap();
    assert!(g.is_empty(), "pinned request waits for the busy slot");
    let grants = finish(&mut t, &a, Kind::Normal);
    assert_eq!(grants[0].0, tp);
    let p = &grants[0].1;
    assert_eq!(
        p.evicted.as_ref().map(|e| (e.tenant.clone(), e.usage)),
        Some((ch("A"), 1)),
        "the owner's unsaved message is reported"
    );
    t.release(p.slot, p.lease, Outcome::Cleared);
    assert_eq!(t.slots()[0].owner, None);
    let a2 = take(&mut t, want("A"));
    assert!(!a2.resident, "A lost its cache to the pinned request");
    assert_eq!(a2.slot, 0, "lowest free slot");
    assert_eq!(t.enqueue(Want::Pinned(7)), Err(TableError::NoSuchSlot(7)));
}

#[test]
fn hold_keeps_the_owner_and_serialises() {
    let mut t = SlotTable::new(1, 4);
    let a = take(&mut t, want("A"));
    let (th, g) = t.enqueue(Want::Hold(0)).unwrap();
    assert!(g.is_empty(), "waits for A's generation");
    let grants = finish(&mut t, &a, Kind::Normal);
    assert_eq!(grants[0].0, th);
    let h = &grants[0].1;
    assert_eq!(h.evicted, None);
    assert!(h.resident);
    t.mark_saved(0);
    t.release(h.slot, h.lease, Outcome::Untouched);
    assert_eq!(t.slots()[0].owner, Some(ch("A")));
    assert_eq!(t.slots()[0].usage, 0);
    let a2 = take(&mut t, want("A"));
    assert!(a2.resident);
}

#[test]
fn a_newcomer_waits_for_a_slot_being_saved_rather_than_evict_a_dirty_one() {
    let mut t = SlotTable::new(2, 4);
    let a = take(&mut t, want("A"));
    finish(&mut t, &a, Kind::Normal); // A dirty (usage 1)
    let b = take(&mut t, want("B"));
    finish(&mut t, &b, Kind::Normal); // B dirty
                                      // A save of B is under way (save-behind): C must not evict dirty A.
    let hold = take(&mut t, Want::Hold(1));
    let (tc, g) = t.enqueue(want("C")).unwrap();
    assert!(g.is_empty(), "C waits for B's save");
    t.mark_saved(1);
    let grants = t.release(hold.slot, hold.lease, Outcome::Untouched);
    assert_eq!(grants[0].0, tc);
    assert_eq!(grants[0].1.slot, 1, "C takes the slot that was just saved");
    assert_eq!(
        grants[0].1.evicted.as_ref().map(|e| e.usage),
        Some(0),
        "no save needed"
    );
    assert_eq!(t.slots()[0].owner, Some(ch("A")), "A stays resident");
    // Without a save under way, a dirty slot is evicted as usual.
    let mut t = SlotTable::new(1, 4);
    let a = take(&mut t, want("A"));
    finish(&mut t, &a, Kind::Normal);
    assert_eq!(take(&mut t, want("C")).evicted.map(|e| e.usage), Some(1));
}

#[test]
fn stale_release_changes_nothing() {
    let mut t = SlotTable::new(1, 4);
    let a = take(&mut t, want("A"));
    t.release(a.slot, a.lease + 100, Outcome::Cleared);
    assert_eq!(t.slots()[0].lease, Some(a.lease));
    finish(&mut t, &a, Kind::Normal);
    finish(&mut t, &a, Kind::Normal);
    assert_eq!(t.slots()[0].usage, 1, "double release is ignored");
}

#[test]
fn failure_and_restart_mark_unknown() {
    let mut t = SlotTable::new(2, 4);
    let a = take(&mut t, want("A"));
    t.release(a.slot, a.lease, Outcome::Failed);
    let a = take(&mut t, want("A"));
    assert!(!a.resident, "contents unknown after a failure");
    finish(&mut t, &a, Kind::Normal);
    t.invalidate_all();
    assert_eq!(t.slots()[0].usage, 0);
    let a = take(&mut t, want("A"));
    assert_eq!(a.slot, 0, "affinity survives a restart");
    assert!(!a.resident);
}

#[test]
fn reconcile_marks_only_untouched_live_slots_lost() {
    let mut t = SlotTable::new(3, 4);
    for n in ["A", "B", "C"] {
        let g = take(&mut t, want(n));
        finish(&mut t, &g, Kind::Normal);
    }
    let ticks: Vec<u64> = t.slots().iter().map(|s| s.last_used).collect();
    // B is used again after the poll was sent: its emptiness is stale.
    let b = take(&mut t, want("B"));
    finish(&mut t, &b, Kind::Normal);
    let lost = t.reconcile(&[true, true, false], &ticks);
    assert_eq!(lost, vec![0]);
    assert!(!t.slots()[0].live);
    assert_eq!(t.slots()[0].usage, 0);
    assert!(t.slots()[1].live && t.slots()[2].live);
}

#[test]
fn same_new_tenant_twice_shares_one_slot() {
    let mut t = SlotTable::new(2, 4);
    let (t1, g1) = t.enqueue(want("A")).unwrap();
    let (t2, g2) = t.enqueue(want("A")).unwrap();
    assert_eq!(g1.len(), 1);
    assert_eq!(g1[0].0, t1);
    assert!(g2.is_empty(), "second A waits behind the first");
    let grants = finish(&mut t, &g1[0].1, Kind::Normal);
    assert_eq!(grants[0].0, t2);
    assert_eq!(grants[0].1.slot, 0);
    assert!(grants[0].1.resident);
}

#[test]
fn resize_keeps_owners_and_serves_waiters() {
    let mut t = SlotTable::new(0, 4);
    assert_eq!(t.enqueue(want("A")), Err(TableError::NoSlots));
    let grants = t.resize(2);
    assert!(grants.is_empty());
    let a = take(&mut t, want("A"));
    let _b = take(&mut t, want("B"));
    let (tc, g) = t.enqueue(want("C")).unwrap();
    assert!(g.is_empty());
    let grants = t.resize(3);
    assert_eq!(grants[0].0, tc);
    assert_eq!(grants[0].1.slot, 2);
    assert_eq!(t.slots()[a.slot].owner, Some(ch("A")));
}

mod by_prompt {
    //! Requests no character owns, placed as llama-server places them.
    use super::*;

    fn anon(key: &str, text: &str) -> Want {
        Want::Prompt {
            tenant: Tenant::Anonymous { key: key.into() },
            text: Arc::from(text),
        }
    }

    const SYSTEM: &str = "You are a helpful assistant. Answer briefly and kindly.";

    #[test]
    fn a_prompt_goes_where_its_prefix_is() {
        let mut t = SlotTable::new(3, 8);
        let a = take(&mut t, anon("a", &format!("{SYSTEM} Q: one")));
        let b = take(&mut t, anon("b", "something else entirely, at length"));
        finish(&mut t, &a, Kind::Quiet);
        finish(&mut t, &b, Kind::Quiet);
        assert_eq!((a.slot, b.slot), (0, 1));
        // Another key (its start differs past a short common part) but
        // most of its text is slot 0's: llama-server would take slot 0.
        let c = take(&mut t, anon("c", &format!("{SYSTEM} Q: two")));
        assert_eq!(c.slot, 0);
        assert!(c.resident, "the shared prefix is reused");
        assert_eq!(c.evicted, None, "no character was there");
        assert_eq!(
            t.slots()[0].usage,
            0,
            "requests no character owns never count"
        );
    }

    #[test]
    fn it_never_waits_behind_its_own_busy_slot() {
        let mut t = SlotTable::new(2, 8);
        let a = take(&mut t, anon("a", SYSTEM));
        finish(&mut t, &a, Kind::Quiet);
        let a1 = take(&mut t, anon("a", SYSTEM));
        let a2 = take(&mut t, anon("a", SYSTEM));
        assert_eq!(a1.slot, 0);
        assert_eq!(
            a2.slot, 1,
            "the same prompt again runs beside it, as llama-server would"
        );
        let (_, g) = t.enqueue(anon("a", SYSTEM)).unwrap();
        assert!(g.is_empty(), "all slots busy: it waits");
        let grants = finish(&mut t, &a1, Kind::Quiet);
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].1.slot, 0);
    }

    #[test]
    fn characters_are_kept_while_an_unnamed_slot_is_idle() {
        let mut t = SlotTable::new(3, 8);
        let x = take(&mut t, want("X"));
        let a = take(&mut t, anon("a", "first anonymous prompt"));
        let b = take(&mut t, anon("b", "second anonymous prompt, unrelated"));
        for g in [&x, &a, &b] {
            finish(&mut t, g, Kind::Normal);
        }
        let a = take(&mut t, anon("a", "first anonymous prompt"));
        finish(&mut t, &a, Kind::Quiet);
        // Shares nothing: the least recently used unnamed slot (b's),
        // not X's, although X is older.
        let c = take(&mut t, anon("c", "zzz"));
        assert_eq!(c.slot, b.slot);
        assert_eq!(c.evicted, None);
        assert!(!c.resident);
        assert_eq!(t.slots()[x.slot].owner, Some(ch("X")));
        // With every unnamed slot busy, a character's slot is taken
        // (and reported, so its unsaved messages are saved first).
        let a = take(&mut t, anon("a", "first anonymous prompt"));
        assert!(a.resident);
        let d = take(&mut t, anon("d", "qqq"));
        assert_eq!(d.slot, x.slot);
        assert_eq!(d.evicted.as_ref().map(|e| e.tenant.clone()), Some(ch("X")));
        // And a character goes back to its own slot's rules meanwhile.
        finish(&mut t, &d, Kind::Quiet);
        assert_eq!(t.resident(&ch("X")), None);
    }

    #[test]
    fn a_small_share_is_not_enough() {
        let mut t = SlotTable::new(2, 8);
        let a = take(&mut t, anon("a", "0123456789"));
        finish(&mut t, &a, Kind::Quiet);
        // 1 byte of 10 in common is a share of 0.1, not more than it:
        // the free slot, as llama-server's LRU would pick.
        let b = take(&mut t, anon("b", "0abcdefghi"));
        assert_eq!(b.slot, 1);
        finish(&mut t, &b, Kind::Quiet);
        let c = take(&mut t, anon("c", "01xxxxxxxx"));
        assert_eq!(c.slot, 0, "2 of 10 is past the threshold");
        assert!(c.resident);
    }

    #[test]
    fn a_failure_forgets_the_prompt() {
        let mut t = SlotTable::new(2, 8);
        let a = take(&mut t, anon("a", SYSTEM));
        t.release(a.slot, a.lease, Outcome::Failed);
        assert_eq!(t.slots()[0].prompt, None);
        let b = take(&mut t, anon("a", SYSTEM));
        assert!(!b.resident);
    }
}

mod shared_prefix {
    //! Characters whose prompts extend each other share one slot.
    use super::*;

    fn said(name: &str, text: &str) -> Want {
        Want::Prompt {
            tenant: ch(name),
            text: Arc::from(text),
        }
    }

    const STORY: &str = "A fictional chat between Anna, Ben, Cleo and User. Anna's card. Ben's card. Cleo's card.\n***\n";

    fn turn(history: &str, name: &str) -> String {
        format!("{STORY}{history}{name}:")
    }

    #[test]
    fn speakers_of_one_history_share_a_slot() {
        let mut t = SlotTable::new(2, 8);
        let mut history = String::from("User: hello all\n");
        let mut slots = Vec::new();
        for name in ["Anna", "Ben", "Cleo", "Anna", "Ben"] {
            let g = take(&mut t, said(name, &turn(&history, name)));
            assert_eq!(g.evicted, None, "{name}: nothing is evicted");
            slots.push(g.slot);
            finish(&mut t, &g, Kind::Normal);
            history.push_str(&format!("{name}: a reply of {name}'s\n"));
        }
        assert_eq!(slots, vec![0; 5], "one slot serves the whole chat");
        let s = &t.slots()[0];
        assert_eq!(s.owner, Some(ch("Ben")));
        assert_eq!(s.members.len(), 2, "{:?}", s.members);
        assert_eq!(t.resident(&ch("Anna")), Some(0));
        assert_eq!(t.resident(&ch("Cleo")), Some(0));
        assert_eq!(s.usage, 5, "the slot's unsaved messages");
        assert_eq!(t.slots()[1].owner, None, "the other slot stays free");
    }

    #[test]
    fn a_move_is_resident_and_a_member_comes_back_resident() {
        let mut t = SlotTable::new(2, 8);
        let a = take(&mut t, said("Anna", &turn("User: hi\n", "Anna")));
        finish(&mut t, &a, Kind::Normal);
        let b = take(&mut t, said("Ben", &turn("User: hi\nAnna: hey\n", "Ben")));
        assert_eq!(b.slot, 0);
        assert!(b.resident, "Anna's cache holds Ben's prompt but its tail");
        finish(&mut t, &b, Kind::Normal);
        let a = take(
            &mut t,
            said("Anna", &turn("User: hi\nAnna: hey\nBen: yo\n", "Anna")),
        );
        assert_eq!((a.slot, a.resident, a.evicted.clone()), (0, true, None));
        assert_eq!(t.slots()[0].owner, Some(ch("Anna")));
        assert_eq!(t.slots()[0].members, vec![ch("Ben")]);
    }

    #[test]
    fn own_cards_first_keep_their_own_slots() {
        let mut t = SlotTable::new(2, 8);
        let a = take(
            &mut t,
            said(
                "Anna",
                "Write Anna's next reply. Anna's card.\n***\nUser: hi\nAnna:",
            ),
        );
        finish(&mut t, &a, Kind::Normal);
        let b = take(
            &mut t,
            said(
                "Ben",
                "Write Ben's next reply. Ben's card.\n***\nUser: hi\nAnna: hey\nBen:",
            ),
        );
        assert_eq!(b.slot, 1, "swap mode: no shared prefix");
        assert!(t.slots()[0].members.is_empty());
    }

    #[test]
    fn another_chat_is_never_extended() {
        let mut t = SlotTable::new(2, 8);
        let a = take(&mut t, said("Anna", &turn("User: hi\n", "Anna")));
        finish(&mut t, &a, Kind::Normal);
        let other = Tenant::Character {
            chat: "other".into(),
            name: "Ben".into(),
        };
        let text: Arc<str> = Arc::from(turn("User: hi\nAnna: hey\n", "Ben"));
        let b = take(
            &mut t,
            Want::Prompt {
                tenant: other,
                text,
            },
        );
        assert_eq!(b.slot, 1);
    }

    #[test]
    fn an_extended_slot_keeps_its_unsaved_messages() {
        let mut t = SlotTable::new(3, 8);
        for _ in 0..2 {
            let b = take(&mut t, said("Ben", &turn("User: hi\n", "Ben")));
            finish(&mut t, &b, Kind::Normal);
        }
        assert_eq!(t.slots()[0].usage, 2);
        let a = take(
            &mut t,
            said("Anna", &turn("User: hi\nBen: x\nUser: more\n", "Anna")),
        );
        assert_eq!(
            (a.slot, a.evicted.clone()),
            (0, None),
            "Anna extends Ben's slot"
        );
        finish(&mut t, &a, Kind::Normal);
        assert_eq!(t.resident(&ch("Ben")), Some(0));
        assert_eq!(t.slots()[0].usage, 3, "nothing unsaved is forgotten");
    }

    #[test]
    fn a_character_whose_slot_is_busy_waits_for_it() {
        let mut t = SlotTable::new(2, 8);
        let a = take(&mut t, said("Anna", &turn("User: hi\n", "Anna")));
        finish(&mut t, &a, Kind::Normal);
        let b = take(&mut t, Want::Tenant(ch("Ben")));
        assert_eq!(b.slot, 1);
        // Ben's slot is busy; his prompt extends Anna's idle slot, but
        // his requests are serialised: he waits for his own.
        let (ticket, g) = t
            .enqueue(said("Ben", &turn("User: hi\nAnna: hey\n", "Ben")))
            .unwrap();
        assert!(g.is_empty(), "{g:?}");
        let grants = t.release(b.slot, b.lease, Outcome::Generated(Kind::Normal));
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].0, ticket);
        assert_eq!(grants[0].1.slot, 0, "then the better slot");
    }

    #[test]
    fn a_load_for_a_member_evicts_the_owner_and_a_restore_forgets_the_members() {
        let mut t = SlotTable::new(1, 8);
        let a = take(&mut t, said("Anna", &turn("User: hi\n", "Anna")));
        finish(&mut t, &a, Kind::Normal);
        let b = take(&mut t, said("Ben", &turn("User: hi\nAnna: hey\n", "Ben")));
        finish(&mut t, &b, Kind::Normal);
        // An admin load (or a preload) for Anna, a member: Ben's cache
        // (hers inside) is replaced, so Ben is evicted and saved first.
        let load = take(&mut t, Want::Tenant(ch("Anna")));
        assert_eq!(
            load.evicted.as_ref().map(|e| (e.tenant.clone(), e.usage)),
            Some((ch("Ben"), 2))
        );
        t.mark_restored(0, "anna.bin");
        let s = &t.slots()[0];
        assert!(s.members.is_empty() && s.prompt.is_none(), "{s:?}");
        assert_eq!(t.resident(&ch("Ben")), None);
    }

    #[test]
    fn an_eviction_takes_the_members_with_the_cache() {
        let mut t = SlotTable::new(1, 8);
        let a = take(&mut t, said("Anna", &turn("User: hi\n", "Anna")));
        finish(&mut t, &a, Kind::Normal);
        let b = take(&mut t, said("Ben", &turn("User: hi\nAnna: hey\n", "Ben")));
        finish(&mut t, &b, Kind::Normal);
        let x = take(
            &mut t,
            Want::Tenant(Tenant::Character {
                chat: "z".into(),
                name: "Xena".into(),
            }),
        );
        assert_eq!(
            x.evicted.as_ref().map(|e| (e.tenant.clone(), e.usage)),
            Some((ch("Ben"), 2))
        );
        assert_eq!(
            t.resident(&ch("Anna")),
            None,
            "Anna's cache left with Ben's"
        );
    }

    #[test]
    fn a_character_leaves_its_slot_for_a_better_one() {
        let mut t = SlotTable::new(2, 8);
        let a = take(&mut t, said("Anna", &turn("User: hi\n", "Anna")));
        finish(&mut t, &a, Kind::Normal);
        // Ben comes in through another door (an admin load): slot 1.
        let b = take(&mut t, Want::Tenant(ch("Ben")));
        assert_eq!(b.slot, 1);
        t.release(b.slot, b.lease, Outcome::Generated(Kind::Normal));
        // Ben's prompt extends Anna's, and his own slot has no prompt
        // kvgate knows: slot 0 holds more of it.
        let b = take(&mut t, said("Ben", &turn("User: hi\nAnna: hey\n", "Ben")));
        assert_eq!(b.slot, 0);
        assert_eq!(t.slots()[1].owner, None, "his old slot is free");
        assert_eq!(t.slots()[1].usage, 0);
        assert_eq!(t.slots()[0].usage, 1, "his unsaved message moved with him");
    }
}

mod clients {
    //! Random interleavings of several known clients' requests: the
    //! per-client bound always holds, no slot is leased twice, and no
    //! newcomer waits while a slot is free.
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Enqueue {
            client: usize,
            tenant: usize,
        },
        Anonymous {
            client: usize,
            text: usize,
        },
        Said {
            client: usize,
            name: usize,
            turn: usize,
        },
        Release(usize),
        Cancel(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..4usize, 0..6usize).prop_map(|(client, tenant)| Op::Enqueue { client, tenant }),
            2 => (0..4usize, 0..3usize).prop_map(|(client, text)| Op::Anonymous { client, text }),
            3 => (0..4usize, 0..3usize, 0..5usize).prop_map(|(client, name, turn)| Op::Said { client, name, turn }),
            3 => (0..8usize).prop_map(Op::Release),
            1 => (0..8usize).prop_map(Op::Cancel),
        ]
    }

    proptest! {
        #[test]
        fn bounds_hold_and_free_slots_are_used(ops in proptest::collection::vec(op(), 1..80)) {
            let mut t = SlotTable::new(2, 6);
            t.set_client_bound(2);
            let tags: Vec<Option<ClientTag>> = vec![
                None,
                Some(ClientTag::from("a")),
                Some(ClientTag::from("b")),
                Some(ClientTag::from("c")),
            ];
            let mut leases: Vec<Grant> = Vec::new();
            let mut waiting: Vec<(Ticket, Option<ClientTag>, Tenant)> = Vec::new();
            for op in ops {
                let grants = match op {
                    Op::Enqueue { client, tenant } => {
                        let by = tags[client].clone();
                        let name = format!("T{tenant}");
                        match t.enqueue_by(want(&name), by.clone()) {
                            Ok((ticket, grants)) => {
                                waiting.push((ticket, by, ch(&name)));
                                grants
                            }
                            Err(TableError::ClientQueueFull { queued }) => {
                                prop_assert!(by.is_some());
                                prop_assert_eq!(queued, 2);
                                Vec::new()
                            }
                            Err(TableError::QueueFull { .. }) => Vec::new(),
                            Err(e) => return Err(TestCaseError::fail(e.to_string())),
                        }
                    }
                    Op::Said { client, name, turn } => {
                        // One shared history: later turns extend earlier ones.
                        let by = tags[client].clone();
                        let who = ["S0", "S1", "S2"][name];
                        let history: String = (0..turn).map(|i| format!("line {i}\n")).collect();
                        let tenant = ch(who);
                        let w = Want::Prompt {
                            tenant: tenant.clone(),
                            text: Arc::from(format!("shared story\n{history}{who}:")),
                        };
                        match t.enqueue_by(w, by.clone()) {
                            Ok((ticket, grants)) => {
                                waiting.push((ticket, by, tenant));
                                grants
                            }
                            Err(TableError::ClientQueueFull { .. } | TableError::QueueFull { .. }) => Vec::new(),
                            Err(e) => return Err(TestCaseError::fail(e.to_string())),
                        }
                    }
                    Op::Anonymous { client, text } => {
                        let by = tags[client].clone();
                        let tenant = Tenant::Anonymous { key: format!("k{text}") };
                        let w = Want::Prompt {
                            tenant: tenant.clone(),
                            text: Arc::from(["shared prefix: a", "shared prefix: b", "other"][text]),
                        };
                        match t.enqueue_by(w, by.clone()) {
                            Ok((ticket, grants)) => {
                                waiting.push((ticket, by, tenant));
                                grants
                            }
                            Err(TableError::ClientQueueFull { .. } | TableError::QueueFull { .. }) => Vec::new(),
                            Err(e) => return Err(TestCaseError::fail(e.to_string())),
                        }
                    }
                    Op::Release(i) if !leases.is_empty() => {
                        let g = leases.remove(i % leases.len());
                        t.release(g.slot, g.lease, Outcome::Generated(Kind::Normal))
                    }
                    Op::Cancel(i) if !waiting.is_empty() => {
                        let ticket = waiting[i % waiting.len()].0;
                        t.cancel(ticket);
                        Vec::new()
                    }
                    _ => Vec::new(),
                };
                for (ticket, g) in grants {
                    prop_assert!(
                        leases.iter().all(|l| l.slot != g.slot),
                        "slot {} leased twice", g.slot
                    );
                    leases.push(g);
                    waiting.retain(|(w, _, _)| *w != ticket);
                }
                waiting.retain(|(w, _, _)| t.is_queued(*w));
                for tag in tags.iter().flatten() {
                    let n = waiting.iter().filter(|(_, by, _)| by.as_ref() == Some(tag)).count();
                    prop_assert!(n <= 2, "client {} has {} waiting", tag, n);
                }
                // A newcomer (its character in no slot) never waits
                // while a slot is free.
                if waiting.iter().any(|(_, _, tenant)| t.resident(tenant).is_none()) {
                    prop_assert!(
                        t.slots().iter().all(|s| s.lease.is_some() || s.owner.is_some()),
                        "a newcomer waits while a slot is free: {:?}", t.slots()
                    );
                }
                // Nobody is resident twice; a member is never the owner
                // and lives only in a character's slot.
                for s in t.slots() {
                    if let Some(o) = &s.owner {
                        prop_assert!(!s.members.contains(o), "owner among members: {:?}", s);
                    }
                    prop_assert!(s.members.is_empty() || s.holds_character(), "{:?}", s);
                }
                for who in ["S0", "S1", "S2", "T0", "T1", "T2", "T3", "T4", "T5"] {
                    let n = t.slots().iter().filter(|s| s.hosts(&ch(who))).count();
                    prop_assert!(n <= 1, "{} resident in {} slots: {:?}", who, n, t.slots());
                }
                // A request no character owns never waits while any
                // slot is idle.
                if waiting.iter().any(|(_, _, tenant)| !tenant.is_character()) {
                    prop_assert!(
                        t.slots().iter().all(|s| s.lease.is_some()),
                        "an anonymous request waits beside an idle slot: {:?}", t.slots()
                    );
                }
            }
        }
    }
}

mod ram_cache {
    //! Characters coming back through llama-server's RAM prompt cache.
    use super::*;

    /// A swap-mode prompt: the speaker's card first.
    fn said(name: &str, history: &str) -> Want {
        Want::Prompt {
            tenant: ch(name),
            text: Arc::from(format!(
                "{name}'s card, at some length.\n{history}\n{name}:"
            )),
        }
    }

    /// A turn of `name` that completes.
    fn speak(t: &mut SlotTable, name: &str, history: &str) -> Grant {
        let g = take(t, said(name, history));
        finish(t, &g, Kind::Normal);
        g
    }

    #[test]
    fn a_character_whose_slot_was_taken_comes_back_from_ram() {
        let mut t = SlotTable::new(2, 8);
        let a = speak(&mut t, "A", "one");
        let b = speak(&mut t, "B", "one two");
        // C takes A's slot: A goes to RAM with its unsaved message; C was
        // never anywhere, so it has nothing to load.
        let c = take(&mut t, said("C", "one two three"));
        assert_eq!(c.slot, a.slot);
        assert_eq!(c.from_ram, None);
        assert_eq!(c.evicted.as_ref().map(|e| e.tenant.clone()), Some(ch("A")));
        finish(&mut t, &c, Kind::Normal);
        assert!(t.ram().holds(&ch("A")));
        // A comes back to B's slot (the least recently used): from RAM, with
        // its unsaved message, and B goes to RAM in turn.
        let a2 = take(&mut t, said("A", "one two three four"));
        assert_eq!(a2.slot, b.slot);
        assert!(!a2.resident);
        assert!(a2.from_ram.is_some_and(|p| p > 0));
        assert_eq!(a2.usage, 1, "A's unsaved message came back with it");
        assert!(
            !t.ram().holds(&ch("A")),
            "llama-server moved it into the slot"
        );
        assert!(t.ram().holds(&ch("B")));
    }

    #[test]
    fn an_empty_slot_never_loads_from_ram() {
        let mut t = SlotTable::new(2, 8);
        speak(&mut t, "A", "one");
        let b = speak(&mut t, "B", "one two");
        speak(&mut t, "C", "one two three");
        // B's slot is erased: llama-server skips its RAM lookup for an
        // explicit id_slot on an empty slot (llama.cpp #28139).
        let erase = take(&mut t, Want::Pinned(b.slot));
        t.release(erase.slot, erase.lease, Outcome::Cleared);
        let a2 = take(&mut t, said("A", "one two three four"));
        assert_eq!(a2.slot, b.slot);
        assert_eq!(a2.from_ram, None, "restores from disk");
    }

    #[test]
    fn after_a_restart_or_a_miss_nothing_comes_from_ram() {
        let mut t = SlotTable::new(1, 8);
        speak(&mut t, "A", "one");
        speak(&mut t, "B", "one two");
        t.invalidate_all();
        let a2 = take(&mut t, said("A", "one two three"));
        assert_eq!(a2.from_ram, None, "a restart empties llama-server's RAM");
        finish(&mut t, &a2, Kind::Normal);
        let b2 = take(&mut t, said("B", "one two three four"));
        assert!(
            b2.from_ram.is_none(),
            "B was lost in the restart, not stashed"
        );
        finish(&mut t, &b2, Kind::Normal);
        let a3 = take(&mut t, said("A", "one two three four five"));
        assert!(a3.from_ram.is_some());
        t.ram_missed(a3.ram_epoch);
        finish(&mut t, &a3, Kind::Normal);
        let b3 = take(&mut t, said("B", "one two three four five six"));
        assert_eq!(b3.from_ram, None, "after a miss kvgate restores from disk");
    }

    #[test]
    fn off_by_setting() {
        let mut t = SlotTable::new(1, 8);
        t.set_ram_cache(false);
        speak(&mut t, "A", "one");
        speak(&mut t, "B", "one two");
        let a2 = take(&mut t, said("A", "one two three"));
        assert_eq!(a2.from_ram, None);
    }

    #[test]
    fn an_admin_load_restores_from_disk_and_forgets_the_ram_copy() {
        let mut t = SlotTable::new(1, 8);
        speak(&mut t, "A", "one");
        speak(&mut t, "B", "one two");
        let load = take(&mut t, want("A"));
        assert_eq!(load.from_ram, None);
        assert!(!t.ram().holds(&ch("A")));
        t.mark_restored(load.slot, "a.bin");
        t.release(load.slot, load.lease, Outcome::Untouched);
        // A load is a restore: it overwrites B's cache, llama-server stashes
        // nothing.
        assert!(!t.ram().holds(&ch("B")));
    }

    #[test]
    fn a_prompt_that_moved_on_too_far_restores_from_disk() {
        let mut t = SlotTable::new(1, 8);
        speak(&mut t, "A", "one");
        speak(&mut t, "B", "one two");
        assert!(t.ram().holds(&ch("A")));
        // The front end trimmed A's chat: what RAM holds is under half of
        // the new prompt, so a disk restore (the save sharing the most) is
        // the better bet.
        let long = format!("{}\nA:", "x".repeat(400));
        let a2 = take(
            &mut t,
            Want::Prompt {
                tenant: ch("A"),
                text: Arc::from(long),
            },
        );
        assert_eq!(a2.from_ram, None);
    }
}
