//! Who speaks next in a group chat, read off the prompt of the turn being
//! generated. Pure.
//!
//! SillyTavern's group chats (natural order, the default) answer a user
//! message with a list of members: those the message mentions, in the
//! order it mentions them, then others by their talkativeness (random),
//! and each member at most once until the user speaks again. So, from the
//! prompt of one member's turn:
//! - the members who already spoke since the user's last message (and the
//!   one speaking now) are done for this round;
//! - of the others, the first one the user's message mentions is next; if
//!   it mentions none, the one who has been silent longest is the best
//!   guess;
//! - when everyone has spoken, the round is over, and who comes next
//!   depends on a message the user has not written yet: no prediction.
//!
//! Only text-completion prompts (`Name: message` lines) are read; the chat
//! history starts after the last example-dialogue separator (`***` or
//! `<START>`), so names in cards and example dialogues don't count.

/// A guess at the next speaker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NextSpeaker {
    /// The member.
    pub name: String,
    /// Whether the user's message names them (a stronger guess than
    /// "silent longest").
    pub mentioned: bool,
}

/// The member likely to speak after `speaker`, from the prompt of
/// `speaker`'s turn; `members` are the group's characters (not the user).
pub fn predict(
    prompt: &str,
    speaker: &str,
    members: &[String],
    user: Option<&str>,
) -> Option<NextSpeaker> {
    let history = chat_history(prompt);
    let tags = line_tags(history, members, user);
    // The tag of the turn being generated ends the prompt: not history.
    let tags = match tags.last() {
        Some(t) if t.name == speaker && history[t.end..].trim().is_empty() => {
            &tags[..tags.len() - 1]
        }
        _ => &tags[..],
    };
    let round_start = user.and_then(|u| tags.iter().rposition(|t| t.name == u));
    let in_round = round_start.map_or(tags, |i| &tags[i + 1..]);
    let i = round_start?;
    let open: Vec<&String> = members
        .iter()
        .filter(|m| !m.is_empty() && m.as_str() != speaker)
        .filter(|m| !in_round.iter().any(|t| t.name == m.as_str()))
        .collect();
    if open.is_empty() {
        return None;
    }
    let message = &history[tags[i].end..tags.get(i + 1).map_or(history.len(), |t| t.start)];
    if let Some((_, name)) = open
        .iter()
        .filter_map(|m| mention(message, m).map(|at| (at, *m)))
        .min()
    {
        return Some(NextSpeaker {
            name: name.clone(),
            mentioned: true,
        });
    }
    let last_spoke = |m: &str| tags.iter().rposition(|t| t.name == m);
    open.into_iter()
        .min_by_key(|m| last_spoke(m).map_or(-1, |p| p as i64))
        .map(|m| NextSpeaker {
            name: m.clone(),
            mentioned: false,
        })
}

/// What the next speaker's prompt will most likely start with, composed
/// from its own last prompt (`last`: its card and the chat as it was then)
/// and the prompt of the turn being generated (`now`: the chat so far, up
/// to the current speaker's tag). `None` when `now` does not repeat the chat
/// `last` showed (the front end trimmed or edited it), or adds nothing to
/// it.
///
/// Evaluating this ahead ("prefill ahead") leaves the next speaker's turn
/// only the current speaker's reply to read.
pub fn anticipate(last: &str, now: &str) -> Option<String> {
    let (head, old) = last.split_at(last.len() - chat_history(last).len());
    let new = chat_history(now);
    // Each ends with the speaker's tag line: the chat is what comes before.
    let old = &old[..old.rfind('\n')? + 1];
    let new = &new[..new.rfind('\n')?];
    if !new.starts_with(old) || new.len() < old.len() + MIN_NEW_BYTES {
        return None;
    }
    Some(format!("{head}{new}"))
}

/// Less new chat than this is not worth a request of its own.
const MIN_NEW_BYTES: usize = 64;

/// A `Name:` at the start of a line.
#[derive(Debug)]
struct Tag<'a> {
    name: &'a str,
    /// Where the line starts.
    start: usize,
    /// Just past the colon: where the message starts.
    end: usize,
}

/// The part of the prompt after the last example-dialogue separator line.
fn chat_history(prompt: &str) -> &str {
    let mut from = 0;
    let mut at = 0;
    for line in prompt.split_inclusive('\n') {
        at += line.len();
        let t = line.trim();
        if t == "***" || t.eq_ignore_ascii_case("<START>") {
            from = at;
        }
    }
    &prompt[from..]
}

