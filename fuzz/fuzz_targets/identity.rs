//! Identity inference on hostile bodies: `kvgate::identity::resolve` (and
//! the explicit `kvgate` body member) must never panic, must be
//! deterministic, and must produce a tenant kvgate can name files after.
//!
//! Input: byte 0 selects the API shape (bit 0: chat), the policy (bit 1:
//! generic instead of sillytavern) and, for raw input, streaming (bit 2).
//! The rest is a JSON body when it parses as JSON; otherwise it is read as
//! `prompt \0 stop \0 stop …` (lossy UTF-8) and wrapped in a text body, so
//! the fuzzer can work on prompts and stop strings directly.
#![no_main]

use kvgate::store::{
    file_name, is_cache_file_name, normalize, parse_name, utc_stamp, MAX_NAME_BYTES,
};
use kvgate::identity::{resolve, Api, Explicit};
use kvgate::tenant::Kind;
use kvgate::policy::Policy;
use kvgate::tenant::Tenant;
use kvgate_fuzz::ambiguous;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use std::sync::OnceLock;

fn policies() -> &'static [Policy; 2] {
    static P: OnceLock<[Policy; 2]> = OnceLock::new();
    P.get_or_init(|| {
        [
            Policy::load("sillytavern").expect("built-in policy"),
            Policy::load("generic").expect("built-in policy"),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let api = if mode & 1 == 0 { Api::Text } else { Api::Chat };
    let policy = &policies()[usize::from(mode & 2 != 0)];
    let mut body = match serde_json::from_slice::<Value>(rest) {
        Ok(v) => v,
        Err(_) => {
            let mut parts = rest.split(|&b| b == 0).map(String::from_utf8_lossy);
            let prompt = parts.next().unwrap_or_default().into_owned();
            let stop: Vec<String> = parts.map(|p| p.into_owned()).collect();
            json!({"prompt": prompt, "stop": stop, "stream": mode & 4 != 0})
        }
    };
    let explicit = match Explicit::take_from_body(&mut body) {
        Ok(e) => e,
        Err(e) => {
            // A refused explicit identity names what is wrong.
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert!(
        body.get("kvgate").is_none(),
        "the kvgate member must never reach llama-server"
    );

    let id = resolve(api, &body, &explicit, policy, |_| None);
    let again = resolve(api, &body, &explicit, policy, |_| None);
    assert_eq!(id, again, "resolve is deterministic");

    let mut sorted = id.roster.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(id.roster, sorted, "roster sorted and deduplicated");

    match &id.tenant {
        Tenant::Character { chat, name } => {
            assert!(!name.is_empty(), "empty character name");
            assert!(!chat.is_empty(), "empty chat key");
            assert!(id.roster.contains(name), "speaker missing from the roster");
            // Every character kvgate may save gets a valid file name that
            // parses back to its own stamp.
            let unix = 1_700_000_000;
            for tag in [None, Some("t")] {
                let f = file_name(chat, unix, tag, name);
                assert!(is_cache_file_name(&f), "{f:?} is not a cache file name");
                assert!(f.len() <= 255, "{f:?} too long for a file system");
                // (Names whose character part holds what parse_name anchors
                // on do not round-trip: a known limitation, see fuzz/src/lib.rs.)
                if !ambiguous(&normalize(name, MAX_NAME_BYTES), tag) {
                    let p = parse_name(&f).expect("kvgate's own names parse");
                    assert_eq!(p.stamp, utc_stamp(unix));
                }
            }
        }
        Tenant::Anonymous { key } => assert!(!key.is_empty()),
    }

    // The same prompt again for the same tenant is a swipe, unless the
    // client said otherwise.
    let swipe = resolve(api, &body, &explicit, policy, |t| {
        (*t == id.tenant).then_some(id.prompt_hash)
    });
    assert_eq!(swipe.tenant, id.tenant);
    if explicit.kind.is_none() && id.kind == Kind::Normal {
        assert_eq!(swipe.kind, Kind::Swipe);
    } else {
        assert_eq!(swipe.kind, id.kind);
    }
});
