// kvgate's live settings (GET/PUT /settings), edited in the drawer. kvgate
// applies a PUT at once and keeps it in its save directory
// (kvgate-settings.json), where it overrides its flags at the next start.
//
// Stable hooks for UI tests (one input per setting, id = kvgate_srv_<name>):
//   #kvgate_srv_autosave, #kvgate_srv_save_every, #kvgate_srv_max_files,
//   #kvgate_srv_clear_on_chat_change, #kvgate_srv_preload_timeout_s,
//   #kvgate_srv_idle_save_s, #kvgate_srv_prefill_ahead
//   #kvgate_srv_apply    PUT /settings with the fields that changed
//   #kvgate_srv_reload   GET /settings

import * as api from '../api.js';
import { kvgateView, setServerSettings, subscribe } from '../model.js';
import { tell, tellError } from '../notify.js';

/** kvgate's setting → the input's kind. */
const FIELDS = {
    autosave: 'bool',
    save_every: 'int',
    max_files: 'int',
    clear_on_chat_change: 'bool',
    preload_timeout_s: 'int',
    idle_save_s: 'int',
    prefill_ahead: 'bool',
};

const input = (name) => document.getElementById(`kvgate_srv_${name}`);

/** Last settings shown, to send only what the user changed. */
let shown = null;
/** The settings object last drawn: a slot refresh keeps it, and must not undo an edit. */
let drawn = null;

function show(settings) {
    if (!settings || settings === drawn) {
        return;
    }
    drawn = settings;
    for (const [name, kind] of Object.entries(FIELDS)) {
        const el = input(name);
        if (!el || settings[name] === undefined) {
            continue;
        }
        if (kind === 'bool') {
            el.checked = Boolean(settings[name]);
        } else {
            el.value = String(settings[name]);
        }
    }
    shown = { ...settings };
}

/** The inputs' values that differ from what kvgate said; throws on a bad number. */
function changes() {
    const patch = {};
    for (const [name, kind] of Object.entries(FIELDS)) {
        const el = input(name);
        if (!el || (shown && shown[name] === undefined)) {
            continue; // a setting this kvgate does not have
        }
        const value = kind === 'bool' ? el.checked : Number(el.value);
        if (kind === 'int' && (!Number.isInteger(value) || value < 0)) {
            throw new Error(`${name.replaceAll('_', ' ')} must be a whole number`);
        }
        if (!shown || shown[name] !== value) {
            patch[name] = value;
        }
    }
    return patch;
}

async function reload() {
    try {
        setServerSettings(await api.getServerSettings());
    } catch (e) {
        tellError('read kvgate settings', e);
    }
}

async function apply() {
    let patch;
    try {
        patch = changes();
    } catch (e) {
        tellError('kvgate settings', e);
        return;
    }
    if (!Object.keys(patch).length) {
        tell('info', 'Nothing changed.', 'kvgate settings');
        return;
    }
    try {
        const answer = await api.putServerSettings(patch);
        // PUT answers with the settings as they now are.
        setServerSettings(answer);
        tell('success', Object.entries(patch).map(([k, v]) => `${k} = ${v}`).join(', '), 'kvgate settings applied');
    } catch (e) {
        tellError('apply kvgate settings', e);
    }
}

/** Wires the settings inputs and buttons. */
export function mountServerSettings() {
    subscribe(view => show(view.settings));
    document.getElementById('kvgate_srv_apply')?.addEventListener('click', apply);
    document.getElementById('kvgate_srv_reload')?.addEventListener('click', reload);
    show(kvgateView().settings);
}
