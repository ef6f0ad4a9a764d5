// The real SillyTavern 1.19.0 with kvgate's companion extension
// (clients/sillytavern/) installed, clicked through like a user, checked
// against kvgate itself: its /events, its admin API and the files in its
// save directory.
//
// Each run starts a fresh stack: kvgate (2 llama-server slots, the tiny
// byte-level model, `--admin-cors-origin` = SillyTavern's origin, so the
// page may call the admin port), a SillyTavern data root with 3 characters,
// a group of them and the extension in the user's extensions folder (its
// admin URL preset in settings.json, as a user would type it once), and
// Chromium that may reach only SillyTavern and kvgate's admin port.
//
// text (Text Completion → llama.cpp), the full click-through:
//   1. group preload: a member muted in ST's group panel is unticked; search
//      and "Select all"; a cancel while the prompts are built sends kvgate
//      nothing; a run builds each member's own prompt (swap-cards mode: each
//      starts with the member's own card), kvgate evaluates and saves it
//      (kind `preload`): the saved files' tokens decode to those prompts;
//   2. group turns (messages, trigger, swipe, continue, impersonate, the
//      options menu's Regenerate), a 1:1 chat (a turn, a regenerate) and a
//      second chat with the same character: every generation reaches kvgate
//      with explicit identity (character, kind, `group:<chat id>` or ST's
//      chat id), a group regenerate as `regenerate`, not `swipe`;
//   3. the drawer: the event stream dot, the indicator against GET /slots,
//      Save with tag, Save now, the slot list and a slot's own save (each
//      checked in GET /saves and on disk), kvgate's live settings;
//   4. the load popup: this chat first and marked, search, a tagged save of
//      this chat plus another chat's save loaded together (GET /slots);
//      restore toasts, and none while toasts are off; Clear all slots.
// chat (Chat Completion → Custom at kvgate's /v1), shorter: a group round,
//   a swipe and a 1:1 turn with explicit identity (X-Kvgate-* headers).
// Both: nothing outside SillyTavern's and kvgate's admin origins is
// requested, no page error, no console error, no error toast.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import { REPO, freePort, getJson, startKvgate, waitUntil, withRun } from './lib/stack.mjs';
import { DEFAULT_CHARACTERS, startSillyTavern, writeDataRoot } from './lib/sillytavern.mjs';
import { openBrowser } from './lib/browser.mjs';
import * as st from './lib/st-page.mjs';

const EXTENSION = path.join(REPO, 'clients/sillytavern');
const TAG = 'before the duel';
const DESCRIPTIONS = Object.fromEntries(DEFAULT_CHARACTERS.map((c) => [c.name, c.description]));

// ------------------------------------------------------------ helpers

/** kvgate's chat key for what SillyTavern's page had open (the extension's rule). */
function chatKeyOf({ groupId, group, chatId }) {
  return (groupId ?? group) ? `group:${chatId}` : chatId;
}

/**
 * The text a llama-server slot file holds (header only: see
 * src/llama/slot_file.rs), decoded with the tiny model's byte vocabulary
 * (src/demo/tiny_model.rs: 0 <unk>, 1 <s>, 2 </s>, 3+b the byte b, 259 "▁"
 * for a space). Special tokens are dropped.
 */
function slotFileText(file) {
  const buf = fs.readFileSync(file);
  assert.equal(buf.readUInt32LE(0), 0x67677371, `${file}: ggsq magic`);
  const nPacked = buf.readUInt32LE(8);
  let at = 12;
  let n = nPacked;
  if (nPacked > 0 && buf.readInt32LE(12) === -1) {
    // The server-tokens state: marker, version 1, n_tokens, tokens.
    assert.equal(buf.readUInt32LE(16), 1, `${file}: token state version`);
    n = buf.readUInt32LE(20);
    at = 24;
  }
  const bytes = [];
  for (let i = 0; i < n; i++) {
    const t = buf.readInt32LE(at + 4 * i);
    if (t === 259) bytes.push(0x20);
    else if (t >= 3 && t <= 258) bytes.push(t - 3);
  }
  return Buffer.from(bytes).toString('utf8');
}

/** Every save GET /saves lists, flat: [{chat, character, file, kind, tag, tokens, created}]. */
async function allSaves(adminUrl, q) {
  const { chats } = await getJson(`${adminUrl}/saves${q ? `?q=${encodeURIComponent(q)}` : ''}`);
  return chats.flatMap((c) => c.characters.flatMap((ch) => ch.saves.map((s) => ({ ...s, chat: c.chat, character: ch.character }))));
}

/** A save file and its sidecar are in kvgate's save directory. */
function assertOnDisk(saveDir, file, what) {
  assert.ok(fs.existsSync(path.join(saveDir, file)), `${what}: ${file} is in ${saveDir}`);
  const meta = path.join(saveDir, file.replace(/\.bin$/, '.meta.json'));
  assert.ok(fs.existsSync(meta), `${what}: ${file}'s sidecar is in ${saveDir}`);
  return JSON.parse(fs.readFileSync(meta, 'utf8'));
}

/** The page's toasts (the probe records each as it appears) from index `from` on. */
async function toastsSince(page, from) {
  return (await st.readProbe(page)).toasts.slice(from);
}

async function toastCount(page) {
  return (await st.readProbe(page)).toasts.length;
}

/** Waits for a toast (from index `from` on) whose text matches `re`; returns it. */
async function waitToast(page, from, re, what, timeoutMs = 15000) {
  return waitUntil(`a toast ${re} (${what})`,
    async () => (await toastsSince(page, from)).find((t) => re.test(t.text)), { timeoutMs, everyMs: 100 });
}

/**
 * A screenshot of `locator` with no toast over it: the toasts so far are
 * removed at once (toastr.remove; the probe has recorded them already).
 */
