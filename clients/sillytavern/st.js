// The one door to SillyTavern.
//
// Everything the extension takes from SillyTavern goes through this module,
// and all of it through the globals ST 1.19 publishes for extensions:
// `SillyTavern.getContext()` (public/scripts/st-context.js) and
// `SillyTavern.libs` (public/lib.js), plus the page's `toastr` and two DOM
// reads. No module imports ST's files by a relative path, so the extension
// works from either install folder (public/scripts/extensions/third-party/
// or the user's data extensions/ folder, both served under
// /scripts/extensions/third-party/<folder>/) and under any folder name.
//
// getContext() builds a fresh object on every call, with the values ST has
// at that moment (characterId is `this_chid`, the member being generated
// for during a group turn), so callers ask again instead of keeping it.

/** The current SillyTavern context. */
export function st() {
    return globalThis.SillyTavern.getContext();
}

/** ST's bundled libraries (we use `yaml`, the same package ST's server uses). */
export function libs() {
    return globalThis.SillyTavern.libs;
}

/**
 * Listens to an ST event by its `event_types` key (e.g. 'CHAT_CHANGED').
 * `last`: run after every other listener, so what we add to a request body
 * is not overwritten by another extension and what we read is final.
 */
export function onEvent(key, handler, { last = false } = {}) {
    const { eventSource, eventTypes } = st();
    const name = eventTypes[key];
    if (!name) {
        console.warn(`[kvgate] SillyTavern has no event ${key}`);
        return;
    }
    if (last) {
        eventSource.makeLast(name, handler);
    } else {
        eventSource.on(name, handler);
    }
}

/** The extension's own settings object inside ST's extension_settings. */
export function extensionSettings(key, defaults) {
    const all = st().extensionSettings;
    all[key] = Object.assign({}, defaults, all[key] ?? {});
    return all[key];
}

/** Persists extension settings (ST's debounced settings save). */
export function saveSettings() {
    st().saveSettingsDebounced();
}

/** ST's Popup class and its enums (public/scripts/popup.js). */
export function popups() {
    const { Popup, POPUP_TYPE, POPUP_RESULT, callGenericPopup } = st();
    return { Popup, POPUP_TYPE, POPUP_RESULT, callGenericPopup };
}

/** The page's toastr (ST loads it globally). */
export function toasts() {
    return globalThis.toastr;
}

/** Whether ST is generating now (deactivateSendButtons marks the body). */
export function isGenerating() {
    return document.body.dataset.generating === 'true';
}

/** What the user has typed but not sent (the send box). */
export function composerText() {
    return String(document.getElementById('send_textarea')?.value ?? '');
}

/** The page's own origin, as kvgate's --admin-cors-origin must name it. */
export function pageOrigin() {
    return globalThis.location.origin;
}
