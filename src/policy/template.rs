//! SillyTavern's prompt templates, read backwards: given a template such as
//! `[Write the next reply only as {{char}}.]` and a message's text, which
//! names did SillyTavern fill in?
//!
//! Chat Completion bodies carry no `\nName:` tail or stop strings; the
//! speaker, the user and the group's members are in the texts SillyTavern
//! built from its prompt templates (the group nudge, the main prompt, the
//! new-group-chat line). The policy lists those templates
//! (`policies/sillytavern.toml`, `[chat]`), and this module finds them.
//!
//! Pure. A template is literal text and placeholders `{{char}}`, `{{user}}`,
//! `{{group}}`; it must start and end with text, and placeholders must be
//! separated by text, so each one is captured up to the next literal piece.
//! Matching is bounded: at most [`MAX_STARTS`] starting points per text, and
//! from each a look of at most [`MAX_CAPTURE_BYTES`] for what follows a
//! placeholder, so a hostile message costs little whatever its length.

/// Most places a template's first piece is tried from, per text.
pub const MAX_STARTS: usize = 8;

/// Longest name (bytes) a placeholder captures; a longer capture is no match.
pub const MAX_CAPTURE_BYTES: usize = 1024;

/// What a placeholder stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// `{{char}}`: the character SillyTavern generates for.
    Char,
    /// `{{user}}`: the user's persona name.
    User,
    /// `{{group}}`: the group's members, comma-separated.
    Group,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Slot(Field),
}

/// A parsed template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

/// The names a match filled in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filled {
    /// `{{char}}`.
    pub char: Option<String>,
    /// `{{user}}`.
    pub user: Option<String>,
    /// `{{group}}`, as written (comma-separated).
    pub group: Option<String>,
}

impl Filled {
    fn slot(&mut self, field: Field) -> &mut Option<String> {
        match field {
            Field::Char => &mut self.char,
            Field::User => &mut self.user,
            Field::Group => &mut self.group,
        }
    }
}

impl Template {
    /// Parses `text`; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            let close = rest[open..]
                .find("}}")
                .map(|c| open + c)
                .ok_or_else(|| format!("template {text:?}: \"{{{{\" without \"}}}}\""))?;
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_string()));
            }
            let field = match &rest[open + 2..close] {
                "char" => Field::Char,
                "user" => Field::User,
                "group" => Field::Group,
                other => {
                    return Err(format!(
                        "template {text:?}: unknown placeholder {{{{{other}}}}} \
                         (known: {{{{char}}}}, {{{{user}}}}, {{{{group}}}})"
                    ))
                }
            };
            if matches!(pieces.last(), Some(Piece::Slot(_)) | None) {
                return Err(format!(
                    "template {text:?}: a placeholder must follow literal text"
                ));
            }
            pieces.push(Piece::Slot(field));
            rest = &rest[close + 2..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        match pieces.last() {
            None => Err("a template must not be empty".into()),
            Some(Piece::Slot(_)) => Err(format!(
                "template {text:?}: it must end with literal text after its last placeholder"
            )),
            Some(Piece::Text(_)) => Ok(Template { pieces }),
        }
    }

    /// The first place in `text` where the template matches, with the names
    /// it filled in. A placeholder used twice must capture the same name.
    pub fn find(&self, text: &str) -> Option<Filled> {
        let Some(Piece::Text(first)) = self.pieces.first() else {
            return None;
        };
        text.match_indices(first.as_str())
            .take(MAX_STARTS)
            .find_map(|(at, _)| self.match_at(&text[at + first.len()..]))
    }

    /// Matches the pieces after the first against the start of `text`.
    fn match_at(&self, mut text: &str) -> Option<Filled> {
        let mut filled = Filled::default();
        let mut pieces = self.pieces[1..].iter();
        while let Some(piece) = pieces.next() {
            match piece {
                Piece::Text(t) => text = text.strip_prefix(t.as_str())?,
                Piece::Slot(field) => {
                    // Parsing guarantees literal text after every slot.
                    let Some(Piece::Text(next)) = pieces.next() else {
                        return None;
                    };
                    // A capture is short: look for what follows it only
                    // within reach, so a long message costs little per try.
                    let end = within(text, MAX_CAPTURE_BYTES + next.len()).find(next.as_str())?;
                    let name = text[..end].trim();
                    if name.is_empty()
                        || name.len() > MAX_CAPTURE_BYTES
                        || name.chars().any(char::is_control)
                    {
                        return None;
                    }
                    let slot = filled.slot(*field);
                    if slot.as_deref().is_some_and(|seen| seen != name) {
                        return None;
                    }
                    *slot = Some(name.to_string());
                    text = &text[end + next.len()..];
                }
            }
        }
        Some(filled)
    }
}

/// The first `max` bytes of `text` (fewer, to end on a character boundary).
fn within(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sillytavern_templates_give_back_their_names() {
        let nudge = Template::parse("[Write the next reply only as {{char}}.]").unwrap();
        let f = nudge
            .find("[Write the next reply only as Bob.]")
            .expect("match");
        assert_eq!(f.char.as_deref(), Some("Bob"));
        let main = Template::parse(
            "Write {{char}}'s next reply in a fictional chat between {{char}} and {{user}}.",
        )
        .unwrap();
        let f = main
            .find("Write Mary Ann's next reply in a fictional chat between Mary Ann and Ivan.\nBe vivid.")
            .expect("match");
        assert_eq!(f.char.as_deref(), Some("Mary Ann"));
        assert_eq!(f.user.as_deref(), Some("Ivan"));
        // {{char}} twice must be one name.
        assert_eq!(
            main.find("Write Bob's next reply in a fictional chat between Alice and User."),
            None
        );
        let group = Template::parse("[Start a new group chat. Group members: {{group}}]").unwrap();
        let f = group
            .find("[Start a new group chat. Group members: Alice, Bob, Carol]")
            .unwrap();
        assert_eq!(f.group.as_deref(), Some("Alice, Bob, Carol"));
    }

    #[test]
    fn text_that_only_resembles_a_template_is_no_match() {
        let nudge = Template::parse("[Write the next reply only as {{char}}.]").unwrap();
        assert_eq!(nudge.find("[Write the next reply only as .]"), None);
        assert_eq!(nudge.find("Write the next reply only as Bob."), None);
        assert_eq!(
            nudge.find("[Write the next reply only as Bob\nand Carol.]"),
            None
        );
        // A later occurrence still matches when an earlier one fails (a
        // capture never spans lines).
        let f = nudge
            .find("[Write the next reply only as \n(draft)\n[Write the next reply only as Carol.]")
            .unwrap();
        assert_eq!(f.char.as_deref(), Some("Carol"));
    }

    #[test]
    fn bad_templates_are_refused_with_the_reason() {
        for (t, why) in [
            ("{{char}} speaks.", "follow literal text"),
            ("Write as {{char}}", "end with literal text"),
            ("as {{char}}{{user}}.", "follow literal text"),
            ("as {{charIfNotGroup}}.", "unknown placeholder"),
            ("as {{char.", "without"),
            ("", "empty"),
        ] {
            let e = Template::parse(t).unwrap_err();
            assert!(e.contains(why), "{t:?}: {e}");
        }
    }

    #[test]
    fn a_flood_of_near_matches_costs_bounded_work() {
        let nudge = Template::parse("[Write the next reply only as {{char}}.]").unwrap();
        let text = "[Write the next reply only as ".repeat(100_000);
        assert_eq!(nudge.find(&text), None);
    }
}