async function shot(ctx, name, locator) {
  await ctx.page.evaluate(() => globalThis.toastr.remove());
  await locator.scrollIntoViewIfNeeded();
  return ctx.browser.screenshot(name, locator);
}

/** The open ST popup (a <dialog>) holding `inner`, or the top one. */
function popup(page, inner) {
  return inner
    ? page.locator('dialog.popup[open]', { has: page.locator(inner) })
    : page.locator('dialog.popup[open]').last();
}

/** Extensions panel (the cubes icon) open, kvgate's drawer in it expanded. */
async function openDrawer(page) {
  if (!(await page.locator('#rm_extensions_block').isVisible())) {
    await page.locator('#extensions-settings-button .drawer-toggle').click();
    await page.locator('#rm_extensions_block').waitFor({ state: 'visible' });
  }
  const content = page.locator('#kvgate_settings .inline-drawer-content');
  if (!(await content.isVisible())) {
    await page.locator('#kvgate_drawer_header').click();
    await content.waitFor({ state: 'visible' });
  }
}

/** Closes the Extensions panel, which covers the chat. */
async function closeDrawer(page) {
  if (await page.locator('#rm_extensions_block').isVisible()) {
    await page.locator('#extensions-settings-button .drawer-toggle').click();
    await page.locator('#rm_extensions_block').waitFor({ state: 'hidden' });
  }
}

/** ST's group panel: the member's "disable"/"enable" (mute) button. */
async function setMuted(page, name, muted) {
  if (!(await page.locator('#rm_group_members').isVisible())) {
    await page.locator('#rightNavDrawerIcon').click();
  }
  const member = page.locator('#rm_group_members .group_member', { has: page.locator('.ch_name', { hasText: new RegExp(`^${name}$`) }) });
  await member.locator(`[data-action="${muted ? 'disable' : 'enable'}"]`).click();
  await page.waitForFunction(([n, m]) => {
    const c = SillyTavern.getContext();
    const g = c.groups.find((x) => String(x.id) === String(c.groupId));
    const avatar = c.characters.find((x) => x.name === n)?.avatar;
    return g && g.disabled_members.includes(avatar) === m;
  }, [name, muted]);
}

/** The slot GET /slots shows holding `name`: this chat's first, else any chat's (as the indicator picks). */
function slotHolding(slots, name, chatKey) {
  const holds = (s) => s.character === name || (s.also_holds ?? []).includes(name);
  return slots.find((s) => holds(s) && s.chat === chatKey) ?? slots.find(holds) ?? null;
}

/** `type×count` of a list of kvgate events, for the log. */
function summarize(events) {
  const n = new Map();
  for (const e of events) n.set(e.type, (n.get(e.type) ?? 0) + 1);
  return [...n].map(([t, c]) => `${t}x${c}`).join(' ');
}

/**
 * The stack for one run: kvgate first (SillyTavern's origin, chosen ahead,
 * goes into its --admin-cors-origin), then the data root with the extension
 * and its admin URL, SillyTavern on that origin, and the browser.
 */
async function startStack(run, { api, slotCtx, stContext }) {
  const stPort = await freePort();
  const stOrigin = `http://127.0.0.1:${stPort}`;
  const kv = await startKvgate(run, { slots: 2, ctx: slotCtx, args: ['--admin-cors-origin', stOrigin] });
  const data = writeDataRoot(run.mkdir('st-data', { bulky: true }), {
    api,
    extensions: [EXTENSION],
    settings: {
      contextTokens: stContext,
      responseTokens: 16,
      extensionSettings: { kvgate: { adminUrl: kv.adminUrl } },
    },
  });
  const server = await startSillyTavern(run, data, { port: stPort });
  assert.equal(server.origin, stOrigin);
  const browser = await openBrowser(run, {
    allowedOrigins: [server.url, kv.adminUrl],
    viewport: { width: 1400, height: 1000 },
  });
  await st.openSillyTavern(browser.page, server.url);
  // The extension mounted its drawer (it fetches settings.html first).
  await browser.page.locator('#kvgate_settings').waitFor({ state: 'attached', timeout: 20000 });
  return { kv, data, server, browser, page: browser.page };
}

/**
 * A generation step: `action`, then SillyTavern sends `kinds.length`
 * requests; each must reach kvgate as an explicit identity naming the
 * character SillyTavern generated for (the probe's name2), kvgate's kind
 * `kinds[i]`, and the chat key of the chat the page has open. Returns the
 * probe's requests and kvgate's generation_started events.
 */
async function generation(ctx, label, action, { kinds, names = null }) {
  const { page, kv, run } = ctx;
  const before = await st.stContext(page);
  const key = chatKeyOf(before);
  const p0 = await st.requestCount(page);
  const e0 = kv.events.mark();
  const t0 = Date.now();
  await action();
  const probe = await st.waitGenerations(page, p0, kinds.length);
  const reqs = probe.requests.slice(p0);
  assert.equal(reqs.length, kinds.length, `${label}: SillyTavern sent ${reqs.length} generation requests`);
  await waitUntil(`${label}: kvgate to finish ${kinds.length} generations`,
    () => kv.events.of('generation_finished', e0).length >= kinds.length, { timeoutMs: 30000 });
  const started = kv.events.of('generation_started', e0);
  const finished = kv.events.of('generation_finished', e0);
  assert.equal(started.length, kinds.length, `${label}: kvgate started ${started.length} generations`);
  if (names) assert.deepEqual(reqs.map((r) => r.name2), names, `${label}: characters SillyTavern generated for`);
  for (let i = 0; i < reqs.length; i++) {
    const [r, s, f] = [reqs[i], started[i], finished[i]];
    run.log(`${label}: ST ${r.type} as ${r.name2} -> kvgate ${s.source} ${s.character} ${s.kind} ${s.chat} slot ${s.slot} (cache ${s.cache}, cache_n ${f.cache_n})`);
    assert.equal(s.source, 'explicit', `${label}: the extension named the generation`);
    assert.equal(s.character, r.name2, `${label}: kvgate's character for SillyTavern's ${r.type} as ${r.name2}`);
    assert.equal(s.kind, kinds[i], `${label}: kvgate's kind for SillyTavern's ${r.type}`);
    assert.equal(s.chat, chatKeyOf(r), `${label}: kvgate's chat key is the one of the chat SillyTavern generated in`);
    assert.equal(s.chat, key, `${label}: kvgate's chat key is the chat the page shows`);
    assert.equal(s.status, 200, `${label}: llama-server's status`);
    assert.equal(f.character, s.character);
    assert.equal(f.outcome, 'completed', `${label}: the generation completed`);
  }
  assert.deepEqual(await st.errorToasts(page), [], `${label}: no error toast`);
  ctx.generations += kinds.length;
  run.log(`${label}: ${kinds.length} generation(s) in ${Date.now() - t0} ms`);
  return { reqs, started, before, after: await st.stContext(page) };
}

