// Group preload: pick a chat and its characters (those kvgate's saves,
// slots and events have named), start a job (POST /preload), follow its
// progress from `preload_progress` events, cancel it (DELETE /preload/{id}).
// Each character restores its best save, or else has the last prompt
// kvgate saw for it evaluated, and is saved.

import * as api from './api.js';
import { busy, byId, fill, h, toast } from './dom.js';
import { charactersOf, knownChats, onLearn } from './state.js';

const jobs = new Map(); // id → progress

export function init() {
    byId('preload-chat').addEventListener('input', () => {
        renderChats();
        renderCharacters();
    });
    byId('preload-form').addEventListener('submit', (e) => {
        e.preventDefault();
        start(e.submitter ?? byId('preload-start'));
    });
    onLearn(() => {
        renderChats();
        renderCharacters();
    });
    renderChats();
    renderCharacters();
    renderJobs();
}

function renderChats() {
    const chats = knownChats();
    fill(byId('preload-chats'), chats.map((c) => h('option', { value: c })));
    const chosen = byId('preload-chat').value.trim();
    fill(byId('preload-known'), chats.length
        ? chats.map((c) => h('button', {
            type: 'button',
            class: ['chip', c === chosen ? 'active' : null],
            dataset: { chat: c },
            onclick: () => {
                byId('preload-chat').value = c;
                renderChats();
                renderCharacters();
            },
        }, c))
        : h('span', { class: 'muted' }, 'none seen yet'));
}

function renderCharacters() {
    const box = byId('preload-characters');
    const chat = byId('preload-chat').value.trim();
    const names = charactersOf(chat);
    const was = new Set([...box.querySelectorAll('input:checked')].map((i) => i.value));
    if (!chat) {
        fill(box, h('p', { class: 'muted' }, 'Choose a chat first.'));
        return;
    }
    if (!names.length) {
        fill(box, h('p', { class: 'muted' }, 'kvgate has not seen a character of this chat yet: name them below.'));
        return;
    }
    fill(box, names.map((n) => h('label', { class: 'check' },
        h('input', { type: 'checkbox', value: n, checked: was.has(n), name: 'character' }), ` ${n}`)));
}

async function start(button) {
    const chat = byId('preload-chat').value.trim();
    const picked = [...byId('preload-characters').querySelectorAll('input:checked')].map((i) => i.value);
    const more = byId('preload-more').value.split(',').map((s) => s.trim()).filter(Boolean);
    const characters = [...new Set([...picked, ...more])];
    const answer = await busy(button, 'Starting…', () => api.startPreload({ chat, characters }));
    if (!answer) {
        return;
    }
    toast(`Preload ${answer.id} started on ${answer.upstream}`, 'ok');
    const progress = await api.preloadProgress(answer.id).catch(() => null);
    update(progress ?? { id: answer.id, chat, state: 'running', done: 0, total: characters.length, succeeded: [], failed: [] });
}

/** Takes in a `preload_progress` event. */
export function onEvent(ev) {
    if (ev.type === 'preload_progress') {
        update(ev);
    }
}

function update(p) {
    const known = jobs.get(p.id);
    // Events and the first GET may cross: never go back in progress.
    if (known && known.state !== 'running' && p.state === 'running') {
        return;
    }
    if (known && p.state === 'running' && p.done < known.done) {
        return;
    }
    jobs.set(p.id, p);
    renderJobs();
}

function renderJobs() {
    const box = byId('preload-jobs');
    if (!jobs.size) {
        fill(box, h('p', { class: 'muted' }, 'No preload since this page opened.'));
        return;
    }
    const list = [...jobs.values()].sort((a, b) => b.id - a.id);
    fill(box, list.map((p) => {
        const bar = h('progress', { max: p.total || 1, value: p.done });
        return h('article', { class: 'card job', dataset: { job: p.id, state: p.state } },
            h('header', { class: 'card-head' },
                h('h3', {}, `Preload ${p.id}`),
                h('span', { class: ['badge', p.state === 'done' ? 'ok' : p.state === 'running' ? 'busy' : 'bad'] }, p.state),
                h('span', { class: 'muted' }, p.chat),
                h('span', { class: 'spacer' }),
                p.state === 'running'
                    ? h('button', { class: 'small danger', onclick: (e) => cancel(e.currentTarget, p.id) }, 'Cancel')
                    : null),
            h('div', { class: 'job-progress' }, bar,
                h('span', { class: 'job-count' }, ` ${p.done} / ${p.total}`),
                p.current && p.state === 'running' ? h('span', { class: 'muted' }, ` · now ${p.current}`) : null),
            (p.succeeded ?? []).length
                ? h('ul', { class: 'job-done' }, p.succeeded.map((s) => h('li', {},
                    `${s.character}: ${typeof s.result === 'string' ? s.result : JSON.stringify(s.result)}`)))
                : null,
            (p.failed ?? []).length
                ? h('ul', { class: 'job-failed' }, p.failed.map((f) => h('li', {}, `${f.character}: ${f.reason}`)))
                : null);
    }));
}

async function cancel(button, id) {
    const answer = await busy(button, 'Cancelling…', () => api.cancelPreload(id));
    if (answer) {
        update(answer);
    }
}
