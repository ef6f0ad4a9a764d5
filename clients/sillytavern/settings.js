// The extension's own settings, kept in ST's extension_settings.kvgate
// (saved with the user's settings.json). kvgate's settings (autosave,
// save_every, …) live in kvgate and are edited through its admin API
// (panels/server-settings.js), not here.

import { extensionSettings, saveSettings } from './st.js';

const DEFAULTS = Object.freeze({
    /** kvgate's admin port (--admin-listen). */
    adminUrl: 'http://127.0.0.1:8090',
    /** kvgate's --admin-key, sent as X-Admin-Key; empty: none. */
    adminKey: '',
    /** Toasts for kvgate's events (restores, saves, failures). */
    toasts: true,
    /** Tell kvgate the chat, character and kind of every generation. */
    identity: true,
});

let current = null;
const listeners = new Set();

/** The settings (created with the defaults on first use). */
export function settings() {
    current ??= extensionSettings('kvgate', DEFAULTS);
    return current;
}

/** Changes one setting, saves, and tells whoever watches. */
export function setSetting(name, value) {
    settings()[name] = value;
    saveSettings();
    for (const listener of listeners) {
        listener(name, value);
    }
}

/** Calls `listener(name, value)` after each change. */
export function watchSettings(listener) {
    listeners.add(listener);
}

/** The admin URL without a trailing slash. */
export function adminBase() {
    return String(settings().adminUrl || DEFAULTS.adminUrl).trim().replace(/\/+$/, '');
}
