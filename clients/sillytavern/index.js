// kvgate for SillyTavern: the entry point ST loads (manifest.json "js").
//
// What it sets up:
// - the generate interceptor (manifest.json "generate_interceptor"), which
//   ST looks up as globalThis.kvgateInterceptor before each generation;
// - the request hooks that add the identity to the body (identity.js) or
//   take a preload prompt instead (prompts.js);
// - the drawer in the Extensions panel (panels/), kvgate's event stream
//   and its toasts (live.js), and a refresh of the indicator when the chat
//   changes.

import * as identity from './identity.js';
import { onSlotsChanged, startLive } from './live.js';
import { refresh } from './model.js';
import { mountDrawer } from './panels/drawer.js';
import { redrawIndicator } from './panels/indicator.js';
import * as prompts from './prompts.js';
import { onEvent } from './st.js';

/**
 * ST calls this from Generate() with (chat, contextSize, abort, type)
 * (public/scripts/extensions.js, runGenerationInterceptors). We only look:
 * the chat is left as it is and nothing is aborted.
 */
globalThis.kvgateInterceptor = async function kvgateInterceptor(_chat, _contextSize, _abort, type) {
    prompts.noteGeneration(type);
    identity.noteGeneration(type);
};

function wireRequests() {
    // Last among listeners: the body is final when we read or extend it.
    onEvent('TEXT_COMPLETION_SETTINGS_READY', (params) => {
        if (!prompts.takeCapture(params)) {
            identity.stampTextCompletion(params);
        }
    }, { last: true });
    onEvent('CHAT_COMPLETION_SETTINGS_READY', (data) => identity.stampChatCompletion(data), { last: true });
    identity.watchGenerations();
}

function wireChat() {
    // A new chat: other characters, another key; redraw now, ask kvgate too.
    onEvent('CHAT_CHANGED', () => { redrawIndicator(); refresh(); });
    onEvent('GROUP_UPDATED', () => redrawIndicator());
    onSlotsChanged(() => refresh());
}

async function init() {
    wireRequests();
    await mountDrawer();
    wireChat();
    // APP_READY fires once ST has loaded settings and the chat; a listener
    // added later is called at once (ST's emitter remembers it).
    onEvent('APP_READY', () => {
        startLive();
        refresh({ withSettings: true });
    });
}

init().catch(e => console.error('[kvgate] could not start', e));
