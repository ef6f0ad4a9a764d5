// The event feed: kvgate's events as they come, newest first, each in one
// line of words (the raw event in its tooltip), filterable by kind, with a
// pause. Keeps the last MAX_LINES.

import { byId, h } from './dom.js';
import { basename, bytes, clock, count, ms } from './format.js';

const MAX_LINES = 300;

/** Which filter shows which event types. */
const GROUPS = {
    turns: ['generation_started', 'generation_finished', 'slot_assigned', 'slot_released', 'prefill_ahead', 'queue'],
    disk: ['saved', 'save_failed', 'restored', 'restore_failed', 'evicted', 'ram_cache_miss'],
    fleet: ['upstream_up', 'upstream_down', 'instance', 'preload_progress'],
};

const who = (e) => e.character ?? (e.chat ? 'a prompt' : 'a prompt naming nobody');

/** One line of words per event type; others show their fields. */
const SAY = {
    slot_assigned: (e) => `${who(e)} → slot ${e.slot}${e.resident ? ' (resident)' : ''} for a ${e.kind} turn in ${e.chat ?? '?'}`,
    evicted: (e) => `${who(e)} gave up slot ${e.slot}${e.usage ? ` with ${e.usage} unsaved message(s)` : ''}`,
    restored: (e) => `${who(e)} restored into slot ${e.slot}: ${count(e.tokens)} tokens in ${ms(e.ms)} from ${basename(e.file)}${e.tag ? ` (tag “${e.tag}”)` : ''}`,
    restore_failed: (e) => `${who(e)}: restore into slot ${e.slot} failed: ${e.reason}`,
    saved: (e) => `${who(e)} saved (${e.kind}${e.tag ? `, tag “${e.tag}”` : ''}): ${count(e.tokens)} tokens, ${bytes(e.bytes)} in ${ms(e.ms)}`,
    save_failed: (e) => `${who(e)}: ${e.kind} save of slot ${e.slot} failed: ${e.reason}`,
    generation_started: (e) => `${who(e)} generating in slot ${e.slot} (${e.kind}, cache ${e.cache}, ${e.source})`,
    slot_released: (e) => `slot ${e.slot} free again after ${who(e)}'s turn`,
    generation_finished: (e) => `${who(e)} done in slot ${e.slot}: ${count(e.cache_n)} tokens reused, ${count(e.prompt_n)} evaluated, first token ${ms(e.ttft_ms)} (${e.outcome})`,
    preload_progress: (e) => `preload ${e.id} of ${e.chat}: ${e.done}/${e.total} ${e.state}${e.current ? `, now ${e.current}` : ''}`,
    upstream_up: (e) => `up at ${e.url} with ${e.slots} slots`,
    upstream_down: (e) => `down: ${e.error}`,
    instance: (e) => `instance ${e.id} ${e.status}${e.error ? `: ${e.error}` : ''}`,
    queue: (e) => `${e.queued} request(s) waiting for a slot`,
    prefill_ahead: (e) => `read ahead for ${who(e)} in slot ${e.slot}: ${count(e.evaluated)} tokens in ${ms(e.ms)}`,
    ram_cache_miss: (e) => `${who(e)}: llama-server's RAM cache missed; restoring from disk from now on`,
};

function describe(e) {
    const say = SAY[e.type];
    if (say) {
        try {
            return say(e);
        } catch {
            // A field of another shape: show the fields instead.
        }
    }
    const { type, seq, time_ms: t, upstream, ...rest } = e;
    return JSON.stringify(rest);
}

function groupOf(type) {
    return Object.entries(GROUPS).find(([, types]) => types.includes(type))?.[0] ?? 'other';
}

let paused = false;
const held = [];

export function init() {
    byId('feed-pause').addEventListener('change', (e) => {
        paused = e.currentTarget.checked;
        if (!paused) {
            held.splice(0).forEach(show);
        }
    });
    byId('feed-filter').addEventListener('change', applyFilter);
}

function applyFilter() {
    const want = byId('feed-filter').value;
    for (const li of byId('feed').children) {
        li.hidden = want !== 'all' && li.dataset.group !== want;
    }
}

/** Takes in one event. */
export function onEvent(e) {
    if (paused) {
        held.push(e);
        if (held.length > MAX_LINES) {
            held.shift();
        }
        return;
    }
    show(e);
}

function show(e) {
    const list = byId('feed');
    const group = groupOf(e.type);
    const want = byId('feed-filter').value;
    const li = h('li', {
        class: ['feed-line', group, e.type.endsWith('failed') || e.type === 'upstream_down' ? 'bad' : null],
        dataset: { type: e.type, group },
        title: JSON.stringify(e),
        hidden: want !== 'all' && group !== want,
    },
    h('time', {}, clock(e.time_ms ?? Date.now())),
    h('span', { class: 'type' }, e.type.replaceAll('_', ' ')),
    e.upstream ? h('span', { class: 'where' }, e.upstream) : null,
    h('span', { class: 'what' }, describe(e)));
    list.prepend(li);
    while (list.children.length > MAX_LINES) {
        list.lastElementChild.remove();
    }
    byId('feed-count').textContent = `${list.children.length} shown`;
}
