// The saves: chat → character → saves (time, tag, kind, tokens, size,
// whether an upstream serves its model), with a search, loading saves into
// slots (POST /load: one, or several chosen at once) and deleting a save
// after a confirmation (DELETE /files/{name}).

import * as api from './api.js';
import { ask, busy, byId, fill, h, toast } from './dom.js';
import { bytes, count, when } from './format.js';
import { learn } from './state.js';

const chosen = new Set();
let chats = [];
let loaded = false;
let onChange = () => {};

/** `changed()` is called after a save was deleted. */
export function init({ changed } = {}) {
    onChange = changed ?? onChange;
    let timer = null;
    byId('saves-search').addEventListener('input', () => {
        clearTimeout(timer);
        timer = setTimeout(() => refresh(), 250);
    });
    byId('saves-load').addEventListener('click', (e) => loadFiles(e.currentTarget, [...chosen]));
}

/** Whether the saves were read at least once (then events keep them fresh). */
export const wasLoaded = () => loaded;

/** Reads the saves (with the search) and redraws. */
export async function refresh() {
    const q = byId('saves-search').value.trim();
    const answer = await api.saves(q);
    chats = answer.chats ?? [];
    loaded = true;
    for (const c of chats) {
        for (const ch of c.characters) {
            learn(c.chat, ch.character);
        }
    }
    const files = new Set(chats.flatMap((c) => c.characters.flatMap((ch) => ch.saves.map((s) => s.file))));
    for (const f of [...chosen]) {
        if (!files.has(f)) {
            chosen.delete(f);
        }
    }
    render(q);
}

function render(q) {
    updateChosen();
    const box = byId('saves-list');
    if (!chats.length) {
        fill(box, h('p', { class: 'empty' }, q ? `No save matches “${q}”.` : 'No save yet.'));
        return;
    }
    const total = chats.reduce((n, c) => n + c.characters.reduce((m, ch) => m + ch.saves.length, 0), 0);
    fill(box,
        h('p', { class: 'muted' }, `${count(total)} saves in ${count(chats.length)} chat(s)`),
        chats.map((c) => h('details', { class: 'card chat', open: true, dataset: { chat: c.chat } },
            h('summary', {}, h('span', { class: 'chat-name' }, c.chat),
                h('span', { class: 'muted' }, ` · ${c.characters.map((ch) => ch.character).join(', ')}`)),
            c.characters.map((ch) => characterBlock(c.chat, ch)))));
}

function characterBlock(chat, ch) {
    return h('section', { class: 'character', dataset: { character: ch.character } },
        h('h4', {}, ch.character, h('span', { class: 'muted' }, ` · ${ch.saves.length} save(s)`)),
        h('div', { class: 'table-wrap' }, h('table', { class: 'saves' },
            h('thead', {}, h('tr', {}, ['', 'Saved', 'Tag', 'Kind', 'Tokens', 'Size', 'Model', ''].map((t) => h('th', { scope: 'col' }, t)))),
            h('tbody', {}, ch.saves.map((s) => saveRow(chat, ch.character, s))))));
}

function modelCell(s) {
    if (s.model_match === true) {
        return h('span', { class: 'badge ok', title: s.model ?? '' }, 'this model');
    }
    if (s.model_match === false) {
        return h('span', { class: 'badge bad', title: s.model ?? '' }, 'other model');
    }
    return h('span', { class: 'muted', title: 'the save or the upstreams\' model is not known' }, '?');
}

function saveRow(chat, character, s) {
    const pick = h('input', {
        type: 'checkbox',
        checked: chosen.has(s.file),
        disabled: s.model_match === false,
        'aria-label': `choose ${s.file}`,
        onchange: (e) => {
            if (e.currentTarget.checked) {
                chosen.add(s.file);
            } else {
                chosen.delete(s.file);
            }
            updateChosen();
        },
    });
    return h('tr', { class: 'save-row', dataset: { file: s.file, tag: s.tag ?? '', kind: s.kind }, title: s.file },
        h('td', {}, pick),
        h('td', { class: 'when' }, when(s.created)),
        h('td', { class: 'tag' }, s.tag ? h('span', { class: 'badge tag' }, s.tag) : ''),
        h('td', {}, s.kind),
        h('td', { class: 'num' }, count(s.tokens)),
        h('td', { class: 'num' }, bytes(s.bytes)),
        h('td', {}, modelCell(s)),
        h('td', { class: 'actions' },
            h('button', {
                class: 'small load', disabled: s.model_match === false,
                title: `Load ${character}'s save into a slot`,
                onclick: (e) => loadFiles(e.currentTarget, [s.file]),
            }, 'Load'),
            h('button', {
                class: 'small danger delete', title: 'Delete this save from disk',
                onclick: (e) => remove(e.currentTarget, s),
            }, 'Delete')));
}

function updateChosen() {
    const button = byId('saves-load');
    button.disabled = chosen.size === 0;
    button.textContent = chosen.size ? `Load ${chosen.size} chosen` : 'Load chosen';
}

async function loadFiles(button, files) {
    if (!files.length) {
        return;
    }
    const answer = await busy(button, 'Loading…', () => api.load(files.map((file) => ({ file }))));
    if (!answer) {
        return;
    }
    for (const l of answer.loaded ?? []) {
        toast(`Loaded ${l.character} into slot ${l.slot} of ${l.upstream} (${count(l.tokens)} tokens)`, 'ok');
    }
    for (const f of answer.failed ?? []) {
        toast(`Loading ${f.file} failed: ${f.reason}`, 'error');
    }
    chosen.clear();
    updateChosen();
    for (const box of document.querySelectorAll('#saves-list input[type=checkbox]')) {
        box.checked = false;
    }
}

async function remove(button, s) {
    const ok = await ask({
        title: 'Delete this save?',
        message: [
            h('p', {}, 'The file and its metadata are removed from the save directory. This can\'t be undone.'),
            h('p', { class: 'mono' }, s.file),
        ],
        confirm: 'Delete',
        danger: true,
    });
    if (!ok) {
        return;
    }
    const answer = await busy(button, '…', () => api.deleteFile(s.file));
    if (answer) {
        toast(`Deleted ${s.file}`, 'ok');
        chosen.delete(s.file);
        onChange();
        await refresh().catch((e) => toast(e.message, 'error'));
    }
}
