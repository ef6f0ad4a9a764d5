// The llama-server instances kvgate runs: create one (model path, slots,
// context per slot, port, tuning flags), start, stop and delete them, with
// their status, restarts and the tail of llama-server's output. The
// instances API needs an admin key (it starts processes); without one the
// panel says so.

import * as api from './api.js';
import { ask, busy, byId, fill, h, toast } from './dom.js';
import { basename, count, duration, when } from './format.js';

let list = [];
let keyless = false;
const logsOpen = new Set();
const logs = new Map(); // id → {lines, total}

export function init() {
    byId('instance-form').addEventListener('submit', (e) => {
        e.preventDefault();
        create(e.submitter ?? byId('instance-create'));
    });
}

/**
 * kvgate answered without any key, so it has none: the instances API
 * (which starts processes) refuses to work, and is not asked.
 */
export function setKeyless(value) {
    keyless = value;
}

function refused(message) {
    fill(byId('instances-list'), h('p', { class: 'notice', role: 'status' }, message));
    byId('instance-create').disabled = true;
}

/** Reads the instances (and the logs shown) and redraws. */
export async function refresh() {
    if (keyless) {
        refused('kvgate runs without an admin key, and the instances API starts processes, so it needs one: '
            + 'start kvgate with --admin-key or --admin-key-file.');
        return;
    }
    try {
        list = (await api.instances()).instances ?? [];
    } catch (e) {
        if (e.status === 401) {
            refused(e.message);
            return;
        }
        throw e;
    }
    byId('instance-create').disabled = false;
    await Promise.all([...logsOpen].filter((id) => list.some((i) => i.id === id)).map(readLog));
    render();
}

async function readLog(id) {
    try {
        logs.set(id, await api.instanceLog(id));
    } catch (e) {
        logs.set(id, { lines: [`(could not read the log: ${e.message})`], total: 0 });
    }
}

/** Splits a flags field like a shell would for plain words and quotes. */
export function splitArgs(text) {
    const out = [];
    const re = /"([^"]*)"|'([^']*)'|(\S+)/g;
    let m;
    while ((m = re.exec(text)) !== null) {
        out.push(m[1] ?? m[2] ?? m[3]);
    }
    return out;
}

function numberOrNothing(id) {
    const raw = byId(id).value.trim();
    return raw === '' ? undefined : Number(raw);
}

async function create(button) {
    const spec = {
        model: byId('instance-model').value.trim(),
        slots: numberOrNothing('instance-slots'),
        ctx: numberOrNothing('instance-ctx'),
        port: numberOrNothing('instance-port'),
        args: splitArgs(byId('instance-args').value),
    };
    for (const k of Object.keys(spec)) {
        if (spec[k] === undefined) {
            delete spec[k];
        }
    }
    const problem = byId('instance-error');
    problem.hidden = true;
    byId('instance-starting').hidden = false;
    try {
        const made = await busy(button, 'Starting llama-server…', async () => {
            try {
                return await api.createInstance(spec);
            } catch (e) {
                problem.textContent = e.message;
                problem.hidden = false;
                return undefined;
            }
        });
        if (made) {
            toast(`Instance ${made.id} runs ${basename(made.model)} at ${made.url}`, 'ok');
        }
    } finally {
        byId('instance-starting').hidden = true;
    }
    await refresh().catch((e) => toast(e.message, 'error'));
}

function render() {
    const box = byId('instances-list');
    if (!list.length) {
        fill(box, h('p', { class: 'empty' }, 'kvgate runs no llama-server of its own. Create one below, or start kvgate with --model.'));
        return;
    }
    fill(box, list.map(card));
    // The newest lines are what matters.
    for (const pre of box.querySelectorAll('pre.log-lines')) {
        pre.scrollTop = pre.scrollHeight;
    }
}

function statusClass(s) {
    return { running: 'ok', stopped: 'idle', failed: 'bad', starting: 'busy', stopping: 'busy' }[s] ?? 'idle';
}

