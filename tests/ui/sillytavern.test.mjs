// The real SillyTavern 1.19.0 web UI, in headless Chromium, through kvgate,
// to the real llama-server running the tiny random-weight model.
//
// Two runs, each on a fresh stack (kvgate with 2 llama-server slots, a
// fresh SillyTavern data root with 3 characters and a group of them, a fresh
// browser profile):
//   text: API Connections → Text Completion → llama.cpp → kvgate's URL
//   chat: API Connections → Chat Completion → Custom (OpenAI-compatible) →
//         kvgate's URL + /v1
// Both set through the API Connections panel as a person would; the
// generation settings (16-token replies, the context size, streaming, a
// fixed seed) come from settings.json, since sliders are impractical to
// drive (tests/ui/lib/sillytavern.mjs).
//
// Each run: the group chat (3 user messages naming every member, so all
// three answer each time and the 3 characters take turns on 2 slots), a
// member triggered from the group panel, a swipe, a continue, an
// impersonation, then a 1:1 chat with Alice. For every generation request
// SillyTavern sends (recorded in the page just before it goes out), kvgate's
// /events must name the character SillyTavern generated for, the right kind
// and a consistent chat key; a character that comes back after its slot
// went to another must find its cache again (llama-server's cache_n); every
// reply must land in SillyTavern's chat with no error toast, and the page
// must reach nothing but SillyTavern's own server.
//
// What kvgate can tell without the companion extension (README
// "Identity"): SillyTavern sends no chat, character or generation type, so
// kvgate reads them off the body. A swipe is the character's previous
// prompt again, which a regenerate is too: kvgate calls both a swipe. An
// impersonation is written with the card of a member SillyTavern picks at
// random, and kvgate runs it as that member. Two chats with the same roster
// (two 1:1 chats with Alice) share a chat key. The runs check what kvgate
// can tell; KNOWN_MISREADINGS lists where it reads SillyTavern 1.19 wrong.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { withRun, startKvgate, waitUntil } from './lib/stack.mjs';
import { writeDataRoot, startSillyTavern, sillyTavernVersion } from './lib/sillytavern.mjs';
import { openBrowser } from './lib/browser.mjs';
import { startRecorder, recordPath } from './lib/recorder.mjs';
import * as st from './lib/st-page.mjs';

const GROUP_CHAT = 'Alice+Bob+Carol+User'; // the sorted roster: README "Chat key"
const SOLO_CHAT = 'Alice+User';

// What kvgate is expected to call SillyTavern's generation types. A
// regenerate is identical on the wire to a swipe, so kvgate reads it as one
// (README "Identity"); the runs below do no regenerate.
const KIND = { normal: 'normal', swipe: 'swipe', continue: 'continue', impersonate: 'impersonate', regenerate: 'swipe' };

// Prompt tokens llama-server must take from the cache on a character's turn
// after its slot went to another character. Different characters' prompts
// share only their first few tokens ("Write ", plus the chat template's
// start in Chat Completion: under 40 tokens with this byte-level model),
// while a character's own card and examples alone are over 200 tokens.
const COMEBACK_MIN_CACHED = 100;

// kvgate readings known to differ from what SillyTavern did, by run and
// step label: the test asserts kvgate's current value for these (so a fix
// shows up as a failure asking to remove the entry) and prints them.
// Each is reported with the request SillyTavern sent.
const KNOWN_MISREADINGS = {
  // None at present. (Until commit 2979213 the Chat Completion 1:1 chat's
  // key was 'Alice+User+example_assistant+example_user': SillyTavern sends
  // the card's example dialogue as system messages named "example_user" /
  // "example_assistant", and kvgate counted those names into the roster.)
  // Shape: { chat: { 'solo-chat': { chat: '<what kvgate says>' } } }
};

