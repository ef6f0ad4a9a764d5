// What kvgate's event stream means for the user: toasts for restores, saves
// and failures, and a refresh of the panels whenever a slot changed.
//
// Events (src/observe/events.rs and their emitters in src/): every one has
// "type", "seq", "time_ms" and, for a slot's or upstream's, "upstream".
//   restored        slot, chat, character, file, tokens, shared_prefix, ms,
//                   and where the save came from: saved_chat, saved_at
//                   (Unix seconds), save_kind, tag
//   restore_failed  slot, chat, character, file, reason
//   saved           slot, chat, character, kind, file, tag, tokens, bytes, ms
//   save_failed     slot, chat, character, kind, reason
//   slot_assigned, evicted, generation_started, generation_finished,
//   slot_released, queue, prefill_ahead, ram_cache_miss, preload_progress,
//   upstream_up, upstream_down, instance, slots_cleared, file_deleted

import { chatCharacters, currentChatKey, describeChat } from './chat.js';
import { followEvents } from './events.js';
import { when } from './format.js';
import { news } from './notify.js';

/** Events after which the slot picture is stale. */
const SLOT_EVENTS = new Set([
    'slot_assigned', 'evicted', 'restored', 'restore_failed', 'saved', 'save_failed',
    'generation_finished', 'slot_released', 'prefill_ahead', 'preload_progress',
    'upstream_up', 'upstream_down', 'instance', 'slots_cleared',
]);

/**
 * Saves the user did not ask for and is not waiting on get a toast;
 * "idle" and "eviction" are kvgate's housekeeping after nearly every turn,
 * and "manual" and "preload" saves are reported by the action that made them.
 */
const TOASTED_SAVE_KINDS = new Set(['autosave', 'chat-switch', 'shutdown']);

const listeners = { event: new Set(), state: new Set() };
let stop = null;
let lastState = { state: 'down', error: null };

/** Calls `fn(event)` for every kvgate event; returns a function that stops it. */
export function onKvgateEvent(fn) {
    listeners.event.add(fn);
    return () => listeners.event.delete(fn);
}

/** Calls `fn(state, error)` when the stream connects or drops (and now). */
export function onStreamState(fn) {
    listeners.state.add(fn);
    fn(lastState.state, lastState.error);
}

/** Calls `fn()` (debounced) whenever kvgate's slots may have changed. */
export function onSlotsChanged(fn, delayMs = 300) {
    let timer = null;
    onKvgateEvent((event) => {
        if (SLOT_EVENTS.has(event.type)) {
            clearTimeout(timer);
            timer = setTimeout(fn, delayMs);
        }
    });
    onStreamState((state) => {
        if (state === 'connected') {
            fn(); // what happened while we were away
        }
    });
}

/** (Re)starts following kvgate's events (after the URL or key changed). */
export function restartStream() {
    stop?.();
    stop = followEvents({
        onEvent: (event) => listeners.event.forEach(fn => fn(event)),
        onState: (state, error = null) => {
            lastState = { state, error };
            listeners.state.forEach(fn => fn(state, error));
        },
    });
}

/** Whether an event is about the chat open now (or one of its characters). */
function aboutThisChat(event) {
    const key = currentChatKey();
    if (key && event.chat === key) {
        return true;
    }
    // kvgate inferred the chat (identity off, or another client): go by name.
    return chatCharacters().some(c => c.name === event.character);
}

/** "saved 03/12/2026, 14:02 (5 min ago) in this chat (…)", from the event itself. */
function savedFrom(event) {
    if (!event.saved_chat || !event.saved_at) {
        return '';
    }
    const chat = event.saved_chat === event.chat
        ? `this chat (${describeChat(event.saved_chat)})`
        : `another chat: ${describeChat(event.saved_chat)}`;
    return `saved ${when(event.saved_at)} in ${chat}`;
}

function toastRestored(event) {
    const from = savedFrom(event);
    news('info', `${event.character}: cache restored from ${event.file}${from ? ` (${from})` : ''}, ${event.tokens} tokens.`);
}

function toastEvent(event) {
    switch (event.type) {
        case 'restored':
            if (aboutThisChat(event)) {
                toastRestored(event);
            }
            break;
        case 'saved':
            if (TOASTED_SAVE_KINDS.has(event.kind) && aboutThisChat(event)) {
                news('success', `${event.character}: ${event.kind} save, ${event.tokens} tokens (${event.file}).`);
            }
            break;
        case 'save_failed':
            news('error', `${event.character}: ${event.kind} save failed: ${event.reason}`);
            break;
        case 'restore_failed':
            news('error', `${event.character}: restoring ${event.file} failed: ${event.reason}`);
            break;
    }
}

/** Starts the stream and the toasts. */
export function startLive() {
    onKvgateEvent(toastEvent);
    restartStream();
}
