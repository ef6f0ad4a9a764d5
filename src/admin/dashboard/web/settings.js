// kvgate's live settings (GET/PUT /settings): shown as a form, changed
// fields sent as they are typed, so kvgate validates them exactly as it
// validates any client; its 400 message is shown as it is.

import * as api from './api.js';
import { busy, byId, fill, h, toast } from './dom.js';

/** The settings, in the API's words (README "Admin API"). */
const FIELDS = [
    { key: 'autosave', type: 'bool', label: 'Autosave', help: 'Save a character every "save every" messages.' },
    { key: 'save_every', type: 'int', label: 'Save every', unit: 'messages', help: 'Messages per character between autosaves (≥ 1).' },
    { key: 'max_files', type: 'int', label: 'Saves kept', unit: 'per chat and character', help: 'Untagged saves kept; tagged saves are never rotated (≥ 1).' },
    { key: 'clear_on_chat_change', type: 'bool', label: 'Clear on chat change', help: 'Save and release a client\'s slots when it moves to another chat.' },
    { key: 'idle_save_s', type: 'int', label: 'Idle save after', unit: 's', help: 'Save unsaved messages once llama-server has been idle this long (0: off).' },
    { key: 'prefill_ahead', type: 'bool', label: 'Prefill ahead', help: 'While a group member generates, read what was said into the next speaker\'s cache.' },
    { key: 'preload_timeout_s', type: 'int', label: 'Preload timeout', unit: 's per character', help: 'How long a group preload may spend on one character (≥ 1).' },
];

let current = null;

export function init() {
    byId('settings-form').addEventListener('submit', (e) => {
        e.preventDefault();
        save(e.submitter ?? byId('settings-save'));
    });
    byId('settings-reset').addEventListener('click', () => refresh().catch((e) => toast(e.message, 'error')));
}

/** Reads the settings and redraws the form. */
export async function refresh() {
    current = await api.getSettings();
    render();
}

function render() {
    byId('settings-error').hidden = true;
    fill(byId('settings-fields'), FIELDS.map((f) => {
        const id = `setting-${f.key}`;
        const value = current[f.key];
        if (f.type === 'bool') {
            return h('div', { class: 'field' },
                h('label', { class: 'check', for: id },
                    h('input', { type: 'checkbox', id, name: f.key, checked: value }), ` ${f.label}`),
                h('p', { class: 'help' }, f.help));
        }
        return h('div', { class: 'field' },
            h('label', { for: id }, f.label),
            h('div', { class: 'with-unit' },
                // Text, not number: what is typed goes to kvgate as typed,
                // and kvgate says what is wrong with it.
                h('input', { type: 'text', inputmode: 'numeric', id, name: f.key, value: String(value) }),
                f.unit ? h('span', { class: 'muted' }, f.unit) : null),
            h('p', { class: 'help' }, f.help));
    }));
}

/** What changed in the form, as the API takes it. */
function changes() {
    const patch = {};
    for (const f of FIELDS) {
        const el = byId(`setting-${f.key}`);
        let value;
        if (f.type === 'bool') {
            value = el.checked;
        } else {
            const raw = el.value.trim();
            // A whole number goes as a number; anything else as typed, for
            // kvgate to refuse with its own words.
            value = /^-?\d+$/.test(raw) ? Number(raw) : raw;
        }
        if (value !== current[f.key]) {
            patch[f.key] = value;
        }
    }
    return patch;
}

async function save(button) {
    const patch = changes();
    const error = byId('settings-error');
    error.hidden = true;
    if (!Object.keys(patch).length) {
        toast('Nothing changed.');
        return;
    }
    await busy(button, 'Applying…', async () => {
        try {
            current = await api.putSettings(patch);
        } catch (e) {
            if (e.status === 400) {
                error.textContent = `kvgate refused: ${e.message}`;
                error.hidden = false;
                return;
            }
            throw e;
        }
        render();
        toast(`Applied and saved: ${Object.keys(patch).join(', ')}`, 'ok');
    });
}