/// Every line of `text` that starts with a member's or the user's name and
/// a colon, in order.
fn line_tags<'a>(text: &str, members: &'a [String], user: Option<&'a str>) -> Vec<Tag<'a>> {
    let names: Vec<&'a str> = members
        .iter()
        .map(String::as_str)
        .chain(user)
        .filter(|n| !n.is_empty())
        .collect();
    let mut tags = Vec::new();
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        // The longest name wins ("Ann" and "Anna").
        let found = names
            .iter()
            .filter(|n| {
                line.strip_prefix(**n)
                    .is_some_and(|rest| rest.starts_with(':'))
            })
            .max_by_key(|n| n.len());
        if let Some(name) = found {
            tags.push(Tag {
                name,
                start,
                end: start + name.len() + 1,
            });
        }
        start += line.len();
    }
    tags
}

/// Where `message` first names `name` as a word, if it does.
fn mention(message: &str, name: &str) -> Option<usize> {
    let is_word = |c: Option<char>| !c.is_some_and(char::is_alphanumeric);
    message.match_indices(name).map(|(i, _)| i).find(|&i| {
        is_word(message[..i].chars().next_back())
            && is_word(message[i + name.len()..].chars().next())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members() -> Vec<String> {
        ["Alice", "Bob", "Carol"].map(String::from).to_vec()
    }

    const HEAD: &str = "Write Carol's next reply.\nCarol: an example line\n***\n";

    #[test]
    fn the_first_member_the_user_names_is_next() {
        let p = format!("{HEAD}User: Bob, and you Carol?\nAlice: hi\nCarol:");
        let next = predict(&p, "Carol", &members(), Some("User")).unwrap();
        assert_eq!(
            next,
            NextSpeaker {
                name: "Bob".into(),
                mentioned: true
            }
        );
    }

    #[test]
    fn without_a_mention_the_longest_silent_member_is_next() {
        let p = format!("{HEAD}Bob: old news\nAlice: older? no\nUser: well?\nCarol:");
        let next = predict(&p, "Carol", &members(), Some("User")).unwrap();
        assert_eq!(
            next,
            NextSpeaker {
                name: "Bob".into(),
                mentioned: false
            }
        );
    }

    #[test]
    fn when_everyone_has_spoken_the_round_is_over() {
        let p = format!("{HEAD}User: all of you\nAlice: a\nBob: b\nCarol:");
        assert_eq!(predict(&p, "Carol", &members(), Some("User")), None);
    }

    #[test]
    fn names_in_cards_and_examples_and_inside_words_do_not_count() {
        // "Carol" in the head, "Bobby" is not Bob.
        let p = format!("{HEAD}User: Bobby says hi, Alice\nCarol:");
        let next = predict(&p, "Carol", &members(), Some("User")).unwrap();
        assert_eq!(next.name, "Alice");
        assert!(next.mentioned);
    }

    #[test]
    fn the_next_prompt_is_its_head_and_the_chat_so_far() {
        let last = "Bob's card\n***\nUser: hi all\nBob:";
        let now = "Carol's card\n***\nUser: hi all\nBob: hello there, and a long enough reply to matter\nCarol: me too, at some length as well\nAlice:";
        let next = anticipate(last, now).unwrap();
        assert_eq!(
            next,
            "Bob's card\n***\nUser: hi all\nBob: hello there, and a long enough reply to matter\nCarol: me too, at some length as well"
        );
        // Bob's next prompt starts with it.
        let bobs = format!("{next}\nAlice: a reply\nBob:");
        assert!(bobs.starts_with(&next));
    }

    #[test]
    fn a_trimmed_or_edited_chat_is_not_anticipated() {
        let last = "Bob's card\n***\nUser: hi all\nAlice: an older line\nBob:";
        let trimmed = "Carol's card\n***\nAlice: an older line\nBob: hello there, long enough to be worth it\nCarol:";
        assert_eq!(anticipate(last, trimmed), None);
        let little = "Carol's card\n***\nUser: hi all\nAlice: an older line\nBob: ok\nCarol:";
        assert_eq!(anticipate(last, little), None);
    }

    #[test]
    fn no_user_message_no_prediction() {
        let p = format!("{HEAD}Alice: greeting\nCarol:");
        assert_eq!(predict(&p, "Carol", &members(), Some("User")), None);
        assert_eq!(predict(&p, "Carol", &members(), None), None);
    }
}