const RUNS = {
  text: {
    // Text Completion counts tokens with llama-server's /tokenize, exactly:
    // SillyTavern's context can be the slot's context.
    slotCtx: 1024,
    stContext: 1024,
    connect: (page, url, shot) => st.connectTextCompletion(page, url, { screenshot: shot }),
    url: (front) => front,
    // The status shows the model llama-server serves (its /v1/models, through kvgate).
    connected: /demo-model\.gguf$/,
  },
  chat: {
    // Chat Completion counts tokens with a tiktoken-style tokenizer, about
    // 3 characters per token on this text, while the tiny model reads one
    // token per byte, and the chat template adds more: a 600-token context
    // in SillyTavern stays under 2000 tokens in a 4096-token slot.
    slotCtx: 4096,
    stContext: 600,
    connect: (page, url, shot) => st.connectChatCompletion(page, url, { screenshot: shot }),
    url: (front) => `${front}/v1`,
    // "Valid": /v1/models answered (through kvgate).
    connected: /^Valid$/,
  },
};

/** The scenario: [label, action, expected requests, check of ST's side]. */
function scenario(page) {
  const round = (text, names) => ({
    requests: names.length,
    action: () => st.sendMessage(page, text),
    // Natural order activates members in the order the message names them.
    names,
    check(before, after, reqs) {
      assert.equal(after.chat.length, before.chat.length + 1 + names.length, 'the user message and one reply per member');
      const added = after.chat.slice(before.chat.length);
      assert.equal(added[0].is_user, true);
      assert.equal(added[0].mes, text);
      assert.deepEqual(added.slice(1).map((m) => m.name), names, 'replies by the members named, in order');
      assert.deepEqual(reqs.map((r) => r.type), names.map(() => 'normal'));
    },
  });
  return [
    ['user-message-1', round('Good evening Alice, Bob and Carol! I came in on the coast road.', ['Alice', 'Bob', 'Carol'])],
    ['user-message-2', round('Carol, Alice and Bob: is the storm getting worse?', ['Carol', 'Alice', 'Bob'])],
    ['user-message-3', round('Bob, Carol and Alice, who keeps the lighthouse?', ['Bob', 'Carol', 'Alice'])],
    ['trigger-member', {
      requests: 1,
      action: () => st.triggerMember(page, 'Bob'),
      names: ['Bob'],
      check(before, after, reqs) {
        assert.equal(reqs[0].type, 'normal');
        assert.equal(after.chat.length, before.chat.length + 1);
        assert.equal(after.chat.at(-1).name, 'Bob');
      },
    }],
    ['swipe', {
      requests: 1,
      action: () => st.swipeLast(page),
      names: ['Bob'],
      check(before, after, reqs) {
        assert.equal(reqs[0].type, 'swipe');
        assert.equal(after.chat.length, before.chat.length, 'a swipe adds no message');
        assert.equal(after.chat.at(-1).name, 'Bob');
        assert.equal(after.chat.at(-1).swipes, Math.max(before.chat.at(-1).swipes, 1) + 1, 'one more swipe on the last message');
      },
    }],
    ['continue', {
      requests: 1,
      action: () => st.continueLast(page),
      names: ['Bob'],
      check(before, after, reqs) {
        assert.equal(reqs[0].type, 'continue');
        assert.equal(after.chat.length, before.chat.length, 'a continue adds no message');
        const [was, now] = [before.chat.at(-1).mes, after.chat.at(-1).mes];
        assert.ok(now.length > was.length && now.startsWith(was.trimEnd()),
          `the last message was extended: ${JSON.stringify(was)} -> ${JSON.stringify(now)}`);
      },
    }],
    ['impersonate', {
      requests: 1,
      action: () => st.impersonate(page),
      // Written with the card of a member SillyTavern picks at random.
      names: null,
      async check(before, after, reqs) {
        assert.equal(reqs[0].type, 'impersonate');
        assert.equal(after.chat.length, before.chat.length, 'an impersonation goes to the input box, not the chat');
        assert.ok((await st.inputText(page)).length > 0, 'the impersonated text is in the input box');
        await page.locator('#send_textarea').fill('');
      },
    }],
  ];
}

