// The last picture of kvgate the panels draw from: its slots (GET /slots)
// and its live settings (GET /settings). One refresh feeds every panel, so
// the indicator and the slot list never disagree.

import * as api from './api.js';

const view = {
    /** GET /slots's answer, or null before the first one. */
    slots: null,
    /** GET /settings's answer, or null before the first one. */
    settings: null,
    /** The last refresh's failure, or null. */
    error: null,
};
const subscribers = new Set();
let inFlight = null;

/** The current picture (read-only for callers). */
export function kvgateView() {
    return view;
}

/** Calls `fn(view)` after every refresh. */
export function subscribe(fn) {
    subscribers.add(fn);
}

function publish() {
    subscribers.forEach(fn => fn(view));
}

/** Records settings the server-settings panel just read or wrote. */
export function setServerSettings(settings) {
    view.settings = settings;
    publish();
}

/**
 * Reads /slots (and /settings the first time, or when `withSettings`).
 * Concurrent callers share one refresh.
 */
export function refresh({ withSettings = false } = {}) {
    inFlight ??= (async () => {
        try {
            const [slots, settings] = await Promise.all([
                api.slots(),
                withSettings || !view.settings ? api.getServerSettings() : Promise.resolve(view.settings),
            ]);
            view.slots = slots;
            view.settings = settings;
            view.error = null;
        } catch (e) {
            view.error = e;
        } finally {
            inFlight = null;
        }
        publish();
    })();
    return inFlight;
}
