// Driving the SillyTavern page like a person (clicks and typing on the real
// UI), plus a probe in the page that records what SillyTavern did: each
// generation request it sent (its type, the character it generated for,
// the prompt's end), the messages it received and every toast it showed.
//
// Selectors are SillyTavern 1.19.0's (public/index.html,
// public/scripts/group-chats.js); `SillyTavern.getContext()` is its public
// API for extensions (public/scripts/st-context.js).

import { setTimeout as sleep } from 'node:timers/promises';

/** A regexp matching exactly `text`. */
const exactly = (text) => new RegExp(`^${text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`);

/**
 * The page-side recorder. Installed once the app is up; keeps
 * `window.__kvgateProbe = {requests, received, toasts, started}`:
 *   requests: one per generation request SillyTavern sends, taken at
 *     TEXT_/CHAT_COMPLETION_SETTINGS_READY (the body, just before it goes
 *     out): {api, type (of the Generate call), name2 (the character it
 *     generates for: in a group the drafted member), group, chatId, tail
 *     (the prompt's last 160 characters, or the last 2 messages), head
 *     (a text prompt's first 400 characters), stop}
 *   received: MESSAGE_RECEIVED (message id, type, speaker)
 *   toasts: every toastr toast shown ({cls, text})
 */
function probeScript() {
  const ctx = SillyTavern.getContext();
  const { eventSource, eventTypes } = ctx;
  const probe = { requests: [], received: [], toasts: [], started: [], impersonated: [] };
  window.__kvgateProbe = probe;
  let lastType = null;
  eventSource.on(eventTypes.GENERATION_STARTED, (type, _opts, dryRun) => {
    if (dryRun) return;
    lastType = type;
    probe.started.push(type);
  });
  const request = (api) => (body) => {
    const c = SillyTavern.getContext();
    const entry = {
      api, type: lastType, name1: c.name1, name2: c.name2, group: c.groupId ?? null, chatId: c.chatId ?? null,
      stop: body.stop ?? body.stopping_strings ?? null,
    };
    if (typeof body.prompt === 'string') {
      entry.tail = body.prompt.slice(-160);
      entry.head = body.prompt.slice(0, 400);
    }
    if (Array.isArray(body.messages)) {
      entry.tail = body.messages.slice(-2).map((m) => ({ role: m.role, name: m.name, content: String(m.content).slice(-160) }));
      entry.messages = body.messages.length;
    }
    probe.requests.push(entry);
  };
  eventSource.on(eventTypes.TEXT_COMPLETION_SETTINGS_READY, request('text'));
  eventSource.on(eventTypes.CHAT_COMPLETION_SETTINGS_READY, request('chat'));
  eventSource.on(eventTypes.MESSAGE_RECEIVED, (id, type) => {
    const m = SillyTavern.getContext().chat[id];
    probe.received.push({ id, type, name: m?.name, is_user: m?.is_user, length: m?.mes?.length });
  });
  eventSource.on(eventTypes.IMPERSONATE_READY, (text) => probe.impersonated.push(String(text)));
  // Toasts disappear after a few seconds: record each one as it appears.
  new MutationObserver((muts) => {
    for (const m of muts) {
      for (const n of m.addedNodes) {
        if (n.nodeType === 1 && n.classList.contains('toast')) {
          probe.toasts.push({ cls: n.className, text: n.innerText });
        }
      }
    }
  }).observe(document.body, { childList: true, subtree: true });
}

/**
 * Opens SillyTavern at `url`, waits until the app is up (the preloader
 * gone, `SillyTavern.getContext` there), and installs the probe.
 */
export async function openSillyTavern(page, url, { timeoutMs = 90000 } = {}) {
  await page.goto(url, { waitUntil: 'domcontentloaded', timeout: timeoutMs });
  await page.waitForFunction(
    () => typeof window.SillyTavern?.getContext === 'function' && !document.querySelector('#preloader'),
    null, { timeout: timeoutMs });
  await page.evaluate(probeScript);
}

/** The probe's record so far (see `probeScript`). */
export function readProbe(page) {
  return page.evaluate(() => JSON.parse(JSON.stringify(window.__kvgateProbe)));
}

/** `SillyTavern.getContext()`'s plain parts: chat, ids, names, API. */
export function stContext(page) {
  return page.evaluate(() => {
    const c = SillyTavern.getContext();
    return {
      chatId: c.chatId ?? null, groupId: c.groupId ?? null, characterId: c.characterId ?? null,
      name1: c.name1, name2: c.name2, mainApi: c.mainApi, onlineStatus: c.onlineStatus,
      chat: c.chat.map((m) => ({ name: m.name, is_user: !!m.is_user, is_system: !!m.is_system, mes: m.mes, swipes: m.swipes?.length ?? 0 })),
    };
  });
}