// ------------------------------------------------------- the text run

async function textRun() {
  return withRun('extension', async (run) => {
    const { kv, data, server, browser, page } = await startStack(run, { api: 'text', slotCtx: 1024, stContext: 1024 });
    const ctx = { page, kv, run, browser, generations: 0 };
    const status = await st.connectTextCompletion(page, kv.frontUrl);
    assert.match(status, /demo-model\.gguf$/, 'connected to llama-server through kvgate');

    await st.openGroup(page, data.group.id, { greetings: 3 });
    const group = await st.stContext(page);
    const groupKey = `group:${group.chatId}`;
    run.log(`group chat ${groupKey}`);

    // ---- the drawer is there and follows kvgate's event stream (the admin
    // port answered the page's CORS preflight for SillyTavern's origin).
    await setMuted(page, 'Carol', true);
    await openDrawer(page);
    await page.waitForSelector('#kvgate_stream_state[data-state="connected"]', { timeout: 15000 });
    assert.ok((await page.locator('#kvgate_cors_hint').innerText()).includes(`--admin-cors-origin ${server.origin} `),
      'the drawer names the origin to start kvgate with');

    // ---- 1. group preload, before any save exists: every member's prompt
    // must be evaluated, so what kvgate saved shows which prompt it got.
    await preload(ctx, { groupKey, muted: 'Carol' });
    await setMuted(page, 'Carol', false);

    // ---- 2. group turns: 3 characters take turns on 2 slots.
    await closeDrawer(page);
    const all = ['normal', 'normal', 'normal'];
    await generation(ctx, 'message-1', () => st.sendMessage(page, 'Good evening Alice, Bob and Carol! I came in on the coast road.'),
      { kinds: all, names: ['Alice', 'Bob', 'Carol'] });
    await generation(ctx, 'message-2', () => st.sendMessage(page, 'Carol, Alice and Bob: is the storm getting worse?'),
      { kinds: all, names: ['Carol', 'Alice', 'Bob'] });
    await generation(ctx, 'trigger', () => st.triggerMember(page, 'Bob'), { kinds: ['normal'], names: ['Bob'] });
    const swipe = await generation(ctx, 'swipe', () => st.swipeLast(page), { kinds: ['swipe'], names: ['Bob'] });
    assert.equal(swipe.after.chat.length, swipe.before.chat.length, 'a swipe adds no message');
    await generation(ctx, 'continue', () => st.continueLast(page), { kinds: ['continue'], names: ['Bob'] });
    // Written with the card of a member SillyTavern picks at random: the
    // check is that kvgate was told that member (the probe's name2).
    const imp = await generation(ctx, 'impersonate', () => st.impersonate(page), { kinds: ['impersonate'] });
    assert.ok((await st.inputText(page)).length > 0, 'the impersonated text is in the input box');
    run.log(`impersonated with ${imp.reqs[0].name2}'s card`);
    await page.locator('#send_textarea').fill('');
    await generation(ctx, 'message-3', () => st.sendMessage(page, 'Bob, Carol and Alice, who keeps the lighthouse?'),
      { kinds: all, names: ['Bob', 'Carol', 'Alice'] });
    // Options → Regenerate in a group: ST deletes the round's 3 replies and
    // runs the group again as 'normal' (its probe type); the extension tells
    // kvgate it is a regenerate, which kvgate alone reads as a swipe.
    const regen = await generation(ctx, 'regenerate', () => st.regenerate(page),
      { kinds: ['regenerate', 'regenerate', 'regenerate'], names: ['Bob', 'Carol', 'Alice'] });
    assert.deepEqual(regen.reqs.map((r) => r.type), ['normal', 'normal', 'normal'], 'ST runs a group regenerate as normal turns');
    assert.equal(regen.after.chat.length, regen.before.chat.length, 'the regenerated round replaced the old one');

    // ---- 3. the drawer in the group chat.
    await openDrawer(page);
    await checkIndicator(ctx, { groupKey, names: ['Alice', 'Bob', 'Carol'] });
    const tagged = await saveWithTag(ctx);
    await saveNow(ctx);
    await slotList(ctx);
    await liveSettings(ctx);
    // The whole drawer is taller than the window: a taller window for it.
    await page.setViewportSize({ width: 1400, height: 2000 });
    await shot(ctx, 'settings', page.locator('#kvgate_settings'));
    await page.setViewportSize({ width: 1400, height: 1000 });

    // ---- 4. 1:1 chats with Alice. save_every 1 without idle saves (just
    // applied): every turn autosaves, and the autosave of this chat toasts.
    await closeDrawer(page);
    await st.openCharacter(page, 'Alice');
    const solo1 = await st.stContext(page);
    const t = await toastCount(page);
    await generation(ctx, 'solo-1', () => st.sendMessage(page, 'Alice, now that the others are asleep: can I see the chart?'),
      { kinds: ['normal'], names: ['Alice'] });
    const autosaveToast = await waitToast(page, t, /Alice: autosave save, \d+ tokens/, 'autosave of this chat');
    run.log(`toast: ${autosaveToast.text.replace(/\n/g, ' | ')}`);
    await generation(ctx, 'solo-1-regenerate', () => st.regenerate(page), { kinds: ['regenerate'], names: ['Alice'] });
    await st.startNewChat(page);
    const solo2 = await st.stContext(page);
    assert.equal(solo2.name2, 'Alice');
    assert.notEqual(solo2.chatId, solo1.chatId, 'a new chat with Alice has its own chat id');
    const second = await generation(ctx, 'solo-2', () => st.sendMessage(page, 'Alice, a new evening: which road is dry?'),
      { kinds: ['normal'], names: ['Alice'] });
    // Same roster (Alice+User), two chats: kvgate keeps them apart.
    assert.equal(second.started[0].chat, solo2.chatId);
    assert.notEqual(second.started[0].chat, solo1.chatId, 'two chats with the same roster are two chats to kvgate');
    const solo1Save = await waitUntil('an autosave of Alice in the first 1:1 chat', async () =>
      (await allSaves(kv.adminUrl)).find((s) => s.chat === solo1.chatId && s.character === 'Alice'));

    // ---- 5. back in the group: the load popup, restore toasts, clear.
    await st.openGroup(page, data.group.id, { greetings: 3 });
    assert.equal((await st.stContext(page)).chatId, group.chatId, 'the group chat opens again');
    await openDrawer(page);
    await loadPopup(ctx, { groupKey, tagged, solo1Key: solo1.chatId, solo1Save });
    await toastSwitch(ctx, { groupKey, tagged });
    await clearAll(ctx);

    // ---- the whole run.
    // kvgate ran exactly the generations SillyTavern asked for: none from
    // the preload's prompt building (those requests were stopped in the page).
    assert.equal(kv.events.of('generation_started').length, ctx.generations, 'generations kvgate started');
    assert.ok(kv.events.of('generation_started').every((e) => e.source === 'explicit'), 'every generation had explicit identity');
    for (const x of (await st.readProbe(page)).toasts) run.log(`toast ${x.cls}: ${x.text.replace(/\n/g, ' | ')}`);
    assert.deepEqual(await st.errorToasts(page), [], 'no error toast');
    assert.equal(await page.locator('.toast-error').count(), 0, 'no error toast on the page');
    run.log(`kvgate events: ${summarize(kv.events.list)}`);
    browser.assertClean();
  });
}

