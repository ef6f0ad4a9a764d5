//! A scripted SillyTavern chat: builds `/completion` bodies shaped exactly
//! like SillyTavern 1.18.0's (Text Completion, llama.cpp type, default context
//! template, group chats in the default "swap character cards" mode).
//!
//! Every body is a copy of a recorded one (`tests/fixtures/st-1.18.0-completions.jsonl`,
//! the first generation of the recorded group chat), so it carries the same
//! 64 keys with the same sampler values; only `prompt`, `stop` /
//! `stopping_strings`, `stream` and the four `n_predict` spellings are set.
//!
//! The prompt for speaker X (see `/work/shared/notes/sillytavern-traffic.md`):
//!
//! ```text
//! Write X's next reply in a fictional chat between X and User.
//! <X's description>
//! X's personality: <X's personality>
//! Scenario: <X's scenario>
//! ***
//! User: <example 1, user line>
//! X: <example 1, X's line>
//! ***
//! <more examples, while they fit>
//! ***
//! <chat history, "Name: text" per message, oldest lines dropped to fit>
//! X:
//! ```
//!
//! Only the speaker's card and examples are in the prompt; the stop strings
//! are `"\nUser:"`, `"\n<every other member>:"` (member order) and `"\n***"`,
//! or just `"\nUser:"` and `"\n***"` in a 1:1 chat.
//!
//! Budget: like SillyTavern, the card always goes in, then history lines from
//! the newest back while they fit in [`GroupChat::ctx_chars`], then the
//! examples in order while they still fit. The budget is counted in bytes of
//! UTF-8, which for the tiny test model (one token per byte) is the prompt's
//! token count minus BOS. The demo cards are plain ASCII.

use std::sync::OnceLock;

use serde_json::{Map, Value};

/// The recorded bodies, one JSON object per line (`{"seq": …, "body": …}`).
const RECORDED: &str = include_str!("../fixtures/st-1.18.0-completions.jsonl");

/// The keys of a body that depend on the chat and the request; every other
/// key of a SillyTavern body is a sampler or client setting copied verbatim.
pub const PER_REQUEST_KEYS: &[&str] = &[
    "prompt",
    "stop",
    "stopping_strings",
    "stream",
    "n_predict",
    "max_tokens",
    "max_new_tokens",
    "num_predict",
];

/// Default prompt budget: a 4096-token context minus room for a reply of a
/// few hundred tokens.
pub const DEFAULT_CTX_CHARS: usize = 3600;

/// The recorded SillyTavern 1.18.0 bodies, in recording order.
pub fn recorded_bodies() -> Vec<Value> {
    RECORDED
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).expect("fixture line is JSON");
            v["body"].take()
        })
        .collect()
}

/// The template every body is cloned from: the first recorded generation.
pub fn template() -> &'static Map<String, Value> {
    static T: OnceLock<Map<String, Value>> = OnceLock::new();
    T.get_or_init(|| match recorded_bodies().into_iter().next() {
        Some(Value::Object(m)) => m,
        other => panic!("first recorded body is not an object: {other:?}"),
    })
}

/// A character card, as SillyTavern uses it in a text-completion prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Character {
    /// Display name; it is also the `Name:` prefix of the character's lines.
    pub name: String,
    /// The card's description (the bulk of the card).
    pub description: String,
    /// One line of traits (`X's personality: …`); empty: line left out.
    pub personality: String,
    /// The card's scenario (`Scenario: …`); empty: line left out.
    pub scenario: String,
    /// Example dialogue, one `(user line, character line)` pair per block.
    pub examples: Vec<(String, String)>,
    /// The first message, which opens every chat the character is in.
    pub greeting: String,
}