/** Opens the API Connections drawer (the plug icon) if it is closed. */
export async function openApiPanel(page) {
  if (!(await page.locator('#rm_api_block').isVisible())) {
    await page.locator('#API-status-top').click();
    await page.locator('#rm_api_block').waitFor({ state: 'visible' });
  }
  return page.locator('#rm_api_block');
}

/** Closes the drawer that is open (by clicking its icon again). */
async function closeDrawer(page, icon, block) {
  if (await page.locator(block).isVisible()) {
    await page.locator(icon).click();
    await page.locator(block).waitFor({ state: 'hidden' });
  }
}

/**
 * Waits for the online status the Connect button gives once SillyTavern's
 * server had an answer from the API: for Text Completion the model's name;
 * for a Custom Chat Completion source "Valid" (it shows "Status check
 * bypassed" while the check is still under way, and keeps it if the check
 * fails).
 */
async function waitConnected(page, api, timeoutMs) {
  await page.waitForFunction((a) => {
    const s = SillyTavern.getContext().onlineStatus;
    if (a === 'chat') return s === 'Valid';
    return !!s && s !== 'no_connection' && s !== 'Status check bypassed';
  }, api, { timeout: timeoutMs });
  return page.evaluate(() => SillyTavern.getContext().onlineStatus);
}

/**
 * API Connections → API "Text Completion" → type "llama.cpp" → API URL →
 * Connect, as a person does it. Returns the online status (the model).
 */
export async function connectTextCompletion(page, url, { screenshot, timeoutMs = 30000 } = {}) {
  const panel = await openApiPanel(page);
  await page.locator('#main_api').selectOption('textgenerationwebui');
  await page.locator('#textgen_type').selectOption('llamacpp');
  await page.locator('#llamacpp_api_url_text').fill(url);
  await page.locator('#api_button_textgenerationwebui').click();
  const status = await waitConnected(page, 'text', timeoutMs);
  if (screenshot) await screenshot('api-connection', panel);
  await closeDrawer(page, '#API-status-top', '#rm_api_block');
  return status;
}

/**
 * API Connections → API "Chat Completion" → source "Custom
 * (OpenAI-compatible)" → Custom Endpoint (Base URL) → Connect. Returns the
 * online status (the model).
 */
export async function connectChatCompletion(page, url, { screenshot, timeoutMs = 30000 } = {}) {
  const panel = await openApiPanel(page);
  await page.locator('#main_api').selectOption('openai');
  await page.locator('#chat_completion_source').selectOption('custom');
  await page.locator('#custom_api_url_text').fill(url);
  await page.locator('#api_button_openai').click();
  const status = await waitConnected(page, 'chat', timeoutMs);
  if (screenshot) await screenshot('api-connection', panel);
  await closeDrawer(page, '#API-status-top', '#rm_api_block');
  return status;
}

/** Character Management (the card icon) → the list of characters and groups. */
export async function openCharacterList(page) {
  if (!(await page.locator('#right-nav-panel').isVisible())) {
    await page.locator('#rightNavDrawerIcon').click();
  }
  await page.locator('#rm_button_characters').click();
  await page.locator('#rm_print_characters_block').waitFor({ state: 'visible' });
}

/**
 * Opens a group from the character list (a click on its entry) and waits
 * until its chat shows the members' greetings. Returns the chat.
 */
export async function openGroup(page, groupId, { greetings = 0, timeoutMs = 30000 } = {}) {
  await openCharacterList(page);
  await page.locator(`#rm_print_characters_block .group_select[data-grid="${groupId}"]`).click();
  await page.waitForFunction(([id, n]) => {
    const c = SillyTavern.getContext();
    return String(c.groupId) === id && c.chat.length >= n && document.querySelectorAll('#chat .mes').length >= n;
  }, [String(groupId), greetings], { timeout: timeoutMs });
  return (await stContext(page)).chat;
}

/**
 * Opens a character's chat from the character list (a click on its card):
 * SillyTavern starts a chat with the greeting if it has none.
 */
export async function openCharacter(page, name, { timeoutMs = 30000 } = {}) {
  await openCharacterList(page);
  await page.locator('#rm_print_characters_block .character_select', { has: page.locator('.ch_name', { hasText: exactly(name) }) }).click();
  await page.waitForFunction((n) => {
    const c = SillyTavern.getContext();
    return !c.groupId && c.name2 === n && c.chat.length >= 1 && document.querySelectorAll('#chat .mes').length >= 1;
  }, name, { timeout: timeoutMs });
  return (await stContext(page)).chat;
}