/**
 * The group preload popup: members listed, the muted one unticked, search,
 * select all, a cancel while prompts are built, then a run to the end.
 */
async function preload(ctx, { groupKey, muted }) {
  const { page, kv, run } = ctx;
  await page.locator('#kvgate_preload').click();
  const pop = popup(page, '#kvgate_preload_popup');
  await pop.waitFor();
  const boxes = pop.locator('[data-kvgate="preload-member"]');
  const members = await boxes.evaluateAll((els) => els.map((b) => ({ name: b.dataset.name, checked: b.checked, muted: b.dataset.muted === 'true' })));
  assert.deepEqual(members, ['Alice', 'Bob', 'Carol'].map((name) => ({ name, checked: name !== muted, muted: name === muted })),
    'every member listed, the muted one unticked');
  assert.equal(await pop.locator('#kvgate_preload_all').isChecked(), false, '"Select all" is off while a member is unticked');

  // Search filters the list.
  await pop.locator('#kvgate_preload_search').fill('car');
  const shown = async () => boxes.evaluateAll((els) => els.filter((b) => b.offsetParent !== null).map((b) => b.dataset.name));
  assert.deepEqual(await shown(), ['Carol'], 'search "car" shows Carol only');
  await pop.locator('#kvgate_preload_search').fill('');
  assert.deepEqual(await shown(), ['Alice', 'Bob', 'Carol']);
  await pop.locator('#kvgate_preload_all').check();
  assert.deepEqual(await boxes.evaluateAll((els) => els.map((b) => b.checked)), [true, true, true], 'select all ticks every member');

  const progress = pop.locator('#kvgate_preload_progress');
  const state = () => progress.getAttribute('data-state');

  // Cancel while the members' prompts are built (a quiet generation per
  // member, stopped in the page): nothing may reach kvgate, no job starts.
  let e0 = kv.events.mark();
  let p0 = await st.requestCount(page);
  await pop.locator('#kvgate_preload_start').click();
  await pop.locator('#kvgate_preload_cancel').click();
  await waitUntil('the preload to stop', async () => ['cancelled', 'done', 'failed'].includes(await state()));
  assert.equal(await state(), 'cancelled', 'Cancel stopped the preload');
  await st.waitGenerations(page, p0, 0); // ST idle again
  const cancelledPrompts = (await st.readProbe(page)).requests.slice(p0);
  run.log(`cancel: ${cancelledPrompts.length} prompt(s) built before the cancel`);
  assert.ok(cancelledPrompts.length < 3, `the cancel came before every prompt was built (${cancelledPrompts.length})`);
  assert.ok(cancelledPrompts.every((r) => r.type === 'quiet'));
  await new Promise((r) => setTimeout(r, 500));
  assert.deepEqual(kv.events.list.slice(e0).filter((e) => ['preload_progress', 'generation_started'].includes(e.type)), [],
    'a preload cancelled while building prompts sends kvgate nothing');

  // The real run.
  e0 = kv.events.mark();
  p0 = await st.requestCount(page);
  // Every text the progress line takes, recorded in the page as it changes
  // (each change follows a network answer, so none is batched away).
  await pop.locator('#kvgate_preload_current').evaluate((el) => {
    window.__kvgatePreloadSeen = [];
    new MutationObserver(() => window.__kvgatePreloadSeen.push(el.textContent))
      .observe(el, { childList: true, characterData: true, subtree: true });
  });
  const t0 = Date.now();
  await pop.locator('#kvgate_preload_start').click();
  await waitUntil('the preload to finish', async () => ['done', 'cancelled', 'failed'].includes(await state()),
    { timeoutMs: 60000, everyMs: 100 });
  const seen = [...new Set(await page.evaluate(() => window.__kvgatePreloadSeen))];
  run.log(`preload: ${Date.now() - t0} ms; progress showed ${seen.join(' / ')}`);
  assert.equal(await state(), 'done');
  // The member being worked on, while kvgate works on it.
  for (const [i, name] of ['Alice', 'Bob', 'Carol'].entries()) {
    assert.ok(seen.includes(`Building ${name}'s prompt…`), `the progress showed ${name}'s prompt being built (${seen.join(' / ')})`);
    assert.ok(seen.includes(`${name} (${i + 1} of 3)`), `the progress named ${name} while kvgate worked on it (${seen.join(' / ')})`);
  }
  assert.equal(seen.at(-1), 'Done.');
  const done = await pop.locator('[data-kvgate="preload-done-item"]').evaluateAll((els) => els.map((e) => [e.dataset.character, e.textContent]));
  assert.deepEqual(done.map(([c]) => c), ['Alice', 'Bob', 'Carol'], 'the done list shows each member');
  assert.equal(await pop.locator('[data-kvgate="preload-failed-item"]').count(), 0, 'no member failed');
  assert.equal(await pop.locator('#kvgate_preload_bar').evaluate((b) => `${b.value}/${b.max}`), '3/3');
  await shot(ctx, 'preload-popup', pop);

  // kvgate's side: one job for this chat, done, every member evaluated and
  // saved (kind preload), and no generation ran.
  const progressEvents = kv.events.of('preload_progress', e0);
  assert.ok(progressEvents.length >= 4, 'preload_progress events');
  const jobId = progressEvents[0].id;
  assert.ok(progressEvents.every((e) => e.id === jobId && e.chat === groupKey), 'one job, for this group chat');
  assert.deepEqual(progressEvents.filter((e) => e.current).map((e) => e.current).filter((c, i, a) => a.indexOf(c) === i),
    ['Alice', 'Bob', 'Carol'], 'the job worked through the members in order');
  const job = await getJson(`${kv.adminUrl}/preload/${jobId}`);
  assert.equal(job.state, 'done');
  assert.equal(job.done, 3);
  assert.deepEqual(job.succeeded.map((s) => s.character), ['Alice', 'Bob', 'Carol']);
  for (const s of job.succeeded) assert.match(s.result, /^evaluated \d+ tokens in slot \d, saved /, `${s.character}: evaluated and saved`);
  assert.deepEqual(job.failed, []);
  assert.equal(kv.events.of('generation_started', e0).length, 0, 'the prompts were built without a generation reaching kvgate');

  // Each member's prompt as ST built it for that member's turn (recorded in
  // the page) is what kvgate evaluated and saved: the save's tokens decode to
  // it, and in swap-cards mode it starts with the member's own card.
  const built = (await st.readProbe(page)).requests.slice(p0);
  assert.deepEqual(built.map((r) => [r.type, r.name2]), [['quiet', 'Alice'], ['quiet', 'Bob'], ['quiet', 'Carol']],
    'one prompt built per member, each for that member');
  const saves = (await allSaves(kv.adminUrl)).filter((s) => s.kind === 'preload');
  for (const r of built) {
    const save = saves.find((s) => s.character === r.name2);
    assert.ok(save, `a preload save of ${r.name2}`);
    assert.equal(save.chat, groupKey, `${r.name2}'s preload save belongs to the group chat`);
    const meta = assertOnDisk(kv.saveDir, save.file, `${r.name2}'s preload save`);
    assert.equal(meta.kind, 'preload');
    const text = slotFileText(path.join(kv.saveDir, save.file));
    assert.ok(text.startsWith(r.head), `${r.name2}'s save holds the prompt ST built for it: ${JSON.stringify(text.slice(0, 120))}`);
    const card = text.indexOf(DESCRIPTIONS[r.name2]);
    assert.ok(card >= 0 && card < 200, `${r.name2}'s prompt starts with its own card`);
    for (const other of Object.keys(DESCRIPTIONS).filter((n) => n !== r.name2)) {
      assert.ok(!text.includes(DESCRIPTIONS[other]), `${r.name2}'s prompt holds no card of ${other}`);
    }
  }
  await waitToast(page, 0, /kvgate: preload\n3 warmed up\./, 'the preload finished');
  await pop.locator('.popup-button-ok').click();
  await pop.waitFor({ state: 'detached' });
}