async function sillyTavernRun(api) {
  const cfg = RUNS[api];
  const known = KNOWN_MISREADINGS[api] ?? {};
  return withRun(`${api}-completion`, async (run) => {
    const kv = await startKvgate(run, { slots: 2, ctx: cfg.slotCtx });
    const version = sillyTavernVersion();
    const file = recordPath(api, version);
    const recorder = file ? await startRecorder(run, kv.frontUrl, { file }) : null;
    const backend = recorder ? recorder.url : kv.frontUrl;

    const data = writeDataRoot(run.mkdir('st-data', { bulky: true }), {
      api, settings: { contextTokens: cfg.stContext, responseTokens: 16 },
    });
    const server = await startSillyTavern(run, data);
    const browser = await openBrowser(run, { allowedOrigins: [server.url], viewport: { width: 1400, height: 1000 } });
    const { page } = browser;

    await st.openSillyTavern(page, server.url);
    const status = await cfg.connect(page, cfg.url(backend), browser.screenshot);
    run.log(`connected: ${status}`);
    assert.match(status, cfg.connected, 'the API Connections status after Connect');

    const turns = [];
    const label = (l) => { if (recorder) recorder.label = l; };

    /** One step: act, wait for SillyTavern and kvgate, check both. */
    async function step(name, s, expectChat) {
      const before = await st.stContext(page);
      const p0 = await st.requestCount(page);
      const e0 = kv.events.mark();
      label(name);
      const t0 = Date.now();
      await s.action();
      const probe = await st.waitGenerations(page, p0, s.requests);
      const reqs = probe.requests.slice(p0);
      assert.equal(reqs.length, s.requests, `${name}: SillyTavern sent ${reqs.length} generation requests`);
      await waitUntil(`${name}: kvgate to finish ${s.requests} generations`,
        () => kv.events.of('generation_finished', e0).length >= s.requests, { timeoutMs: 30000 });
      const started = kv.events.of('generation_started', e0);
      const finished = kv.events.of('generation_finished', e0);
      assert.equal(started.length, s.requests, `${name}: kvgate started ${started.length} generations`);
      const after = await st.stContext(page);
      if (s.names) assert.deepEqual(reqs.map((r) => r.name2), s.names, `${name}: characters SillyTavern generated for`);
      await s.check(before, after, reqs);

      for (let i = 0; i < reqs.length; i++) {
        const turn = { label: name, st: reqs[i], started: started[i], finished: finished[i], expectChat };
        turns.push(turn);
        const c = turn.started;
        run.log(`${name}: ST ${reqs[i].type} as ${reqs[i].name2} -> kvgate slot ${c.slot} ${c.character} ${c.kind} ` +
          `${c.chat} (${c.source}, cache ${c.cache}; cache_n ${turn.finished.cache_n}, prompt_n ${turn.finished.prompt_n})`);
        checkIdentity(turn, known[name]);
      }
      assert.deepEqual(await st.errorToasts(page), [], `${name}: no error toast`);
      // Every reply landed in the chat the page shows, not only in its data.
      const shown = await page.locator('#chat .mes').count();
      assert.equal(shown, after.chat.length, `${name}: the page shows every message`);
      for (const m of after.chat.slice(before.chat.length)) {
        assert.ok(m.mes.length > 0, `${name}: an empty message from ${m.name}`);
      }
      run.log(`${name}: ${reqs.length} generation(s) in ${Date.now() - t0} ms`);
    }

    const greetings = await st.openGroup(page, data.group.id, { greetings: 3 });
    assert.deepEqual(greetings.map((m) => m.name), ['Alice', 'Bob', 'Carol'], 'the group chat opens with the greetings');
    for (const [name, s] of scenario(page)) await step(name, s, GROUP_CHAT);
    await st.closeCharacterPanel(page);
    await browser.screenshot('group-chat');

    label('solo-open');
    const solo = await st.openCharacter(page, 'Alice');
    assert.equal(solo.length, 1, 'a new 1:1 chat with the greeting');
    await step('solo-chat', {
      requests: 1,
      action: () => st.sendMessage(page, 'Alice, now that the others are asleep: can I see the chart?'),
      names: ['Alice'],
      check(before, after, reqs) {
        assert.equal(reqs[0].group, null);
        assert.equal(reqs[0].type, 'normal');
        assert.equal(after.chat.length, before.chat.length + 2);
        assert.equal(after.chat.at(-1).name, 'Alice');
      },
    }, SOLO_CHAT);
    await st.closeCharacterPanel(page);
    await browser.screenshot('solo-chat');

    checkComebacks(run, kv.events.list, turns);
    // kvgate ran no generation SillyTavern did not ask for (prefill ahead
    // is not a generation_started) and named every one.
    assert.equal(kv.events.of('generation_started').length, turns.length, 'generations kvgate started');
    for (const t of (await st.readProbe(page)).toasts) run.log(`toast ${t.cls}: ${t.text}`);
    run.log(`kvgate events: ${summarize(kv.events.list)}`);
    browser.assertClean();
    if (recorder) {
      const gens = recorder.requests.filter((r) => r.method === 'POST' && /completion/.test(r.path));
      assert.equal(gens.length, turns.length, 'the recording holds every generation request');
    }
    run.log(`${turns.length} generations checked`);
  });
}