/** Closes the right-hand panel so the chat is fully visible (screenshots). */
export async function closeCharacterPanel(page) {
  await closeDrawer(page, '#rightNavDrawerIcon', '#right-nav-panel');
}

/** True while SillyTavern generates (its stop button is shown). */
function isGenerating(page) {
  return page.evaluate(() => {
    const stop = document.querySelector('#mes_stop');
    return !!stop && getComputedStyle(stop).display !== 'none';
  });
}

/**
 * Waits until SillyTavern has sent `requests` more generation requests
 * than `since` (a probe count) and is idle again: the stop button hidden
 * for `settleMs` in a row (a group round hands from one member to the next
 * without the user getting control back in between, but the button can
 * blink between members).
 */
export async function waitGenerations(page, since, requests, { timeoutMs = 120000, settleMs = 1200 } = {}) {
  const deadline = Date.now() + timeoutMs;
  let idleSince = null;
  for (;;) {
    const probe = await readProbe(page);
    const sent = probe.requests.length - since;
    const busy = await isGenerating(page);
    if (sent >= requests && !busy) {
      idleSince ??= Date.now();
      if (Date.now() - idleSince >= settleMs) return probe;
    } else {
      idleSince = null;
    }
    if (Date.now() > deadline) {
      throw new Error(`SillyTavern sent ${sent} of ${requests} generation requests and is ${busy ? 'still generating' : 'idle'} after ${timeoutMs} ms`);
    }
    await sleep(150);
  }
}

/** Number of generation requests the probe has seen. */
export async function requestCount(page) {
  return (await readProbe(page)).requests.length;
}

/** Types a message in the chat box and clicks Send. */
export async function sendMessage(page, text) {
  await page.locator('#send_textarea').fill(text);
  await page.locator('#send_but').click();
}

/**
 * The group panel's "Trigger a message from this character" button
 * (speech bubble) on a member.
 */
export async function triggerMember(page, name) {
  if (!(await page.locator('#rm_group_members').isVisible())) {
    await page.locator('#rightNavDrawerIcon').click();
  }
  const member = page.locator('#rm_group_members .group_member', { has: page.locator('.ch_name', { hasText: exactly(name) }) });
  await member.locator('[data-action="speak"]').click();
}

/** Swipe right on the last message: a new swipe is generated for it. */
export async function swipeLast(page) {
  await page.locator('#chat .mes.last_mes .swipe_right').click();
}

/** Options menu (☰ left of the chat box) → an entry. */
async function optionsMenu(page, id) {
  await page.locator('#options_button').click();
  await page.locator(id).click();
}

/** Options → "Continue": the last message is extended. */
export function continueLast(page) { return optionsMenu(page, '#option_continue'); }

/** Options → "Impersonate": the AI writes the user's next message into the box. */
export function impersonate(page) { return optionsMenu(page, '#option_impersonate'); }

/**
 * Options → "Regenerate": the last reply again. In a group SillyTavern
 * deletes the last round's replies and runs the group again as a normal
 * turn (group-chats.js regenerateGroup); in a 1:1 chat a 'regenerate'.
 */
export function regenerate(page) { return optionsMenu(page, '#option_regenerate'); }

/**
 * Options → "Start new chat" → Yes: a new chat (a new chat file) with the
 * same character or group, opened with the greeting(s). Resolves once the
 * page shows a chat other than the one before.
 */
export async function startNewChat(page, { greetings = 1, timeoutMs = 30000 } = {}) {
  const before = await page.evaluate(() => SillyTavern.getContext().chatId);
  await optionsMenu(page, '#option_start_new_chat');
  await page.locator('dialog.popup[open] .popup-button-ok').click();
  await page.waitForFunction(([was, n]) => {
    const c = SillyTavern.getContext();
    return c.chatId && c.chatId !== was && c.chat.length >= n && document.querySelectorAll('#chat .mes').length >= n;
  }, [before, greetings], { timeout: timeoutMs });
  return page.evaluate(() => SillyTavern.getContext().chatId);
}

/** The chat box's text. */
export function inputText(page) {
  return page.locator('#send_textarea').inputValue();
}

/** Errors SillyTavern showed as toasts (`.toast-error`) so far. */
export async function errorToasts(page) {
  return (await readProbe(page)).toasts.filter((t) => /toast-error/.test(t.cls));
}