/** The indicator's rows against GET /slots (polled: it refreshes on kvgate's events). */
async function checkIndicator(ctx, { groupKey, names }) {
  const { page, kv } = ctx;
  let last;
  await waitUntil('the indicator to show GET /slots', async () => {
    const { slots } = await getJson(`${kv.adminUrl}/slots`);
    const rows = await page.locator('[data-kvgate="indicator-row"]').evaluateAll((els) => els.map((e) => [e.dataset.character, e.dataset.slot]));
    const want = names.map((n) => [n, String(slotHolding(slots, n, groupKey)?.id ?? '')]);
    last = { rows, want };
    return JSON.stringify(rows) === JSON.stringify(want);
  }, { timeoutMs: 10000 }).catch((e) => { throw new Error(`${e.message}: ${JSON.stringify(last)}`); });
  ctx.run.log(`indicator: ${JSON.stringify(last.rows)}`);
  // 3 characters, 2 slots, all of this chat after the group turns.
  assert.equal(last.rows.filter(([, s]) => s !== '').length, 2, 'two of the three characters hold a slot');
  assert.equal(await page.locator('#kvgate_indicator_summary').innerText(), '2/3 in slots');
  await shot(ctx, 'indicator', page.locator('#kvgate_indicator'));
}

/** "Save with tag": the tag popup, a toast, GET /saves and the files. */
async function saveWithTag(ctx) {
  const { page, kv, run } = ctx;
  const { slots } = await getJson(`${kv.adminUrl}/slots`);
  const holders = slots.filter((s) => s.character).map((s) => s.character).sort();
  const t = await toastCount(page);
  await page.locator('#kvgate_save_tag').click();
  const pop = popup(page);
  await pop.locator('.popup-input').fill(TAG);
  await pop.locator('.popup-button-ok').click();
  const toast = await waitToast(page, t, /^kvgate: save "before the duel"/, 'save with tag');
  run.log(`toast: ${toast.text.replace(/\n/g, ' | ')}`);
  const tagged = (await allSaves(kv.adminUrl)).filter((s) => s.tag === TAG);
  assert.deepEqual(tagged.map((s) => s.character).sort(), holders, 'a tagged save of each character in a slot');
  for (const s of tagged) {
    assert.match(s.file, /_tag_before_the_duel_character_/, 'the tag is in the file name');
    assert.equal(s.kind, 'manual');
    const meta = assertOnDisk(kv.saveDir, s.file, 'tagged save');
    assert.equal(meta.tag, TAG);
    assert.ok(toast.text.includes(s.file), `the toast names ${s.file}`);
  }
  return tagged;
}

