//! Micro-benches of kvgate's hot pure functions (criterion):
//!
//! - `slots/*`: one acquire/release cycle of [`kvgate::slots::SlotTable`]
//!   (`enqueue` of a `Want::Tenant` that is granted at once, then `release`
//!   with `Outcome::Generated(Kind::Normal)`), for a tenant already resident
//!   in its slot (`resident`) and for a tenant that must evict the least
//!   used slot (`evict`, 8× more tenants than slots, round-robin), on 8 and
//!   on 256 slots (256 is what the overhead bench's fake reports).
//! - `identity/*`: [`kvgate::identity::resolve`] with the SillyTavern policy
//!   on a group-chat text completion whose prompt stands for 16 k tokens.
//!   Assumption: English text averages about 4 bytes per token with
//!   llama-style BPE vocabularies, so 16 k tokens ≈ 64 KiB of prompt (the
//!   prompt here is 65,536 bytes plus the speaker tail; with the byte-level
//!   tokenizer of kvgate's tests 16 k tokens would be only 16 KB). `resolve` is timed
//!   on the already-parsed body, as the proxy calls it; `parse_resolve_rewrite`
//!   adds what the proxy does around it for every completion: parse the raw
//!   body, resolve, set `id_slot`, serialise the body again;
//!   `fnv1a64_prompt` times the prompt fingerprint alone.
//! - `parse_name/10k`: [`kvgate::store::parse_name`] over 10,000
//!   generated file names: 40 % plain, 25 % tagged, 20 % with Unicode chat
//!   and character parts (some of them tagged), 15 % unparseable.
//! - `durability/*`: what making a 50 MB save durable costs once
//!   llama-server has written it: rename alone (before) against sync,
//!   rename, sync the directory (now). Both replace an earlier save.
//!
//! Run: `cargo bench --bench micro` (about a minute; add a filter such as
//! `cargo bench --bench micro -- slots` to run a subset).
//!
//! # Last result
//! 2026-11-21, `cargo bench --bench micro`, kvgate at commit 8187dfe, bench
//! profile (release, debug = 1); AMD EPYC VM, 2 cores, 24 GiB, Linux 6.18,
//! rustc 1.95.0. Criterion's estimate [low, median, high]:
//!
//! ```text
//! slots/resident/8                   [84.868 ns 85.605 ns 86.517 ns]
//! slots/evict/8                      [139.91 ns 141.35 ns 143.28 ns]
//! slots/resident/256                 [265.92 ns 267.58 ns 269.53 ns]
//! slots/evict/256                    [1.4772 µs 1.4885 µs 1.5014 µs]
//! identity/resolve/16k_tokens        [64.127 µs 64.274 µs 64.424 µs]
//! identity/fnv1a64_prompt/16k_tokens [63.024 µs 63.165 µs 63.323 µs]
//! identity/parse_resolve_rewrite/16k_tokens
//!                                    [106.21 µs 107.00 µs 108.20 µs]
//! parse_name/10k                     [676.02 µs 680.98 µs 686.99 µs]
//!                                    (68 ns per name, 14.7 M names/s)
//! ```
//!
//! `durability/*`, 2026-12-03 (same machine, ext4 on a virtio disk):
//!
//! ```text
//! durability/rename/50MB               [29.088 ms 29.437 ms 29.534 ms]
//! durability/sync_rename_sync_dir/50MB [32.125 ms 32.320 ms 32.608 ms]
//! ```
//!
//! Durable saves add 2.9 ms per 50 MB save here, off llama-server's path
//! (the slot's lease is held for it). The sync is cheap because the kernel
//! has written most of the file back by the time kvgate syncs it; a file
//! synced right after it was written took 19 ms in a separate measurement.
//!
//! The slot table costs well under a microsecond per request up to 256
//! slots. Identity inference on a 16 k-token prompt costs 64 µs, 98 % of it
//! the FNV-1a prompt fingerprint (one dependent multiply per byte, ≈ 1 GB/s):
//! that fingerprint only lives in memory (swipe detection), so a word-at-a-
//! time hash would cut this to a few µs. (Throughput lines in criterion's
//! output for `identity/*` are relative to the whole 66 KB request body.)

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvgate::identity::{self, Api, Explicit};
use kvgate::policy::Policy;
use kvgate::slots::{Outcome, SlotTable, Want};
use kvgate::store::{file_name, parse_name};
use kvgate::tenant::Kind;
use kvgate::tenant::Tenant;
use serde_json::{json, Value};

// === slot table ===

fn tenant(i: usize) -> Tenant {
    Tenant::Character {
        chat: format!("Alice-{i}+Bob+User"),
        name: format!("Alice-{i}"),
    }
}

/// One acquire/release cycle for `want`; the grant must be immediate.
fn cycle(table: &mut SlotTable, want: Want) {
    let (ticket, grants) = table.enqueue(want).expect("queue has room");
    let (_, grant) = grants
        .into_iter()
        .find(|(t, _)| *t == ticket)
        .expect("an idle table grants at once");
    let more = table.release(grant.slot, grant.lease, Outcome::Generated(Kind::Normal));
    assert!(more.is_empty(), "nobody else was waiting");
    black_box(grant);
}