function card(i) {
    const running = i.status === 'running';
    const fact = (label, value, title) => h('div', { class: 'fact' },
        h('dt', {}, label), h('dd', { title: title ?? '' }, value));
    const open = logsOpen.has(i.id);
    const log = logs.get(i.id);
    return h('article', { class: 'card instance', dataset: { instance: i.id, status: i.status } },
        h('header', { class: 'card-head' },
            h('h3', {}, i.id),
            h('span', { class: ['badge', statusClass(i.status)] }, i.restarting ? 'restarting' : i.status),
            h('span', { class: 'muted', title: i.model }, basename(i.model)),
            h('span', { class: 'spacer' }),
            h('button', {
                class: 'small start', disabled: running || i.status === 'starting' || i.status === 'stopping',
                onclick: (e) => act(e.currentTarget, i.id, 'start'),
            }, 'Start'),
            h('button', {
                class: 'small stop', disabled: !running,
                onclick: (e) => act(e.currentTarget, i.id, 'stop'),
            }, 'Stop'),
            i.origin === 'api'
                ? h('button', { class: 'small danger delete', onclick: (e) => remove(e.currentTarget, i) }, 'Delete')
                : null),
        h('dl', { class: 'facts' },
            fact('Slots × context', `${i.slots} × ${count(i.ctx)}`),
            fact('Port', i.port ?? 'free one'),
            fact('PID', i.pid ?? '–'),
            fact('Up for', running && i.uptime_s != null ? duration(i.uptime_s) : '–'),
            fact('Restarts', count(i.restarts)),
            fact('Slots busy / free / held', running ? `${i.slots_busy ?? 0} / ${i.slots_free ?? 0} / ${i.slots_owned ?? 0}` : '–'),
            fact('Flags', i.args?.length ? i.args.join(' ') : 'none'),
            fact('Created', when(i.created)),
            fact('Origin', i.origin === 'flag' ? '--model' : 'admin API')),
        i.error ? h('p', { class: 'error' }, i.error) : null,
        h('details', {
            class: 'log', open,
            ontoggle: async (e) => {
                if (e.currentTarget.open === logsOpen.has(i.id)) {
                    return;
                }
                if (e.currentTarget.open) {
                    logsOpen.add(i.id);
                    await readLog(i.id);
                    render();
                } else {
                    logsOpen.delete(i.id);
                }
            },
        },
        h('summary', {}, 'llama-server\'s output', log ? h('span', { class: 'muted' }, ` · last ${log.lines.length} of ${count(log.total)} lines`) : null),
        open ? h('div', { class: 'log-tools' },
            h('button', {
                class: 'small', onclick: async () => { await readLog(i.id); render(); },
            }, 'Refresh')) : null,
        open ? h('pre', { class: 'log-lines' }, (log?.lines ?? []).join('\n') || '(nothing yet)') : null));
}

async function act(button, id, action) {
    const label = action === 'stop' ? 'Stopping…' : 'Starting…';
    const answer = await busy(button, label, () => api.instanceAction(id, action));
    if (answer) {
        toast(`Instance ${id} ${answer.status}`, 'ok');
    }
    await refresh().catch((e) => toast(e.message, 'error'));
}

async function remove(button, i) {
    const ok = await ask({
        title: `Delete instance ${i.id}?`,
        message: 'Its slots with unsaved messages are saved, its llama-server is stopped and its record is removed. Saves stay on disk.',
        confirm: 'Delete',
        danger: true,
    });
    if (!ok) {
        return;
    }
    const answer = await busy(button, '…', () => api.deleteInstance(i.id));
    if (answer) {
        toast(`Instance ${i.id} deleted`, 'ok');
        logsOpen.delete(i.id);
        logs.delete(i.id);
    }
    await refresh().catch((e) => toast(e.message, 'error'));
}