/** "Save now": new untagged manual saves of every character in a slot. */
async function saveNow(ctx) {
  const { page, kv, run } = ctx;
  const { slots } = await getJson(`${kv.adminUrl}/slots`);
  const holders = slots.filter((s) => s.character).map((s) => s.character).sort();
  const had = new Set((await allSaves(kv.adminUrl)).map((s) => s.file));
  const t = await toastCount(page);
  await page.locator('#kvgate_save_now').click();
  const toast = await waitToast(page, t, /^kvgate: save now\n/, 'save now');
  run.log(`toast: ${toast.text.replace(/\n/g, ' | ')}`);
  // (kvgate's idle saves may come meanwhile: kind idle, not manual.)
  const fresh = (await allSaves(kv.adminUrl)).filter((s) => !had.has(s.file) && s.kind === 'manual');
  assert.deepEqual(fresh.map((s) => s.character).sort(), holders, 'Save now saved each character in a slot');
  for (const s of fresh) {
    assert.equal(s.tag, null);
    assert.equal(s.kind, 'manual');
    assertOnDisk(kv.saveDir, s.file, 'Save now');
  }
  // Saving resets the counters.
  await waitUntil('the unsaved counters to be 0', async () =>
    (await getJson(`${kv.adminUrl}/slots`)).slots.every((s) => !s.character || s.messages_since_save === 0));
}

/** The slot list against GET /slots, and one slot's own save button. */
async function slotList(ctx) {
  const { page, kv, run } = ctx;
  let slots;
  await waitUntil('the slot list to show GET /slots', async () => {
    ({ slots } = await getJson(`${kv.adminUrl}/slots`));
    const rows = await page.locator('[data-kvgate="slot-row"]').evaluateAll((els) => els.map((e) => [e.dataset.slot, e.dataset.character]));
    return JSON.stringify(rows) === JSON.stringify(slots.map((s) => [String(s.id), s.character ?? '']));
  }, { timeoutMs: 10000 });
  await shot(ctx, 'slots', page.locator('#kvgate_slots'));
  const slot = slots.find((s) => s.character);
  const had = new Set((await allSaves(kv.adminUrl)).map((s) => s.file));
  const e0 = kv.events.mark();
  const t = await toastCount(page);
  await page.locator(`[data-kvgate="slot-row"][data-slot="${slot.id}"] [data-kvgate="slot-save"]`).click();
  const toast = await waitToast(page, t, new RegExp(`^kvgate: save slot ${slot.id}\\n${slot.character}: `), 'save one slot');
  run.log(`toast: ${toast.text.replace(/\n/g, ' | ')}`);
  const fresh = (await allSaves(kv.adminUrl)).filter((s) => !had.has(s.file) && s.kind === 'manual');
  assert.deepEqual(fresh.map((s) => s.character), [slot.character], `slot ${slot.id}'s save button saved ${slot.character} only`);
  assertOnDisk(kv.saveDir, fresh[0].file, 'slot save');
  const saved = kv.events.of('saved', e0);
  assert.ok(saved.some((e) => e.slot === slot.id && e.file === fresh[0].file), 'kvgate saved that slot');
}

/** kvgate's live settings: edit, Apply, GET /settings and the file. */
async function liveSettings(ctx) {
  const { page, kv, run } = ctx;
  const before = await getJson(`${kv.adminUrl}/settings`);
  assert.equal(await page.locator('#kvgate_srv_save_every').inputValue(), String(before.save_every), 'the drawer shows kvgate\'s save_every');
  assert.notEqual(before.save_every, 1);
  assert.ok(before.idle_save_s > 0);
  await page.locator('#kvgate_srv_save_every').fill('1');
  await page.locator('#kvgate_srv_idle_save_s').fill('0');
  const t = await toastCount(page);
  await page.locator('#kvgate_srv_apply').click();
  const toast = await waitToast(page, t, /^kvgate settings applied\n/, 'apply');
  run.log(`toast: ${toast.text.replace(/\n/g, ' | ')}`);
  assert.match(toast.text, /save_every = 1/);
  assert.doesNotMatch(toast.text, /autosave|max_files|prefill/, 'only what changed is sent');
  const after = await getJson(`${kv.adminUrl}/settings`);
  assert.equal(after.save_every, 1, 'GET /settings shows the new save_every');
  assert.equal(after.idle_save_s, 0);
  assert.deepEqual({ ...after, save_every: before.save_every, idle_save_s: before.idle_save_s }, before, 'nothing else changed');
  const file = JSON.parse(fs.readFileSync(path.join(kv.saveDir, 'kvgate-settings.json'), 'utf8'));
  assert.equal(file.save_every, 1, 'kvgate keeps it in its save directory');
}