fn bench_slots(c: &mut Criterion) {
    let mut g = c.benchmark_group("slots");
    for n in [8usize, 256] {
        // Resident: every tenant already owns its slot.
        let tenants: Vec<Tenant> = (0..n).map(tenant).collect();
        let mut table = SlotTable::new(n, 64);
        for t in &tenants {
            cycle(&mut table, Want::Tenant(t.clone()));
        }
        let mut i = 0;
        g.bench_function(format!("resident/{n}"), |b| {
            b.iter(|| {
                // The proxy clones the tenant into its Want, so do we.
                cycle(&mut table, Want::Tenant(tenants[i % n].clone()));
                i += 1;
            })
        });
        assert!(table.is_idle());

        // Evict: 8× more tenants than slots, round-robin, so every request
        // takes the least used slot from another tenant.
        let tenants: Vec<Tenant> = (0..8 * n).map(tenant).collect();
        let mut table = SlotTable::new(n, 64);
        let mut i = 0;
        g.bench_function(format!("evict/{n}"), |b| {
            b.iter(|| {
                cycle(&mut table, Want::Tenant(tenants[i % tenants.len()].clone()));
                i += 1;
            })
        });
        assert!(table.is_idle());
    }
    g.finish();
}

// === identity ===

const PROMPT_BYTES: usize = 64 * 1024;

/// A SillyTavern group-chat prompt of `PROMPT_BYTES` bytes of history,
/// ending with the speaker tail `\nAlice:`.
fn long_prompt() -> String {
    let mut p = String::with_capacity(PROMPT_BYTES + 4096);
    p.push_str(
        "Write Alice's next reply in a fictional chat between Alice, Bob, Carol and User.\n\
         Alice Marlowe is the thirty-four-year-old keeper of the Lantern and Quill, a narrow \
         three-storey inn that leans against the harbor wall of the fishing town of Saltmere. \
         She spent twelve years as a surveyor for the Coastal Charting Office and still keeps \
         her old maps rolled in a cedar chest behind the bar.\n\
         Alice's personality: precise, brisk, curious, warm underneath, loves maps\n\
         Scenario: A stormy autumn evening at the Lantern and Quill.\n***\n",
    );
    let lines = [
        ("User", "How far is it to the lighthouse from here, and is the path safe tonight?"),
        ("Alice", "Two miles and a quarter along the cliff path. *She taps the map with an inky finger.* The beach floods at half past nine."),
        ("Bob", "*Bob sets down the lantern he was mending.* Storm's early this year. Hang your coat by the stove, it'll dry by morning."),
        ("Carol", "*Carol bustles over with a steaming mug.* Nettle and ginger, drink it all, my grandmother swore by it."),
    ];
    let mut turn = 0usize;
    while p.len() < PROMPT_BYTES {
        let (who, text) = lines[turn % lines.len()];
        p.push_str(&format!("{who}: {text} (turn {turn})\n"));
        turn += 1;
    }
    p.truncate(PROMPT_BYTES);
    // Cut back to a line end, then the speaker tail.
    let end = p.rfind('\n').unwrap_or(p.len());
    p.truncate(end);
    p.push_str("\nAlice:");
    p
}

fn st_body(prompt: &str) -> Value {
    json!({
        "prompt": prompt,
        "max_new_tokens": 300, "max_tokens": 300, "n_predict": 300,
        "temperature": 1, "top_p": 0.95, "min_p": 0.01, "top_k": 0,
        "repetition_penalty": 1.1, "repeat_penalty": 1.1, "repeat_last_n": 0,
        "dry_sequence_breakers": ["\n", ":", "\"", "*"],
        "samplers": ["penalties", "dry", "top_k", "typ_p", "xtc", "top_p", "min_p", "temperature"],
        "stopping_strings": ["\nUser:", "\nBob:", "\nCarol:", "\n***"],
        "stop": ["\nUser:", "\nBob:", "\nCarol:", "\n***"],
        "truncation_length": 20480, "num_ctx": 20480,
        "cache_prompt": true, "stream": true,
    })
}

fn bench_identity(c: &mut Criterion) {
    let policy = Policy::sillytavern();
    let prompt = long_prompt();
    let body = st_body(&prompt);
    let raw = serde_json::to_vec(&body).expect("serialisable");
    let explicit = Explicit::default();

    // Sanity: the bench measures the inferred-character path.
    let id = identity::resolve(Api::Text, &body, &explicit, &policy, |_| None);
    assert_eq!(id.tenant.character(), Some("Alice"));
    assert_eq!(id.kind, Kind::Normal);

    let mut g = c.benchmark_group("identity");
    g.throughput(Throughput::Bytes(raw.len() as u64));
    g.bench_function("resolve/16k_tokens", |b| {
        b.iter(|| {
            black_box(identity::resolve(
                Api::Text,
                black_box(&body),
                &explicit,
                &policy,
                |_| None,
            ))
        })
    });
    // Most of `resolve` is the prompt fingerprint (FNV-1a, one multiply per
    // byte): timed alone for comparison.
    g.bench_function("fnv1a64_prompt/16k_tokens", |b| {
        b.iter(|| black_box(kvgate::hash::fnv1a64(black_box(prompt.as_bytes()))))
    });
    g.bench_function("parse_resolve_rewrite/16k_tokens", |b| {
        b.iter(|| {
            let mut v: Value = serde_json::from_slice(black_box(&raw)).expect("valid JSON");
            let id = identity::resolve(Api::Text, &v, &explicit, &policy, |_| None);
            v["id_slot"] = Value::from(3);
            black_box((id, serde_json::to_vec(&v).expect("serialisable")))
        })
    });
    g.finish();
}

