// The live view: every upstream with its state and queue, and its slots —
// who holds each (character, chat, the chat's other characters sharing its
// prefix), busy or idle, messages since the last save, tokens cached, the
// save it was restored from — with save, tagged save and clear actions.
// Re-read from /upstreams and /slots after each event that changes them.

import * as api from './api.js';
import { ask, busy, byId, fill, h, table, toast } from './dom.js';
import { ago, basename, bytes, count } from './format.js';
import { learn } from './state.js';

let upstreams = [];
let slots = [];
let queued = 0;
let disk = null;
// What each slot showed last, to flash the rows that changed.
const shown = new Map();

/** Reads the upstreams and slots and redraws. */
export async function refresh() {
    const [u, s] = await Promise.all([api.upstreams(), api.slots()]);
    upstreams = u.upstreams ?? [];
    slots = s.slots ?? [];
    queued = s.queued ?? 0;
    for (const slot of slots) {
        learn(slot.chat, slot.character);
        for (const other of slot.also_holds ?? []) {
            learn(slot.chat, other);
        }
    }
    render();
}

/**
 * Takes in an event: a `queue` event carries the upstream's queue length,
 * shown at once (a request may wait only a moment).
 */
export function onEvent(ev) {
    if (ev.type !== 'queue') {
        return;
    }
    const u = upstreams.find((x) => x.name === ev.upstream);
    if (u && typeof ev.queued === 'number') {
        u.queued = ev.queued;
        queued = upstreams.reduce((n, x) => n + (x.queued ?? 0), 0);
        render();
    }
}

/** The save directory's disk use from /health (for the summary). */
export function setDisk(d) {
    disk = d;
    renderSummary();
}

export function init() {
    byId('save-all').addEventListener('click', (e) => saveAll(e.currentTarget, false));
    byId('save-all-tag').addEventListener('click', (e) => saveAll(e.currentTarget, true));
    byId('clear-slots').addEventListener('click', (e) => clearAll(e.currentTarget));
}

function render() {
    renderSummary();
    const box = byId('upstreams');
    if (!upstreams.length) {
        fill(box, h('p', { class: 'empty' },
            'kvgate has no upstream right now: every instance is stopped. Start one under Instances.'));
        return;
    }
    fill(box, upstreams.map(upstreamCard));
}

function renderSummary() {
    const up = upstreams.filter((u) => u.up).length;
    const busyNow = slots.filter((s) => s.busy).length;
    const held = slots.filter((s) => s.character).length;
    const tile = (label, value, note, id) => h('div', { class: 'tile', id },
        h('span', { class: 'tile-label' }, label),
        h('span', { class: 'tile-value' }, value),
        note ? h('span', { class: 'tile-note' }, note) : null);
    fill(byId('summary'),
        tile('Upstreams up', `${up} / ${upstreams.length}`, null, 'tile-upstreams'),
        tile('Slots busy', `${busyNow} / ${slots.length}`, `${held} hold a character`, 'tile-slots'),
        tile('Queue', count(queued), queued ? 'requests waiting for a slot' : 'nobody waiting', 'tile-queue'),
        tile('Save directory', disk ? bytes(disk.bytes) : '–',
            disk ? `${count(disk.files)} files${disk.free_bytes != null ? `, ${bytes(disk.free_bytes)} free` : ''}` : 'no --save-dir', 'tile-disk'));
}

function upstreamCard(u) {
    const mine = slots.filter((s) => s.upstream === u.name);
    return h('article', { class: 'card upstream', dataset: { upstream: u.name } },
        h('header', { class: 'card-head' },
            h('h3', {}, u.name),
            h('span', { class: ['badge', u.up ? 'ok' : 'bad'] }, u.up ? 'up' : 'down'),
            h('span', { class: 'muted', title: u.url }, u.url),
            u.model ? h('span', { class: 'muted model', title: u.fingerprint ?? '' }, u.model) : null,
            h('span', { class: 'spacer' }),
            h('span', { class: 'meter' },
                `${u.slots} slots: ${u.slots_busy} busy · ${Math.max(0, u.slots - u.slots_busy - u.slots_free)} idle · ${u.slots_free} free`),
            h('span', { class: ['queue', u.queued ? 'waiting' : null], dataset: { queued: u.queued } },
                `queue ${u.queued}`)),
        mine.length
            ? table(['Slot', 'Character · chat', 'State', 'Unsaved', 'Tokens', 'Restored from', 'Last used', ''],
                mine.map((s) => slotRow(u, s)), { class: 'slots' })
            : h('p', { class: 'empty' }, u.up ? 'kvgate does not know its slots yet.' : 'Unreachable: its slots are unknown.'));
}

