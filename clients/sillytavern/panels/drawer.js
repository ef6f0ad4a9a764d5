// kvgate's drawer in ST's Extensions panel (an inline-drawer, like ST's own
// extensions): this chat's indicator and actions, the slot list, kvgate's
// live settings, and the connection settings with "Test connection".
//
// Stable hooks for UI tests: the ids below (in settings.html); each element
// also carries a data-kvgate name (the id without "kvgate_", hyphenated).
// Preset the admin URL in extension_settings.kvgate.adminUrl (settings.json)
// to keep the page from trying the default http://127.0.0.1:8090 first.
//   #kvgate_settings            the drawer's root
//   #kvgate_drawer_header       the drawer's toggle (click to open)
//   #kvgate_stream_state        event stream dot, data-state="connecting|connected|down"
//   #kvgate_indicator_summary   see panels/indicator.js
//   #kvgate_save_now, #kvgate_save_tag, #kvgate_slots_refresh, #kvgate_clear_slots
//                               see panels/slots.js
//   #kvgate_load                opens the load popup (panels/load-popup.js)
//   #kvgate_preload             opens the preload popup (panels/preload-popup.js)
//   #kvgate_srv_*               see panels/server-settings.js
//   #kvgate_admin_url, #kvgate_admin_key
//                               text inputs, saved on change (input event, debounced)
//   #kvgate_toasts, #kvgate_identity
//                               checkboxes, saved on change
//   #kvgate_test                "Test connection": GET /health into #kvgate_health,
//                               data-ok="true|false" on #kvgate_health after it
//   #kvgate_cors_hint           the --admin-cors-origin to start kvgate with

import * as api from '../api.js';
import { refresh } from '../model.js';
import { restartStream, onStreamState } from '../live.js';
import { tell, tellError } from '../notify.js';
import { setSetting, settings } from '../settings.js';
import { pageOrigin } from '../st.js';
import { mountIndicator } from './indicator.js';
import { openLoadPopup } from './load-popup.js';
import { openPreloadPopup } from './preload-popup.js';
import { mountServerSettings } from './server-settings.js';
import { mountSlots } from './slots.js';

const byId = (id) => document.getElementById(id);

/** The drawer's HTML, from this extension's folder, wherever it is installed. */
async function template() {
    const response = await fetch(new URL('../settings.html', import.meta.url));
    if (!response.ok) {
        throw new Error(`settings.html: ${response.status}`);
    }
    return response.text();
}

/** "kvgate ok · upstream-1 up, model x.gguf, 1/2 slots free · saves in /dir". */
function describeHealth(health) {
    const lines = [`kvgate: ${health.status}`];
    for (const u of health.upstreams ?? (health.upstream ? [health.upstream] : [])) {
        lines.push(`${u.name}: ${u.up ? 'up' : 'DOWN'} · ${u.url} · model ${u.model ?? '?'} · ${u.slots_free}/${u.slots} slots free${u.queued ? ` · ${u.queued} queued` : ''}`);
    }
    lines.push(health.save_dir ? `saves: ${health.save_dir}` : 'no save directory: kvgate only pins slots');
    return lines.join('\n');
}

async function testConnection() {
    const out = byId('kvgate_health');
    out.textContent = 'Asking kvgate…';
    delete out.dataset.ok;
    try {
        const health = await api.health();
        out.textContent = describeHealth(health);
        out.dataset.ok = 'true';
        tell('success', 'kvgate answered.', 'kvgate: connection');
        restartStream();
        refresh({ withSettings: true });
    } catch (e) {
        out.textContent = e.message;
        out.dataset.ok = 'false';
        tellError('connection', e);
    }
}

/** Connection settings: inputs ↔ extension settings. */
function bindConnection() {
    const url = byId('kvgate_admin_url');
    const key = byId('kvgate_admin_key');
    url.value = settings().adminUrl;
    key.value = settings().adminKey;
    let timer = null;
    const reconnectSoon = () => {
        clearTimeout(timer);
        timer = setTimeout(() => { restartStream(); refresh({ withSettings: true }); }, 800);
    };
    url.addEventListener('input', () => { setSetting('adminUrl', url.value.trim()); reconnectSoon(); });
    key.addEventListener('input', () => { setSetting('adminKey', key.value.trim()); reconnectSoon(); });

    for (const [id, name] of [['kvgate_toasts', 'toasts'], ['kvgate_identity', 'identity']]) {
        const box = byId(id);
        box.checked = Boolean(settings()[name]);
        box.addEventListener('change', () => setSetting(name, box.checked));
    }
    byId('kvgate_test').addEventListener('click', testConnection);
    byId('kvgate_cors_hint').textContent =
        `This page is ${pageOrigin()}: start kvgate with --admin-cors-origin ${pageOrigin()} so it may call the admin port.`;
}

/** The dot in the header follows the event stream. */
function bindStreamState() {
    const dot = byId('kvgate_stream_state');
    onStreamState((state, error) => {
        dot.dataset.state = state;
        dot.title = state === 'connected'
            ? 'Event stream: connected'
            : `Event stream: ${state}${error ? ` (${error.message})` : ''}`;
    });
}

/** Puts the drawer into ST's Extensions panel and wires every part. */
export async function mountDrawer() {
    const host = byId('extensions_settings2') ?? byId('extensions_settings');
    host.insertAdjacentHTML('beforeend', await template());
    bindConnection();
    bindStreamState();
    mountIndicator();
    mountSlots();
    mountServerSettings();
    byId('kvgate_load').addEventListener('click', () => openLoadPopup().catch(e => tellError('load', e)));
    byId('kvgate_preload').addEventListener('click', () => openPreloadPopup().catch(e => tellError('preload', e)));
    // Opening the drawer shows fresh slots and settings. (ST announces the
    // toggle with a jQuery-only event; the header's click is the same moment.)
    byId('kvgate_drawer_header').addEventListener('click', () => refresh({ withSettings: true }));
}
