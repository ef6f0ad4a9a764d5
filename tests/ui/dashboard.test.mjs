// kvgate's own web dashboard (GET / on the admin port), in headless
// Chromium, against a real kvgate running the real llama-server with the
// tiny model, with an admin key.
//
// One run, in the order a person would use it:
//   - the page comes without the key and asks for it; a wrong key is
//     refused with kvgate's reason, the right one opens the dashboard;
//   - a SillyTavern-shaped group chat (3 characters on 2 slots, sent
//     straight to kvgate's front port) makes the slots and the charts move
//     live: the slot rows name who holds each slot as kvgate's /slots does,
//     every chart draws one point per event it charts, the feed shows the
//     restores;
//   - a tagged save of a slot creates its file (on disk and in /saves), the
//     slots are cleared, loading the save puts its character in a slot
//     (/slots), deleting it removes the file;
//   - a bad setting shows kvgate's own 400 message, a good one applies;
//   - a group preload runs to the end;
//   - an instance is created with the tiny model, shows llama-server's
//     output, is stopped and deleted;
//   - the page fits a phone-width screen and reads in dark mode.
// Throughout, the page reaches nothing but the admin port, sends the key in
// X-Admin-Key on every API call and never in a URL, and logs no console
// error but the HTTP refusals the steps above ask for.
//
// Screenshots (KVGATE_UI_SCREENSHOTS or the run folder): dashboard-live.png,
// dashboard-saves.png, dashboard-instances.png (1280×800),
// dashboard-phone.png (390×844), dashboard-dark.png.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import { openBrowser } from './lib/browser.mjs';
import { GROUP_CHAT, ROSTER, USER, greetings, replayGroupChat, sendTurn } from './lib/group-chat.mjs';
import { startKvgate, tinyModel, waitUntil, withRun } from './lib/stack.mjs';

const KEY = 'dashboard-test-key-7f3a';
const TAG = 'before the storm';
const ROUNDS = 4; // 12 turns: every turn from the third evicts someone

/** Every slot row the page shows: `{upstream, slot, character, busy}`. */
const domSlots = (page) => page.locator('#upstreams tr.slot-row').evaluateAll((rows) =>
  rows.map((r) => ({
    upstream: r.dataset.upstream, slot: Number(r.dataset.slot), character: r.dataset.character, busy: r.dataset.busy === 'true',
  })));

/** The same from kvgate's GET /slots. */
async function apiSlots(kv) {
  const { status, body } = await kv.admin('GET', '/slots');
  assert.equal(status, 200, JSON.stringify(body));
  return body.slots.map((s) => ({ upstream: s.upstream, slot: s.id, character: s.character ?? '', busy: s.busy }));
}

const key = (list) => JSON.stringify([...list].sort((a, b) => a.upstream.localeCompare(b.upstream) || a.slot - b.slot));

/** Waits until the page's slot rows say what kvgate's /slots says (who
 * holds each slot, and whether it is busy). */
async function slotsAgree(page, kv, what, timeoutMs = 15000) {
  let last = '';
  await waitUntil(`the page's slots to match /slots ${what}`, async () => {
    const [dom, api] = [await domSlots(page), await apiSlots(kv)];
    last = `page ${key(dom)} vs /slots ${key(api)}`;
    return key(dom) === key(api) ? api : null;
  }, { timeoutMs, everyMs: 150 }).catch((e) => { throw new Error(`${e.message}: ${last}`); });
  return apiSlots(kv);
}

const points = async (page, id) => Number(await page.locator(`#chart-${id}`).getAttribute('data-points'));

/**
 * Runs `fn`, expecting the console errors it causes to be exactly HTTP
 * refusals matching `pattern` (Chromium logs each 4xx answer a page
 * fetches); any other console error stays for `assertClean`.
 */
async function expectRefusals(browser, pattern, what, fn) {
  const from = browser.consoleErrors.length;
  const out = await fn();
  const added = browser.consoleErrors.splice(from);
  assert.ok(added.length > 0, `${what}: the refusal was expected in the console`);
  const other = added.filter((e) => !pattern.test(e));
  browser.consoleErrors.push(...other);
  return out;
}