function slotRow(u, s) {
    const id = `${s.upstream}/${s.id}`;
    const sig = JSON.stringify([s.character, s.chat, s.busy, s.live, s.messages_since_save, s.tokens_cached, s.restored_from]);
    const changed = shown.has(id) && shown.get(id) !== sig;
    shown.set(id, sig);
    const who = s.character
        ? [h('strong', { class: 'name' }, s.character),
            s.also_holds?.length ? h('span', { class: 'muted also', title: 'earlier speakers whose cache is a prefix of this one' }, ` + ${s.also_holds.join(', ')}`) : null]
        : s.anonymous ? h('span', { class: 'muted' }, 'a prompt naming nobody') : h('span', { class: 'muted' }, 'free');
    const chat = s.chat ? h('span', { class: 'chat', title: s.chat }, s.chat) : null;
    const state = s.busy ? h('span', { class: 'badge busy' }, 'busy')
        : s.character || s.anonymous ? h('span', { class: 'badge idle' }, 'idle')
            : h('span', { class: 'badge free' }, 'free');
    const live = s.character || s.anonymous
        ? h('span', { class: 'muted small', title: 'whether llama-server holds its cache right now' }, s.live ? ' live' : ' on disk')
        : null;
    const unsaved = s.messages_since_save ?? 0;
    const canSave = Boolean(s.character) && s.live;
    return h('tr', {
        class: ['slot-row', changed ? 'changed' : null],
        dataset: { upstream: s.upstream, slot: s.id, character: s.character ?? '', busy: s.busy },
    },
    h('td', { class: 'num' }, s.id),
    h('td', { class: 'who' }, who, chat),
    h('td', { class: 'state' }, state, live),
    h('td', { class: ['num', unsaved ? 'unsaved' : null], title: 'messages since the last save' }, s.character ? count(unsaved) : ''),
    h('td', { class: 'num', title: 'tokens llama-server holds in this slot' }, s.tokens_cached == null ? '–' : count(s.tokens_cached)),
    h('td', { class: 'file', title: s.restored_from ?? '' }, s.restored_from ? basename(s.restored_from) : ''),
    h('td', { class: 'when', dataset: { since: s.last_used ?? '' } }, s.last_used ? ago(s.last_used) : ''),
    h('td', { class: 'actions' },
        h('button', {
            class: 'small', disabled: !canSave, title: 'Save this slot now',
            onclick: (e) => saveSlot(e.currentTarget, u, s, false),
        }, 'Save'),
        h('button', {
            class: 'small', disabled: !canSave, title: 'Save this slot as a bookmark that rotation never deletes',
            onclick: (e) => saveSlot(e.currentTarget, u, s, true),
        }, 'Tag…')));
}

/** Updates the "… ago" cells (no API call). */
export function tick() {
    for (const el of document.querySelectorAll('#upstreams [data-since]')) {
        const t = Number(el.dataset.since);
        if (t) {
            el.textContent = ago(t);
        }
    }
}

async function askTag(what) {
    return ask({
        title: 'Save with a tag',
        message: `A tagged save of ${what} is a bookmark: rotation never deletes it, and loading it later brings the chat back to this point.`,
        input: { label: 'Tag', placeholder: 'before the duel' },
        confirm: 'Save',
        check: (v) => (v.trim() ? null : 'A tag must not be empty.'),
    });
}

/** Tells what a save answer says: the files saved, the failures. */
function report(answer) {
    const saved = answer.saved ?? [];
    const failed = answer.failed ?? [];
    if (saved.length) {
        toast(`Saved ${saved.map((s) => `${s.character} (${s.file})`).join(', ')}`, 'ok');
    } else if (!failed.length) {
        toast('Nothing to save: no slot holds a character\'s live cache.');
    }
    for (const f of failed) {
        toast(`Saving ${f.character ?? `slot ${f.slot}`} failed: ${f.reason}`, 'error');
    }
}

async function saveSlot(button, u, s, tagged) {
    const tag = tagged ? await askTag(s.character) : null;
    if (tagged && tag === null) {
        return;
    }
    const answer = await busy(button, '…', () => api.saveSlot(u.name, s.id, tag?.trim()));
    if (answer) {
        report(answer);
    }
}

async function saveAll(button, tagged) {
    const tag = tagged ? await askTag('every slot holding a character') : null;
    if (tagged && tag === null) {
        return;
    }
    const answer = await busy(button, 'Saving…', () => api.saveAll(tag?.trim()));
    if (answer) {
        report(answer);
    }
}

async function clearAll(button) {
    const erase = await ask({
        title: 'Clear every slot?',
        message: 'Every slot is released: its character restores from disk on its next turn. Unsaved messages are not saved first — use Save all now before, if they matter. Files are not touched.',
        input: { type: 'checkbox', label: 'Also erase the caches in llama-server' },
        confirm: 'Clear slots',
        danger: true,
    });
    if (erase === null) {
        return;
    }
    const answer = await busy(button, 'Clearing…', () => api.clearSlots(Boolean(erase)));
    if (answer) {
        toast(`Cleared ${answer.cleared.length} slot(s)${erase ? `, erased ${answer.erased.length}` : ''}`, 'ok');
    }
}