// === file names ===

/// A small deterministic generator (xorshift64*), so every run parses the
/// same names.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[(self.next() % from.len() as u64) as usize]
    }
}

fn names(count: usize) -> Vec<String> {
    let chats = [
        "Alice+Bob+User",
        "Alice+User",
        "chat-2026-11-21@12h03m",
        "Bob+Carol+Dave+Eve+User",
        "a chat id with spaces",
        "Saltmere_harbor_character_story",
    ];
    let unicode_chats = [
        "Алиса+Пользователь",
        "アリス+ユーザー",
        "Zoë+Łukasz+User",
        "🐉+Drachen",
    ];
    let characters = ["Alice", "Bob", "Carol", "Dave Marlowe", "Eve_the_Second"];
    let unicode_characters = ["Алиса", "アリス", "Zoë", "Łukasz", "Drache 🐉"];
    let tags = [
        "before-trip",
        "checkpoint 3",
        "preload",
        "manual",
        "evening",
    ];
    let junk = [
        "notes.bin",
        "Alice_character_Bob.bin",
        "model-q4_k_m.gguf",
        "Alice+User_2026112_character_Alice.bin",
        "Alice+User_20261121120000_tag__character_Alice.bin",
        "Alice+User_20261121120000_character_.bin",
        ".tmp-kvgate-1234.bin",
        "plain-file-name-without-any-stamp-at-all.bin",
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let base = 1_700_000_000u64;
    (0..count)
        .map(|_| {
            let unix = base + rng.next() % 100_000_000;
            match rng.next() % 100 {
                0..=39 => file_name(rng.pick(&chats), unix, None, rng.pick(&characters)),
                40..=64 => file_name(
                    rng.pick(&chats),
                    unix,
                    Some(rng.pick(&tags)),
                    rng.pick(&characters),
                ),
                65..=84 => {
                    let tag = (rng.next() % 3 == 0).then(|| rng.pick(&tags));
                    file_name(
                        rng.pick(&unicode_chats),
                        unix,
                        tag,
                        rng.pick(&unicode_characters),
                    )
                }
                _ => rng.pick(&junk).to_string(),
            }
        })
        .collect()
}

fn bench_parse_name(c: &mut Criterion) {
    let names = names(10_000);
    let parsed = names.iter().filter(|n| parse_name(n).is_some()).count();
    assert!(
        (8_000..9_000).contains(&parsed),
        "unexpected mix: {parsed} of 10,000 names parse"
    );
    let mut g = c.benchmark_group("parse_name");
    g.sample_size(50);
    g.throughput(Throughput::Elements(names.len() as u64));
    g.bench_function("10k", |b| {
        b.iter(|| {
            let mut ok = 0usize;
            for n in &names {
                if parse_name(black_box(n)).is_some() {
                    ok += 1;
                }
            }
            black_box(ok)
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .without_plots()
}

/// What making a save durable adds after llama-server wrote it: a 50 MB
/// file (a slot of the group_chat bench's model) renamed into place as
/// before, against synced, renamed and its directory synced, as
/// `CacheStore::commit` does now. The file is written (unsynced) outside
/// the timing, as llama-server writes it.
fn bench_durability(c: &mut Criterion) {
    const SIZE: usize = 50 << 20;
    let dir = tempfile::tempdir().expect("temp dir");
    let data = vec![0x5au8; SIZE];
    let mut g = c.benchmark_group("durability");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    let written = || {
        let tmp = dir.path().join(".kvgate-tmp-bench.bin");
        std::fs::write(&tmp, &data).expect("write");
        tmp
    };
    let kept = dir.path().join("save.bin");
    g.bench_function("rename/50MB", |b| {
        b.iter_batched(
            written,
            |tmp| std::fs::rename(tmp, &kept).expect("rename"),
            criterion::BatchSize::PerIteration,
        )
    });
    g.bench_function("sync_rename_sync_dir/50MB", |b| {
        b.iter_batched(
            written,
            |tmp| {
                std::fs::File::open(&tmp)
                    .and_then(|f| f.sync_all())
                    .expect("sync");
                std::fs::rename(&tmp, &kept).expect("rename");
                std::fs::File::open(dir.path())
                    .and_then(|d| d.sync_all())
                    .expect("sync dir");
            },
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group! {
    name = micro;
    config = config();
    targets = bench_slots, bench_identity, bench_parse_name, bench_durability
}
criterion_main!(micro);