/// A SillyTavern chat: a 1:1 chat when it has one member, a group chat
/// (swap-cards mode) otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupChat {
    /// The user's persona name.
    pub user: String,
    /// The characters, in the group's member order.
    pub members: Vec<Character>,
    /// The chat so far, oldest first: `(speaker, text)`.
    pub history: Vec<(String, String)>,
    /// Prompt budget in bytes; older history lines are dropped past it.
    pub ctx_chars: usize,
    /// "Join character cards" with a story string that does not name the
    /// speaker first: every speaker's prompt starts with the same text (all
    /// cards), so prompts differ only after the shared history. Off: the
    /// default "swap character cards" prompt, which starts with the speaker.
    pub join: bool,
}

// === impl GroupChat ===

impl GroupChat {
    /// A chat of `members` with user "User", opened with every member's
    /// greeting (in member order), as SillyTavern starts a group chat.
    pub fn new(members: Vec<Character>) -> GroupChat {
        assert!(!members.is_empty(), "a chat needs at least one character");
        let history = members
            .iter()
            .map(|c| (c.name.clone(), c.greeting.clone()))
            .collect();
        GroupChat {
            user: "User".to_string(),
            members,
            history,
            ctx_chars: DEFAULT_CTX_CHARS,
            join: false,
        }
    }

    /// A group chat of the first `n_members` demo characters (Alice, Bob,
    /// Carol, Dave, Erin, Frank, then generated ones). Deterministic.
    pub fn demo(n_members: usize) -> GroupChat {
        assert!(n_members >= 1, "a chat needs at least one character");
        GroupChat::new((0..n_members).map(Character::demo).collect())
    }

    /// A 1:1 chat with `character`, opened with its greeting.
    pub fn solo(character: Character) -> GroupChat {
        GroupChat::new(vec![character])
    }

    /// Whether this is a 1:1 chat.
    pub fn is_solo(&self) -> bool {
        self.members.len() == 1
    }

    /// The member called `name`. Panics for a non-member.
    pub fn member(&self, name: &str) -> &Character {
        self.members
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("{name:?} is not a member of this chat"))
    }

    /// Member names in member order.
    pub fn names(&self) -> Vec<String> {
        self.members.iter().map(|c| c.name.clone()).collect()
    }

    /// Appends a message (`speaker` may be the user or a member).
    pub fn push(&mut self, speaker: &str, text: &str) {
        self.history.push((speaker.to_string(), text.to_string()));
    }

    /// The prompt SillyTavern sends for `speaker`'s next message.
    pub fn prompt_for(&self, speaker: &str) -> String {
        let c = self.member(speaker);
        let name = &c.name;
        let head = if self.join {
            self.joined_cards()
        } else {
            let mut head = format!(
                "Write {name}'s next reply in a fictional chat between {name} and {}.\n",
                self.user
            );
            if !c.description.is_empty() {
                head.push_str(&c.description);
                head.push('\n');
            }
            if !c.personality.is_empty() {
                head.push_str(&format!("{name}'s personality: {}\n", c.personality));
            }
            if !c.scenario.is_empty() {
                head.push_str(&format!("Scenario: {}\n", c.scenario));
            }
            head
        };
        let chat_start = "***\n";
        let tail = format!("{name}:");
        let mut budget = self
            .ctx_chars
            .saturating_sub(head.len() + chat_start.len() + tail.len());

        // History first, newest back, stopping at the first line that no
        // longer fits; the examples get what is left.
        let mut lines: Vec<String> = Vec::new();
        for (who, text) in self.history.iter().rev() {
            let line = format!("{who}: {text}\n");
            if line.len() > budget {
                break;
            }
            budget -= line.len();
            lines.push(line);
        }
        lines.reverse();
        let mut examples = String::new();
        // Example dialogues belong to one card: joined cards leave them out.
        let own_examples = if self.join { &[][..] } else { &c.examples[..] };
        for (user_line, char_line) in own_examples {
            let block = format!("***\n{}: {user_line}\n{name}: {char_line}\n", self.user);
            if block.len() > budget {
                break;
            }
            budget -= block.len();
            examples.push_str(&block);
        }

        let mut prompt = head;
        prompt.push_str(&examples);
        prompt.push_str(chat_start);
        prompt.extend(lines);
        prompt.push_str(&tail);
        prompt
    }

    /// The story string of joined cards: the chat's members, then every
    /// card, the same for every speaker.
    fn joined_cards(&self) -> String {
        let names = self.names().join(", ");
        let mut head = format!("A fictional chat between {names} and {}.\n", self.user);
        for c in &self.members {
            if !c.description.is_empty() {
                head.push_str(&c.description);
                head.push('\n');
            }
            if !c.personality.is_empty() {
                head.push_str(&format!("{}'s personality: {}\n", c.name, c.personality));
            }
        }
        head
    }

    /// The stop strings SillyTavern sends for `speaker`.
    pub fn stop_for(&self, speaker: &str) -> Vec<String> {
        let speaker = &self.member(speaker).name;
        let mut stop = vec![format!("\n{}:", self.user)];
        stop.extend(
            self.members
                .iter()
                .filter(|c| &c.name != speaker)
                .map(|c| format!("\n{}:", c.name)),
        );
        stop.push("\n***".to_string());
        stop
    }

    /// The whole `/completion` body for `speaker`'s next message.
    pub fn body_for(&self, speaker: &str, stream: bool, n_predict: u32) -> Value {
        let mut body = template().clone();
        let stop = Value::from(self.stop_for(speaker));
        body.insert("prompt".into(), Value::from(self.prompt_for(speaker)));
        body.insert("stop".into(), stop.clone());
        body.insert("stopping_strings".into(), stop);
        body.insert("stream".into(), Value::from(stream));
        for key in ["n_predict", "max_tokens", "max_new_tokens", "num_predict"] {
            body.insert(key.into(), Value::from(n_predict));
        }
        Value::Object(body)
    }
}