/**
 * The load popup: this chat first and marked, search, a tagged save of this
 * chat and another chat's save loaded together; GET /slots and restore toasts.
 */
async function loadPopup(ctx, { groupKey, tagged, solo1Key, solo1Save }) {
  const { page, kv, run } = ctx;
  await page.locator('#kvgate_load').click();
  const pop = popup(page, '#kvgate_load_popup');
  const chats = pop.locator('[data-kvgate="load-chat"]');
  await chats.first().waitFor();
  const listed = await chats.evaluateAll((els) => els.map((e) => ({ chat: e.dataset.chat, current: e.dataset.current === 'true' })));
  run.log(`load popup chats: ${JSON.stringify(listed)}`);
  assert.deepEqual(listed[0], { chat: groupKey, current: true }, 'this chat first, marked');
  assert.match(await chats.first().locator('summary').innerText(), /\(this chat\)/);
  assert.equal(listed.filter((c) => c.current).length, 1);
  const apiChats = (await getJson(`${kv.adminUrl}/saves`)).chats.map((c) => c.chat);
  assert.deepEqual(listed.map((c) => c.chat).sort(), apiChats.sort(), 'every chat with saves is listed');
  assert.ok(apiChats.includes(solo1Key));

  // A tagged save of this chat, of a character other than Alice.
  const pick = tagged.find((s) => s.character !== 'Alice');
  await pop.locator(`[data-kvgate="load-chat"][data-chat="${groupKey}"] [data-kvgate="load-save"][data-file="${pick.file}"]`).check();

  const shownCharacters = () => pop.locator('[data-kvgate="load-chat"] [data-kvgate="load-character"]')
    .evaluateAll((els) => els.map((e) => e.dataset.character));
  const shownChats = () => chats.evaluateAll((els) => els.map((e) => e.dataset.chat));
  // Search by the group's name: only the group chat.
  await pop.locator('#kvgate_load_search').fill('Lantern');
  await waitUntil('search "Lantern"', async () => JSON.stringify(await shownChats()) === JSON.stringify([groupKey]));
  // Search by character: Alice in every chat, nobody else.
  await pop.locator('#kvgate_load_search').fill('Alice');
  await waitUntil('search "Alice"', async () => {
    const c = await shownCharacters();
    return c.length >= 3 && c.every((n) => n === 'Alice') && (await shownChats()).includes(solo1Key);
  });
  // Add Alice's save of the first 1:1 chat (the first pick is kept).
  await pop.locator(`[data-kvgate="load-chat"][data-chat="${solo1Key}"] [data-kvgate="load-save"][data-file="${solo1Save.file}"]`).check();
  await pop.locator('#kvgate_load_search').fill('');
  // The full list again (its characters, not only Alice), with the first
  // pick still ticked: a search does not drop what was picked.
  await waitUntil('the full list again, the first pick ticked', async () =>
    (await shownCharacters()).includes(pick.character) && (await shownChats()).length === listed.length);
  assert.ok(await pop.locator(`[data-kvgate="load-save"][data-file="${pick.file}"]`).isChecked(), 'the first pick survived the searches');
  const selected = pop.locator('#kvgate_load_selected');
  assert.equal(await selected.getAttribute('data-count'), '2');
  assert.match(await selected.innerText(), new RegExp(`${pick.character}, Alice \\(from ${solo1Key.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}\\)`));
  await shot(ctx, 'load-popup', pop);

  const e0 = kv.events.mark();
  const t = await toastCount(page);
  await pop.locator('.popup-button-ok').click();
  await pop.waitFor({ state: 'detached' });
  for (const [character, file] of [[pick.character, pick.file], ['Alice', solo1Save.file]]) {
    await waitToast(page, t, new RegExp(`^kvgate: loaded\\n${character} → slot \\d \\(\\d+ tokens, ${file.replace(/\./g, '\\.')}\\)`), `loaded ${character}`);
  }
  // kvgate: both restored into slots of this chat.
  const restored = kv.events.of('restored', e0);
  assert.deepEqual(restored.map((e) => [e.character, e.file, e.chat]).sort(),
    [[pick.character, pick.file, groupKey], ['Alice', solo1Save.file, groupKey]].sort());
  const { slots } = await getJson(`${kv.adminUrl}/slots`);
  for (const [character, file] of [[pick.character, pick.file], ['Alice', solo1Save.file]]) {
    const s = slots.find((x) => x.character === character);
    assert.ok(s, `${character} holds a slot after the load`);
    assert.equal(s.chat, groupKey, `${character}'s slot belongs to this chat`);
    assert.equal(s.restored_from, file, `${character}'s slot was restored from the picked save`);
    assert.ok(s.tokens_cached > 100, `${character}'s slot holds the save's tokens (${s.tokens_cached})`);
  }
  // Restore toasts (news): the file, and where it was saved.
  const esc = (x) => x.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  const own = await waitToast(page, t, new RegExp(`${pick.character}: cache restored from ${esc(pick.file)} \\(saved .* in this chat \\(Lantern inn · ${esc(groupKey.slice(6))}\\)\\), \\d+ tokens`), 'restore toast');
  const other = await waitToast(page, t, new RegExp(`Alice: cache restored from ${esc(solo1Save.file)} \\(saved .* in another chat: ${esc(solo1Key)}\\), \\d+ tokens`), 'restore toast, another chat');
  run.log(`toasts: ${own.text.replace(/\n/g, ' | ')} // ${other.text.replace(/\n/g, ' | ')}`);
  // The other chat's restore toast, once it has faded in.
  const toast = page.locator('#toast-container .toast', { hasText: 'in another chat' }).first();
  await page.waitForFunction((el) => getComputedStyle(el).opacity === '1', await toast.elementHandle());
  await ctx.browser.screenshot('toast', toast);
}