/** Clicks `button` in the open dialog (confirm: #dialog-confirm). */
async function confirmDialog(page, { fill, check } = {}) {
  const dlg = page.locator('dialog[open]');
  await dlg.waitFor();
  if (fill !== undefined) await dlg.locator('#dialog-input').fill(fill);
  if (check !== undefined) await dlg.locator('#dialog-input').setChecked(check);
  await dlg.locator('#dialog-confirm').click();
  await dlg.waitFor({ state: 'detached' });
}

/** A screenshot without the toasts of earlier steps over it (a click
 * dismisses one, as for a person). */
async function shot(browser, name) {
  const toasts = browser.page.locator('#toasts .toast');
  while (await toasts.count()) await toasts.first().click();
  await browser.screenshot(name);
}

const files = (dir) => new Set(fs.readdirSync(dir).filter((f) => f.endsWith('.bin')));

test('the dashboard shows kvgate live and acts through its admin API', { timeout: 240_000 }, () => withRun('dashboard', async (run) => {
  const model = await tinyModel();
  // No RAM prompt cache, so a character coming back is restored from disk
  // (the restores chart and feed must move); no prefill ahead, so the
  // slots change only with the turns.
  const kv = await startKvgate(run, {
    slots: 2, ctx: 2048, adminKey: KEY,
    args: ['--ram-cache', 'false', '--prefill-ahead', 'false'],
  });

  // The page itself needs no key; the API does.
  const page0 = await fetch(`${kv.adminUrl}/`);
  assert.equal(page0.status, 200);
  assert.match(page0.headers.get('content-security-policy'), /default-src 'self'/);
  assert.equal((await fetch(`${kv.adminUrl}/health`)).status, 401);

  const browser = await openBrowser(run, { allowedOrigins: [kv.adminUrl], viewport: { width: 1280, height: 800 } });
  const { page } = browser;
  const requests = [];
  page.on('request', (r) => requests.push({ url: r.url(), headers: r.headers() }));

  // ---- the key
  const dialog = page.locator('#key-dialog');
  await expectRefusals(browser, /status of 401/, 'the first call without a key', async () => {
    await page.goto(`${kv.adminUrl}/`);
    await dialog.waitFor();
  });
  assert.match(await dialog.innerText(), /admin key/i);
  await expectRefusals(browser, /status of 401/, 'a wrong key', async () => {
    await dialog.locator('#dialog-input').fill('not-the-key');
    await dialog.locator('#dialog-confirm').click();
    await page.locator('#dialog-error').waitFor();
  });
  const refusal = await page.locator('#dialog-error').innerText();
  assert.match(refusal, /kvgate refused this key \(401: admin key required/, refusal);
  await dialog.locator('#dialog-input').fill(KEY);
  await dialog.locator('#dialog-confirm').click();
  await page.locator('body[data-ready="true"]').waitFor();
  await page.locator('#conn[data-state="connected"]').waitFor();
  assert.equal(await page.evaluate(() => sessionStorage.getItem('kvgate.adminKey')), KEY);
  run.log('dashboard open with the key');

  // ---- live: the slots and charts follow a group chat
  await page.locator('[data-upstream="main"] tr.slot-row').nth(1).waitFor();
  assert.deepEqual((await domSlots(page)).map((s) => s.character), ['', ''], 'both slots free');
  for (const id of ['ttft', 'reuse', 'io']) assert.equal(await points(page, id), 0, id);
  // The disk chart starts from /health's reading.
  const diskBefore = await waitUntil('the disk chart\'s first point', async () => await points(page, 'disk'), { timeoutMs: 5000 });

  const named = new Set();
  const turns = await replayGroupChat(kv.frontUrl, {
    rounds: ROUNDS,
    async onTurn({ speaker, result }) {
      assert.equal(result.character, speaker, 'kvgate names the speaker');
      named.add(speaker);
      // After the first two turns and the first eviction: the page shows
      // the holders kvgate shows, without a reload.
      if (named.size >= 2) {
        const now = await slotsAgree(page, kv, `after ${speaker}'s turn`);
        assert.ok(now.some((s) => s.character === speaker), `${speaker} holds a slot`);
      }
    },
  });
  assert.equal(turns.length, ROUNDS * 3);
  await waitUntil('every turn\'s generation_finished event',
    () => kv.events.of('generation_finished').length >= turns.length, { timeoutMs: 20000 });
  const finished = kv.events.of('generation_finished');
  const final = await slotsAgree(page, kv, 'after the chat');
  assert.equal(new Set(final.map((s) => s.character)).size, 2, 'two characters in two slots');

  // One point per turn, per save and restore, as kvgate's events say.
  const saved = () => kv.events.of('saved').length;
  const restored = kv.events.of('restored');
  assert.ok(restored.length >= 3, `characters came back from disk: ${restored.length} restores`);
  await waitUntil('the charts to draw every turn, save and restore', async () =>
    await points(page, 'ttft') === finished.filter((e) => e.ttft_ms != null).length &&
    await points(page, 'reuse') === finished.length &&
    await points(page, 'io') === saved() + kv.events.of('restored').length &&
    await points(page, 'disk') > diskBefore, { timeoutMs: 10000 });
  assert.equal(finished.length, turns.length);
  // Per character: each of the three has a row of reused and evaluated tokens.
  for (const name of ROSTER) {
    const row = page.locator(`#reuse-totals tr[data-character="${name}"]`);
    assert.match(await row.innerText(), new RegExp(`^${name}\\s+${turns.filter((t) => t.speaker === name).length}\\s`));
  }
  // The feed says each restore in words.
  const feedRestores = await page.locator('#feed li[data-type="restored"]').count();
  assert.equal(feedRestores, kv.events.of('restored').length);
  assert.match(await page.locator('#feed li[data-type="restored"]').first().innerText(), /restored into slot \d: \d+ tokens/);
  await shot(browser, 'live');

  // ---- the queue, live: all three speak at once on two slots, so one
  // waits; the page shows it while it waits (a MutationObserver notes the
  // most the page ever showed), and empty again after.
  await page.evaluate(() => {
    const seen = { queued: 0 };
    window.kvgateTestSeen = seen;
    const look = () => {
      seen.queued = Math.max(seen.queued, Number(document.querySelector('#tile-queue .tile-value')?.textContent));
    };
    new MutationObserver(look).observe(document.getElementById('summary'), { subtree: true, childList: true, characterData: true });
  });
  const queuedBefore = kv.events.of('queue').length;
  const burst = [...greetings(), `${USER}: Everyone at once: who saw the ship?`];
  await Promise.all(ROSTER.map((name) => sendTurn(kv.frontUrl, name, burst, { nPredict: 48 })));
  const queueEvents = kv.events.of('queue').slice(queuedBefore);
  assert.ok(queueEvents.some((e) => e.queued >= 1), `a turn waited: ${JSON.stringify(queueEvents)}`);
  await waitUntil('the queue shown empty again', async () =>
    await page.locator('#tile-queue .tile-value').innerText() === '0', { timeoutMs: 5000 });
  assert.ok((await page.evaluate(() => window.kvgateTestSeen.queued)) >= 1, 'the page showed the waiting turn');
  const afterBurst = await slotsAgree(page, kv, 'after three turns at once');

  // ---- save with a tag, from a slot's row
  const holder = afterBurst.find((s) => s.slot === 0).character;
  const savedBefore = files(kv.saveDir);
  await page.locator(`tr.slot-row[data-upstream="main"][data-slot="0"] button:has-text("Tag…")`).click();
  await confirmDialog(page, { fill: TAG });
  await page.locator('.toast.ok', { hasText: `Saved ${holder}` }).waitFor();
  const { body: saves } = await kv.admin('GET', '/saves');
  const tagged = saves.chats.flatMap((c) => c.characters.flatMap((ch) => ch.saves.map((s) => ({ ...s, character: ch.character, chat: c.chat }))))
    .filter((s) => s.tag === TAG);
  assert.equal(tagged.length, 1, JSON.stringify(tagged));
  const [bookmark] = tagged;
  assert.deepEqual([bookmark.character, bookmark.chat, bookmark.kind], [holder, GROUP_CHAT, 'manual']);
  assert.ok(fs.existsSync(path.join(kv.saveDir, bookmark.file)), `${bookmark.file} on disk`);
  assert.ok(!savedBefore.has(bookmark.file), 'a new file');
  await page.click('#nav-saves');
  const row = page.locator(`#saves-list tr.save-row[data-file="${bookmark.file}"]`);
  await row.waitFor();
  assert.equal(await row.getAttribute('data-tag'), TAG);
  assert.match(await row.innerText(), new RegExp(`${TAG}\\s+manual`));
  // The search asks kvgate (GET /saves?q=): nothing matches a stranger.
  await page.fill('#saves-search', 'Mallory');
  await page.locator('#saves-list .empty', { hasText: 'No save matches “Mallory”' }).waitFor();
  await page.fill('#saves-search', holder.toLowerCase());
  await row.waitFor();
  await shot(browser, 'saves');

  // ---- clear the slots, then load the bookmark into one
  await page.click('#nav-live');
  await page.click('#clear-slots');
  await confirmDialog(page, { check: false });
  await page.locator('.toast.ok', { hasText: 'Cleared 2 slot(s)' }).waitFor();
  assert.deepEqual((await slotsAgree(page, kv, 'after clearing')).map((s) => s.character), ['', '']);
  await page.click('#nav-saves');
  await row.locator('button.load').click();
  await page.locator('.toast.ok', { hasText: `Loaded ${holder} into slot` }).waitFor();
  const { body: afterLoad } = await kv.admin('GET', '/slots');
  const loaded = afterLoad.slots.find((s) => s.character === holder);
  assert.ok(loaded, JSON.stringify(afterLoad));
  assert.equal(loaded.restored_from, bookmark.file);
  assert.equal(loaded.chat, GROUP_CHAT);
  await slotsAgree(page, kv, 'after the load');

  // ---- delete it, after a confirmation
  await row.locator('button.delete').click();
  const confirm = page.locator('dialog[open]');
  await confirm.waitFor();
  assert.match(await confirm.innerText(), new RegExp(bookmark.file.replace(/[.+]/g, '\\$&')));
  await confirmDialog(page);
  await page.locator('.toast.ok', { hasText: `Deleted ${bookmark.file}` }).waitFor();
  assert.ok(!fs.existsSync(path.join(kv.saveDir, bookmark.file)), 'the file is gone');
  await row.waitFor({ state: 'detached' });
  const { body: savesAfter } = await kv.admin('GET', '/saves');
  assert.ok(!JSON.stringify(savesAfter).includes(bookmark.file));

  // ---- settings: kvgate's own refusal, then a change
  await page.click('#nav-settings');
  const saveEvery = page.locator('#setting-save_every');
  await saveEvery.waitFor();
  assert.equal(await saveEvery.inputValue(), '5');
  await saveEvery.fill('0');
  await expectRefusals(browser, /status of 400/, 'a bad setting', async () => {
    await page.click('#settings-save');
    await page.locator('#settings-error:not([hidden])').waitFor();
  });
  assert.equal(await page.locator('#settings-error').innerText(), 'kvgate refused: save_every must be a whole number ≥ 1');
  assert.equal((await kv.admin('GET', '/settings')).body.save_every, 5, 'nothing changed');
  await saveEvery.fill('3');
  await page.click('#settings-save');
  await page.locator('.toast.ok', { hasText: 'save_every' }).waitFor();
  assert.equal((await kv.admin('GET', '/settings')).body.save_every, 3);

  // ---- group preload of the chat's other two characters
  await page.click('#nav-preload');
  await page.locator(`#preload-known .chip[data-chat="${GROUP_CHAT}"]`).click();
  const others = ROSTER.filter((n) => n !== holder);
  for (const n of others) await page.locator(`#preload-characters input[value="${n}"]`).check();
  await page.click('#preload-start');
  const job = page.locator('#preload-jobs article.job[data-state="done"]');
  await job.waitFor({ timeout: 60000 });
  assert.match(await job.innerText(), /^2 \/ 2$/m);
  const id = await job.getAttribute('data-job');
  const { body: progress } = await kv.admin('GET', `/preload/${id}`);
  assert.equal(progress.state, 'done');
  assert.deepEqual(progress.succeeded.map((s) => s.character).sort(), others.sort());
  assert.deepEqual(progress.failed, []);

  // ---- an instance: created with the tiny model, its output, stopped, deleted
  await page.click('#nav-instances');
  await page.locator('#instances-list article.instance[data-instance="main"][data-status="running"]').waitFor();
  await page.fill('#instance-model', model);
  await page.fill('#instance-slots', '1');
  await page.fill('#instance-ctx', '512');
  await page.fill('#instance-args', '-t 1');
  await page.click('#instance-create');
  const card = page.locator('#instances-list article.instance[data-instance="llama-1"]');
  await page.locator('#instances-list article.instance[data-instance="llama-1"][data-status="running"]').waitFor({ timeout: 90000 });
  const { body: made } = await kv.admin('GET', '/instances/llama-1');
  assert.equal(made.status, 'running');
  assert.deepEqual([made.slots, made.ctx, made.args], [1, 512, ['-t', '1']]);
  assert.match(await card.innerText(), /1 × 512/);
  await card.locator('details.log > summary').click();
  await card.locator('pre.log-lines', { hasText: 'listening' }).waitFor();
  // It is an upstream now: the live view shows it as kvgate does.
  await page.locator('#upstreams article.upstream[data-upstream="llama-1"]').waitFor({ state: 'attached' });
  await shot(browser, 'instances');
  await card.locator('button.stop').click();
  await page.locator('#instances-list article.instance[data-instance="llama-1"][data-status="stopped"]').waitFor({ timeout: 60000 });
  assert.equal((await kv.admin('GET', '/instances/llama-1')).body.status, 'stopped');
  await card.locator('button.delete').click();
  await confirmDialog(page);
  await card.waitFor({ state: 'detached' });
  assert.equal((await kv.admin('GET', '/instances/llama-1')).status, 404);

  // ---- a phone-width screen, and dark mode
  await page.click('#nav-live');
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForTimeout(300);
  const width = await page.evaluate(() => document.scrollingElement.scrollWidth);
  assert.ok(width <= 390, `the page fits 390 px (scrolls ${width} px wide)`);
  await shot(browser, 'phone');
  await page.setViewportSize({ width: 1280, height: 800 });
  await page.emulateMedia({ colorScheme: 'dark' });
  await page.waitForTimeout(300);
  const background = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
  const [r, g, b] = background.match(/\d+/g).map(Number);
  assert.ok(0.2126 * r + 0.7152 * g + 0.0722 * b < 60, `a dark background: ${background}`);
  await shot(browser, 'dark');

  // ---- what the page sent
  for (const r of requests) {
    assert.equal(new URL(r.url).origin, kv.adminUrl, `a request outside the admin port: ${r.url}`);
    assert.ok(!r.url.includes(KEY), `the key in a URL: ${r.url}`);
  }
  const api = requests.filter((r) => !/^\/($|dashboard\/)/.test(new URL(r.url).pathname));
  assert.ok(api.length > 20, `${api.length} API calls`);
  // Only the very first call (before the key was asked for) and the wrong
  // key's went without the right key.
  const unkeyed = api.filter((r) => r.headers['x-admin-key'] !== KEY)
    .map((r) => `${new URL(r.url).pathname} ${r.headers['x-admin-key'] ?? '(none)'}`);
  assert.deepEqual(unkeyed, ['/health (none)', '/health not-the-key']);
  assert.ok(api.some((r) => new URL(r.url).pathname === '/events' && r.headers['x-admin-key'] === KEY), 'the event stream carries the key');
  browser.assertClean();
}));

// Most kvgates listen on loopback without a key: the page opens at once,
// asks for nothing, and says why the instances API is off instead of
// calling it (no refusal in the console either).
test('without an admin key the dashboard opens at once and explains instances', { timeout: 120_000 }, () => withRun('dashboard-keyless', async (run) => {
  const kv = await startKvgate(run, { slots: 2, ctx: 2048 });
  const browser = await openBrowser(run, { allowedOrigins: [kv.adminUrl], viewport: { width: 1280, height: 800 } });
  const { page } = browser;
  await page.goto(`${kv.adminUrl}/`);
  await page.locator('body[data-ready="true"]').waitFor();
  await page.locator('#conn[data-state="connected"]').waitFor();
  assert.equal(await page.locator('dialog[open]').count(), 0, 'no key asked for');
  assert.ok(await page.locator('#forget-key').isHidden());
  await page.locator('[data-upstream="main"] tr.slot-row').nth(1).waitFor();
  await page.click('#nav-instances');
  const notice = page.locator('#instances-list .notice');
  await notice.waitFor();
  assert.match(await notice.innerText(), /without an admin key.*--admin-key/);
  assert.ok(await page.locator('#instance-create').isDisabled());
  browser.assertClean();
}));
