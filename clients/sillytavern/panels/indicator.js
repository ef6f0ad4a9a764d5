// The indicator: for each character of the chat open now, the slot kvgate
// gave it and how many of its messages are unsaved, with the messages left
// until kvgate's next autosave; a one-line summary sits in the drawer's
// header so it shows with the drawer closed.
//
// Stable hooks for UI tests:
//   #kvgate_indicator_summary            the header line
//   #kvgate_indicator                    the list
//   [data-kvgate="indicator-row"]        one per character, with
//       data-character="<name>", data-slot="<id>|" (empty: no slot),
//       data-unsaved="<n>|", data-autosave-in="<n>|"
//
// Autosave arithmetic (README, "Cache files"): a character is autosaved
// every save_every messages, or every 2 × save_every with idle saves on
// (idle_save_s > 0), since the idle save usually comes first; GET /slots
// counts its unsaved messages in messages_since_save.

import { chatCharacters, currentChatKey, describeChat } from '../chat.js';
import { kvgateView, subscribe } from '../model.js';

/** The slot holding `name`'s cache for `chatKey` (also as a sharing member), else any chat's. */
function slotOf(slots, name, chatKey) {
    const holds = s => s.character === name || (s.also_holds ?? []).includes(name);
    return slots.find(s => holds(s) && s.chat === chatKey) ?? slots.find(holds) ?? null;
}

/** Messages left until the next autosave, or null when autosave is off or unknown. */
function autosaveIn(slot, settings) {
    if (!slot || !settings?.autosave || !settings.save_every) {
        return null;
    }
    const every = settings.idle_save_s > 0 ? 2 * settings.save_every : settings.save_every;
    return Math.max(0, every - (slot.messages_since_save ?? 0));
}

function rowFor(character, slot, settings, chatKey) {
    const row = document.createElement('div');
    row.className = 'kvgate-indicator-row';
    row.dataset.kvgate = 'indicator-row';
    row.dataset.character = character.name;
    const left = autosaveIn(slot, settings);
    row.dataset.slot = slot ? String(slot.id) : '';
    row.dataset.unsaved = slot ? String(slot.messages_since_save ?? 0) : '';
    row.dataset.autosaveIn = left === null ? '' : String(left);

    const name = document.createElement('span');
    name.className = 'kvgate-name';
    name.textContent = character.name + (character.muted ? ' (muted)' : '');
    const what = document.createElement('span');
    what.className = 'kvgate-what';
    if (!slot) {
        what.textContent = 'not in a slot';
        what.classList.add('opacity50p');
    } else {
        const parts = [`slot ${slot.id}${slot.upstream && multipleUpstreams() ? ` (${slot.upstream})` : ''}`];
        parts.push(`${slot.messages_since_save ?? 0} unsaved`);
        parts.push(left === null ? 'autosave off' : `autosave in ${left}`);
        if (slot.tokens_cached !== null && slot.tokens_cached !== undefined) {
            parts.push(`${slot.tokens_cached} tokens`);
        }
        if (slot.chat !== chatKey) {
            parts.push(`held for ${describeChat(slot.chat)}`);
        }
        what.textContent = parts.join(' · ');
    }
    row.append(name, what);
    return row;
}

function multipleUpstreams() {
    const slots = kvgateView().slots?.slots ?? [];
    return new Set(slots.map(s => s.upstream)).size > 1;
}

/** The header line: the single character's state, or "n of m in slots". */
function summaryText(rows) {
    if (rows.length === 0) {
        return '';
    }
    if (rows.length === 1) {
        const { slot, autosaveIn: left } = rows[0].dataset;
        if (!slot) {
            return 'no slot';
        }
        return left === '' ? `slot ${slot}` : `slot ${slot} · autosave in ${left}`;
    }
    const inSlots = rows.filter(r => r.dataset.slot !== '').length;
    return `${inSlots}/${rows.length} in slots`;
}

function render(view) {
    const list = document.getElementById('kvgate_indicator');
    const summary = document.getElementById('kvgate_indicator_summary');
    if (!list || !summary) {
        return;
    }
    if (view.error) {
        list.textContent = `kvgate not reachable: ${view.error.message}`;
        summary.textContent = 'offline';
        return;
    }
    const slots = view.slots?.slots ?? [];
    const chatKey = currentChatKey();
    const rows = chatCharacters().map(c => rowFor(c, slotOf(slots, c.name, chatKey), view.settings, chatKey));
    list.replaceChildren(...rows);
    if (rows.length === 0) {
        list.textContent = 'No chat open.';
    }
    summary.textContent = summaryText(rows);
}

/** Draws the indicator after every refresh of kvgate's picture. */
export function mountIndicator() {
    subscribe(render);
}

/** Draws it again from the last picture (the chat changed). */
export function redrawIndicator() {
    render(kvgateView());
}