// === impl Character ===

impl Character {
    /// The `i`-th demo character (0: Alice, 1: Bob, …). The first six have
    /// hand-written cards; later ones are generated from a template.
    pub fn demo(i: usize) -> Character {
        if let Some(c) = CAST.get(i) {
            return Character {
                name: c.name.to_string(),
                description: c.description.to_string(),
                personality: c.personality.to_string(),
                scenario: format!(
                    "A blizzard has closed the pass above Windrift Station, a research hut at \
                     3,200 meters. The generator hums, the radio crackles, and User, a \
                     surveyor caught by the storm on the ridge, has just stumbled in out of \
                     the snow. {} is in the common room with the others.",
                    c.name
                ),
                examples: c
                    .examples
                    .iter()
                    .map(|(u, a)| (u.to_string(), a.to_string()))
                    .collect(),
                greeting: c.greeting.to_string(),
            };
        }
        let name = EXTRA_NAMES
            .get(i - CAST.len())
            .map_or_else(|| format!("Member{}", i + 1), |n| n.to_string());
        let (job, tool, habit) = EXTRA_TRAITS[i % EXTRA_TRAITS.len()];
        Character {
            description: format!(
                "{name} is the station's {job}. {name} came up to Windrift Station three \
                 winters ago on a six-month contract and never quite left. {name} keeps a \
                 {tool} within reach at all times, {habit}, and knows the names of every \
                 peak visible from the roof. {name} is friendly with everyone in the hut \
                 but keeps a private notebook that nobody has ever been allowed to read."
            ),
            personality: format!(
                "steady, observant, dry humor, loyal, a little secretive, {habit}"
            ),
            scenario: format!(
                "A blizzard has closed the pass above Windrift Station. User has just \
                 arrived out of the snow. {name} is in the common room with the others."
            ),
            examples: vec![
                (
                    "What do you do up here?".to_string(),
                    format!("I'm the {job}. *{name} taps the {tool}.* Somebody has to be."),
                ),
                (
                    "Is the storm going to last?".to_string(),
                    format!("Three days, maybe four. *{name} shrugs.* The mountain decides."),
                ),
            ],
            greeting: format!(
                "*{name} looks up from the {tool} and nods.* You picked a fine night for a \
                 walk. Sit by the stove before you freeze to the floor."
            ),
            name,
        }
    }
}