/**
 * "Toasts for kvgate's events" off: an autosave of this chat (save_every is
 * 1 now) and a restore show no toast, though the load's own answer (a user
 * action) still does; on again, the restore toast is back.
 */
async function toastSwitch(ctx, { groupKey, tagged }) {
  const { page, kv } = ctx;
  const save = tagged[0];
  const loadOnce = async () => {
    const e0 = kv.events.mark();
    const t = await toastCount(page);
    await page.locator('#kvgate_load').click();
    const pop = popup(page, '#kvgate_load_popup');
    await pop.locator(`[data-kvgate="load-save"][data-file="${save.file}"]`).check();
    await pop.locator('.popup-button-ok').click();
    await pop.waitFor({ state: 'detached' });
    await waitToast(page, t, new RegExp(`^kvgate: loaded\\n${save.character} → slot`), 'loaded');
    await kv.events.waitFor((e) => e.type === 'restored' && e.file === save.file && e.chat === groupKey, 10000, e0);
  };
  const news = /: autosave save, |: cache restored from /;

  await page.locator('#kvgate_toasts').uncheck();
  const t = await toastCount(page);
  const e0 = kv.events.mark();
  await closeDrawer(page);
  await generation(ctx, 'trigger-toasts-off', () => st.triggerMember(page, 'Bob'), { kinds: ['normal'], names: ['Bob'] });
  await kv.events.waitFor((e) => e.type === 'saved' && e.kind === 'autosave' && e.chat === groupKey, 10000, e0);
  await openDrawer(page);
  await loadOnce();
  // With toasts on, each news toast came within a second of its event in
  // this run (solo-1's autosave, the load's restores); 2 s is ample.
  await new Promise((r) => setTimeout(r, 2000));
  assert.deepEqual((await toastsSince(page, t)).filter((x) => news.test(x.text)), [],
    'no autosave or restore toast while toasts are off');

  await page.locator('#kvgate_toasts').check();
  const t2 = await toastCount(page);
  await loadOnce();
  await waitToast(page, t2, new RegExp(`${save.character}: cache restored from ${save.file.replace(/\./g, '\\.')}`), 'restore toast with toasts on again');
}

/** "Clear all slots" (confirmed): no slot holds a character; the indicator agrees. */
async function clearAll(ctx) {
  const { page, kv } = ctx;
  const t = await toastCount(page);
  await page.locator('#kvgate_clear_slots').click();
  const pop = popup(page);
  await pop.locator('#kvgate_clear_erase').waitFor({ state: 'attached' });
  await pop.locator('.popup-button-ok').click();
  await waitToast(page, t, /^kvgate: clear all slots\n2 slot\(s\) released\./, 'clear');
  const { slots } = await getJson(`${kv.adminUrl}/slots`);
  assert.deepEqual(slots.map((s) => s.character ?? null), [null, null], 'no slot holds a character after Clear all slots');
  // The indicator: every character of this chat out of a slot.
  await page.waitForFunction(() => {
    const rows = [...document.querySelectorAll('[data-kvgate="indicator-row"]')];
    return rows.length === 3 && rows.every((r) => r.dataset.slot === '');
  }, null, { timeout: 10000 });
  assert.equal(await page.locator('#kvgate_indicator_summary').innerText(), '0/3 in slots');
}

// ------------------------------------------------------- the chat run

/** Chat Completion, shorter: explicit identity in X-Kvgate-* headers. */
async function chatRun() {
  return withRun('extension-chat', async (run) => {
    // Token counts as in sillytavern.test.mjs's Chat Completion run.
    const { kv, data, browser, page } = await startStack(run, { api: 'chat', slotCtx: 4096, stContext: 600 });
    const ctx = { page, kv, run, generations: 0 };
    assert.equal(await st.connectChatCompletion(page, `${kv.frontUrl}/v1`), 'Valid');
    await st.openGroup(page, data.group.id, { greetings: 3 });
    await generation(ctx, 'message-1', () => st.sendMessage(page, 'Good evening Alice, Bob and Carol! I came in on the coast road.'),
      { kinds: ['normal', 'normal', 'normal'], names: ['Alice', 'Bob', 'Carol'] });
    await generation(ctx, 'swipe', () => st.swipeLast(page), { kinds: ['swipe'], names: ['Carol'] });
    await st.openCharacter(page, 'Alice');
    await generation(ctx, 'solo', () => st.sendMessage(page, 'Alice, can I see the chart?'), { kinds: ['normal'], names: ['Alice'] });
    assert.equal(kv.events.of('generation_started').length, ctx.generations, 'generations kvgate started');
    assert.deepEqual(await st.errorToasts(page), [], 'no error toast');
    run.log(`kvgate events: ${summarize(kv.events.list)}`);
    browser.assertClean();
  });
}

test('SillyTavern with the kvgate extension, Text Completion (llama.cpp): identity, drawer, saves, load, preload', { timeout: 240000 }, () => textRun());

test('SillyTavern with the kvgate extension, Chat Completion (Custom): explicit identity', { timeout: 120000 }, () => chatRun());