/** `type×count` of a list of kvgate events, for the log. */
function summarize(events) {
  const n = new Map();
  for (const e of events) n.set(e.type, (n.get(e.type) ?? 0) + 1);
  return [...n].map(([t, c]) => `${t}x${c}`).join(' ');
}

/**
 * kvgate's reading of one generation against what SillyTavern did: the
 * character it generated for (`name2`: in a group the drafted member; for
 * an impersonation the member whose card wrote the prompt), the kind, the
 * chat key, an inferred identity, and a completed 200 answer.
 */
function checkIdentity(turn, known = {}) {
  const { st: req, started, finished, expectChat, label } = turn;
  const want = {
    character: req.name2,
    kind: KIND[req.type],
    chat: expectChat,
  };
  for (const field of Object.keys(want)) {
    if (field in known) {
      assert.equal(started[field], known[field],
        `${label}: kvgate's known misreading of ${field} changed (was ${known[field]}, want ${want[field]}): update KNOWN_MISREADINGS`);
      console.log(`KNOWN MISREADING ${label}: kvgate ${field} ${started[field]}, SillyTavern's is ${want[field]}`);
    } else {
      assert.equal(started[field], want[field], `${label}: kvgate's ${field} for SillyTavern's ${req.type} as ${req.name2}`);
    }
  }
  assert.equal(started.source, 'inferred', `${label}: identity read off the prompt`);
  assert.equal(started.status, 200, `${label}: llama-server's status`);
  assert.equal(finished.character, started.character);
  assert.equal(finished.outcome, 'completed', `${label}: the generation completed`);
}

/**
 * Walks kvgate's events in order: after an `evicted` of a character (its
 * slot went to another), that character's next turn is a comeback, which
 * must find its cache again, from llama-server's RAM cache, a disk
 * restore, or a prefill ahead of its turn: `cache` not `none` and
 * llama-server's `cache_n` at least COMEBACK_MIN_CACHED. There must be
 * comebacks: 3 characters share 2 slots.
 */
function checkComebacks(run, events, turns) {
  const byStart = new Map(turns.map((t) => [t.started.seq, t]));
  const evicted = new Set();
  const comebacks = [];
  for (const ev of events) {
    const key = `${ev.chat}\u0000${ev.character}`;
    if (ev.type === 'evicted') evicted.add(key);
    if (ev.type === 'generation_started' && byStart.has(ev.seq)) {
      if (evicted.delete(key)) comebacks.push(byStart.get(ev.seq));
    }
  }
  for (const t of comebacks) {
    run.log(`comeback ${t.label}: ${t.started.character} cache ${t.started.cache}, cache_n ${t.finished.cache_n}, prompt_n ${t.finished.prompt_n}`);
  }
  assert.ok(comebacks.length >= 2, `characters came back after an eviction ${comebacks.length} times`);
  for (const t of comebacks) {
    assert.notEqual(t.started.cache, 'none', `${t.label}: ${t.started.character} came back with no cache`);
    assert.ok(t.finished.cache_n >= COMEBACK_MIN_CACHED,
      `${t.label}: ${t.started.character} came back with cache_n ${t.finished.cache_n} < ${COMEBACK_MIN_CACHED}`);
  }
}

test('SillyTavern Text Completion (llama.cpp) through kvgate', { timeout: 300000 }, () => sillyTavernRun('text'));

test('SillyTavern Chat Completion (Custom, OpenAI-compatible) through kvgate', { timeout: 300000 }, () => sillyTavernRun('chat'));