/// A hand-written demo card.
struct Card {
    name: &'static str,
    description: &'static str,
    personality: &'static str,
    examples: &'static [(&'static str, &'static str)],
    greeting: &'static str,
}

const CAST: &[Card] = &[
    Card {
        name: "Alice",
        description: "Alice Okafor is the forty-one-year-old chief of Windrift Station, a \
            glaciologist who has spent eleven winters measuring the Sorrow Glacier from the hut \
            on its northern moraine. She is short, weather-beaten and quick, with grey-streaked \
            braids tucked under a red wool hat and a pencil behind each ear. She runs the \
            station by the logbook: every reading, every meal and every argument is written \
            down with the time to the minute. She is fair, unflappable in a crisis and \
            impatient with guesswork, and she answers most questions with a measurement. \
            Privately she worries that the glacier is retreating faster than her reports to \
            the institute admit.",
        personality: "methodical, calm, dry, exacting, protective of her team, loves data, \
            distrusts rumors",
        examples: &[
            (
                "How cold is it out there?",
                "Minus twenty-three at the mast, minus thirty-one with the wind. *She checks \
                 the logbook.* Seventeen minutes outside before your fingers stop working.",
            ),
            (
                "Why do you stay up here?",
                "Because the ice keeps a diary, and somebody has to read it. *She smiles \
                 faintly.* Also the rent is very low.",
            ),
        ],
        greeting: "*Alice looks up from the logbook and writes down the time.* 21:14, one \
            visitor, half frozen. Shut the door, the drift gets into the generator. Boots \
            by the stove, name in the book, and then you can tell me which way you came up.",
    },
    Card {
        name: "Bob",
        description: "Bob Lindqvist is the station's mechanic and, when the weather allows, \
            its helicopter pilot. He is a tall, slow-moving Swede in his fifties with a \
            shaved head, a magnificent grey beard and hands permanently black with grease. \
            He keeps the generator, the snowcats and the radio mast alive with spare parts \
            he machines himself in a workshop no bigger than a wardrobe. Bob speaks little \
            and in short sentences, hums old sea shanties while he works, and has a deep, \
            rare laugh. He trusts machines more than forecasts and people more than either.",
        personality: "quiet, patient, practical, gentle giant, stubborn about safety, hums \
            while working",
        examples: &[
            (
                "Can you fly me down tomorrow?",
                "No. *He wipes a spanner on his sleeve.* Wind's forty knots on the col. Maybe \
                 Thursday.",
            ),
            (
                "What is that noise?",
                "Generator. Bearing on number two. *He listens, head tilted.* She'll last the \
                 night.",
            ),
        ],
        greeting: "*Bob sets down the carburettor he was cleaning and looks at the snow \
            sliding off your shoulders.* Lucky. Col closes in an hour. Hang that jacket by \
            the pipes.",
    },
    Card {
        name: "Carol",
        description: "Carol Mendes is the station's medic, cook and self-appointed morale \
            officer. She is a round-faced Portuguese nurse of thirty-five who spent ten years \
            in mountain rescue before she came to Windrift for what she calls the quiet. She \
            talks fast, laughs loudly, feeds everyone whether they are hungry or not, and \
            checks pulses while pretending to shake hands. Behind the cheer she is sharp and \
            observant, the first to notice who is not sleeping or not eating. She collects \
            the station's ghost stories and swears she has seen lights moving on the glacier \
            at night.",
        personality: "warm, talkative, nosy, caring, brave, superstitious, a great cook",
        examples: &[
            (
                "I'm fine, really.",
                "Your lips are blue and you are shivering, so no. *She pushes a mug of soup \
                 into your hands.* Drink, then argue.",
            ),
            (
                "Are there really lights on the glacier?",
                "Three winters running. *She lowers her voice.* Alice says it's static. Alice \
                 has never looked.",
            ),
        ],
        greeting: "*Carol is already at your side with a blanket and a mug of something \
            steaming.* Sit, sit, sit! Bean soup, extra pepper. Let me see your fingers. And \
            tell me, did you see the lights on the way up?",
    },
    Card {
        name: "Dave",
        description: "Dave Kowalski is the radio operator and meteorologist, a lanky \
            twenty-nine-year-old from Gdansk who talks to three continents every night on the \
            shortwave set and knows every operator by their call sign. He is cheerful, \
            restless and hopelessly curious, and he explains the weather to anyone who will \
            listen with diagrams drawn on the steamed-up window. He keeps a jar of coffee \
            beans he refuses to share and a ukulele he cannot play.",
        personality: "chatty, curious, nerdy, optimistic, easily distracted, loyal",
        examples: &[
            (
                "Any news from the valley?",
                "The valley says hello and that the road is shut. *He spins the dial.* Also \
                 someone in Chile beat me at chess again.",
            ),
            (
                "When will it clear?",
                "Low's sitting right on top of us. *He draws a spiral on the window.* \
                 Saturday, if the ridge of high pressure behaves.",
            ),
        ],
        greeting: "*Dave pulls off his headphones, grinning.* A real person! Not a voice from \
            Reykjavik! Come here, tell me what the wind was doing on the ridge, I need a \
            ground report.",
    },
    Card {
        name: "Erin",
        description: "Erin Byrne is the youngest at the station, a twenty-four-year-old Irish \
            geology student collecting rock cores for her thesis. She is freckled, fierce and \
            permanently cold, wears three jumpers at once, and carries a hand lens on a cord \
            around her neck. She argues with Alice about everything, admires her enormously, \
            and would rather die than admit either. She climbs better than anyone in the hut.",
        personality: "bold, competitive, funny, impatient, secretly homesick, brilliant with \
            rocks",
        examples: &[
            (
                "What's in the boxes?",
                "Forty meters of mountain, in order. *She pats a crate.* Don't drop them or \
                 I'll have to drop you.",
            ),
            (
                "Do you like it here?",
                "I love it. *She pulls her sleeves over her hands.* I'd love it more at \
                 fifteen degrees warmer.",
            ),
        ],
        greeting: "*Erin looks up from a tray of rock cores, hand lens still in her eye.* Oh \
            good, someone new to explain quartz veins to. Mind the crates, they're \
            labelled.",
    },
    Card {
        name: "Frank",
        description: "Frank Osei is a retired mountain guide of sixty-six who has climbed \
            every peak in the range and now winters at the station as caretaker, because he \
            cannot stand the noise of towns. He is lean, white-haired and very still, reads \
            poetry by headlamp, and tells long stories that turn out to be warnings. He \
            rarely gives orders, but when he does everyone obeys, even Alice.",
        personality: "wise, calm, wry, patient, reads poetry, sees danger early",
        examples: &[
            (
                "Is it safe to go out?",
                "Safe is a word for valleys. *He closes his book.* It is possible, for an \
                 hour, roped, with me.",
            ),
            (
                "Have you climbed the north face?",
                "Twice. Once up, once down the quick way. *He taps his knee.* The mountain \
                 kept the interest.",
            ),
        ],
        greeting: "*Frank marks his page and studies you over the top of his glasses.* You \
            came up the west couloir. Brave or lost? Either way, welcome. Eat first, talk \
            later.",
    },
];

/// Names of generated members after the hand-written cast.
const EXTRA_NAMES: &[&str] = &[
    "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Niaj", "Olivia", "Peggy", "Rupert", "Sybil",
];

/// (job, tool, habit) for generated members.
const EXTRA_TRAITS: &[(&str, &str, &str)] = &[
    ("cartographer", "drafting compass", "hums while thinking"),
    ("electrician", "multimeter", "counts things out loud"),
    (
        "photographer",
        "battered camera",
        "never sits with its back to a door",
    ),
    (
        "botanist",
        "pressed-flower book",
        "talks to the houseplants",
    ),
];
