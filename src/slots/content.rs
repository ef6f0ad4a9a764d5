//! Placement by content: what each slot's cached prompt is worth to a new
//! prompt. Pure; the slot table ([`super::table`]) asks these questions
//! and decides.
//!
//! Two rules come from here:
//! - A request no character owns goes where llama-server itself would put
//!   it: the slot whose prompt shares the most with it, past llama-server's
//!   similarity threshold ([`SIMILARITY`]).
//! - A character's request may *extend* another character's slot of the
//!   same chat: when (almost) all of what that slot holds is a prefix of
//!   the new prompt, as when a group's speakers share one long prefix and
//!   the previous speaker's whole turn is part of the next one's history.
//!   The slot then serves both: the previous owner's cache stays inside it
//!   (a *member*), so nothing is saved or restored, and the request
//!   evaluates only what was said since, as llama-server alone would.
//!   Speakers whose prompts start with their own card (SillyTavern's
//!   default) never extend each other: each keeps its own slot.

use crate::identity::content::{common_prefix_len, similarity};

/// llama-server's `--slot-prompt-similarity` default: the share of a
/// prompt a slot must already hold for llama-server to choose it.
pub const SIMILARITY: f32 = 0.1;

/// The share of a slot's prompt a new prompt must repeat to extend it:
/// nearly all (a front end may trim or reflow a little).
pub const EXTEND_SHARE: f32 = 0.9;

/// How many more bytes of the new prompt another slot must hold than the
/// character's own for the character to move there: moving leaves the
/// character's older cache behind, so it must be worth more than noise.
pub const MOVE_GAIN_BYTES: usize = 32;

/// llama-server's similarity of the prompt a slot holds to a new prompt.
pub fn shares(held: Option<&str>, prompt: &str) -> f32 {
    held.map_or(0.0, |h| similarity(h, prompt))
}

/// How many bytes of `prompt` the slot holding `held` has cached.
pub fn reuse(held: Option<&str>, prompt: &str) -> usize {
    held.map_or(0, |h| common_prefix_len(h.as_bytes(), prompt.as_bytes()))
}

/// Whether `prompt` extends the prompt `held`: repeats at least
/// [`EXTEND_SHARE`] of it from the start.
pub fn extends(held: &str, prompt: &str) -> bool {
    extends_by(held, common_prefix_len(held.as_bytes(), prompt.as_bytes()))
}

/// [`extends`] for a prompt already known to repeat `common` bytes of
/// `held` from the start.
pub fn extends_by(held: &str, common: usize) -> bool {
    !held.is_empty() && common as f32 >= EXTEND_SHARE * held.len() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_turn_of_the_same_history_extends_an_earlier_one() {
        let shared = "A fictional chat between Alice, Bob and User.\n***\n";
        let alice = format!("{shared}User: hi\nAlice:");
        let bob = format!("{shared}User: hi\nAlice: hello there\nBob:");
        assert!(extends(&alice, &bob));
        assert!(
            !extends(&bob, &alice),
            "an earlier turn does not extend a later one"
        );
        assert!(reuse(Some(&alice), &bob) >= alice.len() - 1);
    }

    #[test]
    fn prompts_that_start_with_their_own_card_never_extend_each_other() {
        let alice =
            "Write Alice's next reply in a fictional chat.\nAlice's card.\n***\nUser: hi\nAlice:";
        let bob = "Write Bob's next reply in a fictional chat.\nBob's card.\n***\nUser: hi\nAlice: hello\nBob:";
        assert!(!extends(alice, bob));
        assert!(shares(Some(alice), bob) < SIMILARITY);
    }

    #[test]
    fn nothing_held_is_worth_nothing() {
        assert_eq!(reuse(None, "abc"), 0);
        assert_eq!(shares(None, "abc"), 0.0);
        assert!(!extends("", "abc"));
    }
}
