// kvgate's dashboard: boots the page (asks for the admin key when kvgate
// has one), follows kvgate's events, and hands each event to the panels
// that show it, re-reading a resource only after an event that changes it.
// No polling: between events nothing is asked of kvgate.

import * as api from './api.js';
import * as charts from './charts.js';
import { ask, byId, fill, h, toast } from './dom.js';
import { follow } from './events.js';
import * as feed from './feed.js';
import * as instances from './instances.js';
import * as live from './live.js';
import * as preload from './preload.js';
import * as saves from './saves.js';
import * as settings from './settings.js';
import { learn, refresher } from './state.js';

const TABS = ['live', 'saves', 'preload', 'instances', 'settings'];

const warn = (e) => toast(e.message, 'error');
const refresh = {
    live: refresher(live.refresh, { onError: warn }),
    health: refresher(readHealth, { delayMs: 300, onError: warn }),
    saves: refresher(saves.refresh, { delayMs: 300, onError: warn }),
    instances: refresher(instances.refresh, { delayMs: 200, onError: warn }),
};
// Tokens cached come from llama-server's /slots, which kvgate reads every
// couple of seconds: one more read of the slots after a burst of events.
let settleTimer = null;

/** Which resources an event changes. */
const TOUCHES = {
    slot_assigned: ['live'],
    evicted: ['live'],
    restored: ['live'],
    restore_failed: ['live'],
    saved: ['live', 'health', 'saves'],
    save_failed: ['live'],
    generation_started: ['live'],
    generation_finished: ['live'],
    slot_released: ['live'],
    prefill_ahead: ['live'],
    ram_cache_miss: ['live'],
    preload_progress: ['live'],
    queue: ['live'],
    upstream_up: ['live', 'instances', 'saves'],
    upstream_down: ['live', 'instances'],
    instance: ['live', 'instances'],
    slots_cleared: ['live'],
    file_deleted: ['health', 'saves'],
};

function onEvent(ev) {
    learn(ev.chat, ev.character);
    live.onEvent(ev);
    feed.onEvent(ev);
    charts.onEvent(ev);
    preload.onEvent(ev);
    for (const what of TOUCHES[ev.type] ?? []) {
        if (what === 'saves' && !saves.wasLoaded()) {
            continue;
        }
        if (what === 'instances' && !instancesShown) {
            continue;
        }
        refresh[what]();
    }
    if (ev.type === 'generation_finished' || ev.type === 'restored') {
        clearTimeout(settleTimer);
        settleTimer = setTimeout(refresh.live, 2500);
    }
}

async function readHealth() {
    const health = await api.health();
    live.setDisk(health.disk);
    charts.addDisk(health.disk);
    byId('save-dir').textContent = health.save_dir ?? 'none (--save-dir not set)';
    return health;
}

// === the admin key ===

let asking = null;

/**
 * Asks for the admin key until kvgate takes one (after a 401). Concurrent
 * callers share one dialog.
 */
function askForKey() {
    asking ??= (async () => {
        const had = Boolean(api.key.get());
        await ask({
            id: 'key-dialog',
            title: 'kvgate needs its admin key',
            message: [
                h('p', {}, had
                    ? 'kvgate no longer takes the key this tab had (was kvgate restarted with another?).'
                    : 'This kvgate was started with an admin key (--admin-key or --admin-key-file). Enter it to use the dashboard.'),
                h('p', { class: 'muted' }, 'It is kept for this browser tab only (sessionStorage) and sent in the X-Admin-Key header, never in a URL.'),
            ],
            input: { type: 'password', label: 'Admin key', autocomplete: 'current-password' },
            confirm: 'Unlock',
            cancel: null,
            check: async (value) => {
                if (!value.trim()) {
                    return 'Enter the key kvgate was started with.';
                }
                api.key.set(value);
                try {
                    await api.health({ reauth: false });
                    return null;
                } catch (e) {
                    api.key.clear();
                    if (api.isUnauthorized(e)) {
                        return `kvgate refused this key (401: ${e.message}). Check the key kvgate was started with.`;
                    }
                    return e.message;
                }
            },
        });
        byId('forget-key').hidden = false;
        asking = null;
    })();
    return asking;
}

function forgetKey() {
    api.key.clear();
    location.reload();
}

// === tabs ===

let instancesShown = false;

function showTab(name) {
    const tab = TABS.includes(name) ? name : 'live';
    for (const t of TABS) {
        byId(`tab-${t}`).hidden = t !== tab;
        const button = byId(`nav-${t}`);
        button.setAttribute('aria-selected', String(t === tab));
        button.classList.toggle('active', t === tab);
    }
    if (tab === 'saves') {
        refresh.saves();
    } else if (tab === 'instances') {
        instancesShown = true;
        refresh.instances();
    } else if (tab === 'settings') {
        settings.refresh().catch(warn);
    }
}

function setConnection(state, error) {
    const pill = byId('conn');
    pill.dataset.state = state;
    pill.textContent = { connecting: 'connecting…', connected: 'live', down: 'reconnecting…' }[state] ?? state;
    pill.title = error ? error.message : 'following kvgate\'s /events';
    if (state === 'connected') {
        // Whatever happened while the stream was down: read it all again.
        refresh.live();
        refresh.health();
        if (saves.wasLoaded()) {
            refresh.saves();
        }
        if (instancesShown) {
            refresh.instances();
        }
    }
}

// === boot ===

async function reachKvgate() {
    for (let delay = 1000; ; delay = Math.min(delay * 2, 30_000)) {
        try {
            return await api.health({ reauth: false });
        } catch (e) {
            if (api.isUnauthorized(e)) {
                await askForKey(e.message);
                continue;
            }
            fill(byId('boot-error'), `kvgate did not answer: ${e.message}. Trying again…`);
            byId('boot-error').hidden = false;
            await new Promise((r) => setTimeout(r, delay));
        }
    }
}

async function boot() {
    api.onUnauthorized(askForKey);
    for (const t of TABS) {
        byId(`nav-${t}`).addEventListener('click', () => { location.hash = t; });
    }
    window.addEventListener('hashchange', () => showTab(location.hash.slice(1)));
    byId('forget-key').addEventListener('click', forgetKey);
    byId('forget-key').hidden = !api.key.get();
    live.init();
    feed.init();
    saves.init({ changed: refresh.health });
    preload.init();
    instances.init();
    settings.init();
    charts.init();
    matchMedia('(prefers-color-scheme: dark)').addEventListener('change', () => charts.rebuild());

    await reachKvgate();
    byId('boot-error').hidden = true;
    instances.setKeyless(!api.key.get());
    document.body.dataset.ready = 'true';
    showTab(location.hash.slice(1));
    follow({ onEvent, onState: setConnection, onUnauthorized: askForKey });
    // What the preload form offers: the chats of the saves.
    saves.refresh().catch(warn);
    // "… ago" and uptimes read from the clock, not from kvgate.
    setInterval(live.tick, 5000);
}

boot().catch((e) => {
    console.error('kvgate dashboard: boot failed', e);
    fill(byId('boot-error'), `The dashboard could not start: ${e.message}`);
    byId('boot-error').hidden = false;
});
