// Toasts. Two kinds:
// - answers to something the user clicked (a save, a load, a failed call):
//   always shown, the user is waiting for them;
// - news from kvgate's event stream (a restore, an autosave, a failed save):
//   shown only while the "Toasts for kvgate's events" setting is on.

import { settings } from './settings.js';
import { toasts } from './st.js';

const TITLE = 'kvgate';

/** An answer to a user's action. level: 'success' | 'info' | 'warning' | 'error'. */
export function tell(level, message, title = TITLE, options = {}) {
    // Messages hold client-chosen names (characters, chats, tags): text,
    // never HTML, whatever toastr's page-wide default is.
    toasts()[level](message, title, { ...options, escapeHtml: true });
}

/** A failed action: kvgate's error.message (AdminError) or the exception's. */
export function tellError(what, error) {
    console.warn(`[kvgate] ${what}:`, error);
    tell('error', String(error?.message ?? error), `kvgate: ${what}`, { timeOut: 10_000, extendedTimeOut: 20_000 });
}

/** News from kvgate, if the user wants it. */
export function news(level, message, title = TITLE) {
    if (settings().toasts) {
        tell(level, message, title, level === 'error' ? { timeOut: 10_000 } : {});
    }
}
