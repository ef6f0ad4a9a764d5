// Tells kvgate who every generation is for: the chat, the character, and
// the kind (normal | regenerate | swipe | continue | quiet | impersonate),
// so kvgate need not read them off the prompt.
//
// How, in ST 1.19:
// 1. ST calls the manifest's generate_interceptor (globalThis.kvgateInterceptor,
//    see index.js) from Generate() with (chat, contextSize, abort, type),
//    after a group turn has picked its member (this_chid is the member:
//    the speaker in swap-cards mode, the card used for an impersonation, the
//    author of a continued message) and before the prompt is built. Dry runs
//    skip interceptors. noteGeneration() records the identity then.
// 2. Just before the request leaves the page, ST emits
//    TEXT_COMPLETION_SETTINGS_READY (text completion) or
//    CHAT_COMPLETION_SETTINGS_READY (chat completion) with the body it is
//    about to send; the stamp functions add the recorded identity to it,
//    once: a later request with no interceptor before it (an extension's
//    generateRaw, a dry run) gets nothing and is left to kvgate.
//    - llama.cpp Text Completion: ST's server forwards the whole body to
//      kvgate's /completion, so a top-level "kvgate" object arrives as is.
//      kvgate removes the member before llama-server sees the body.
//    - Chat Completion, Custom (OpenAI-compatible) source: ST's server builds
//      the upstream request from known fields plus the YAML the browser
//      sends in custom_include_headers and custom_include_body
//      (src/endpoints/backends/chat-completions.js, mergeObjectWithYaml), so
//      the identity is merged into that request's copy of the headers YAML
//      as X-Kvgate-* headers (percent-encoded UTF-8), the user's own entries
//      kept. Headers, because any server ignores headers it does not know,
//      where a strict OpenAI-style server may refuse an unknown body field
//      if the user points the Custom source elsewhere. If the headers YAML
//      can't be read, the "kvgate" object goes into the body YAML instead.
//
// Regenerate vs swipe: a 1:1 chat's interceptor sees 'regenerate' or
// 'swipe' as they are. A group's regenerate (regenerateGroup: the options
// menu, Ctrl+Enter, /regenerate) deletes the last replies and runs the
// group as 'normal', so a group run that starts with an empty send box
// right after messages were deleted is taken as a regenerate.

import { characterName, currentChatKey } from './chat.js';
import { settings } from './settings.js';
import { composerText, libs, onEvent, st } from './st.js';

/** ST's generation types → kvgate's kinds (anything else is normal). */
const KINDS = {
    normal: 'normal',
    regenerate: 'regenerate',
    swipe: 'swipe',
    continue: 'continue',
    quiet: 'quiet',
    impersonate: 'impersonate',
};

/** The identity recorded by the interceptor for the next request. */
let pending = null;
/** Messages were deleted since the last group run or sent message. */
let deletedSinceLastTurn = false;
/** The group run in progress regenerates its replies. */
let groupRegenerates = false;

/** kvgate's kind for ST's generation type. */
export function kindOf(type) {
    return KINDS[type] ?? 'normal';
}

/** The interceptor's part: records who the coming request is for. */
export function noteGeneration(type) {
    pending = null;
    if (!settings().identity) {
        return;
    }
    const character = characterName(st().characterId);
    if (!character) {
        return; // no character (ST's assistant/temporary chat): let kvgate infer
    }
    let kind = kindOf(type);
    if (kind === 'normal' && groupRegenerates) {
        kind = 'regenerate';
    }
    pending = { character, kind };
    const chat = currentChatKey();
    if (chat) {
        pending.chat = chat;
    }
}

/** The recorded identity, once. */
function take() {
    const identity = pending;
    pending = null;
    return identity;
}

/** TEXT_COMPLETION_SETTINGS_READY: the body ST's server forwards to kvgate. */
export function stampTextCompletion(params) {
    const identity = take();
    // Only llama.cpp's type is forwarded whole; other types are filtered
    // by ST's server or go to APIs that might refuse an unknown field.
    if (identity && params?.api_type === 'llamacpp') {
        params.kvgate = identity;
    }
}

/** CHAT_COMPLETION_SETTINGS_READY: what the page sends ST's server. */
export function stampChatCompletion(data) {
    const identity = take();
    if (!identity || data?.chat_completion_source !== 'custom') {
        return;
    }
    const headers = mergeYaml(data.custom_include_headers, identityHeaders(identity));
    if (headers !== null) {
        data.custom_include_headers = headers;
        return;
    }
    const body = mergeYaml(data.custom_include_body, { kvgate: identity });
    if (body !== null) {
        data.custom_include_body = body;
        return;
    }
    console.warn('[kvgate] custom_include_headers and custom_include_body are not readable YAML; no identity sent');
}

/** The identity as kvgate's headers (percent-encoded: header values are Latin-1). */
function identityHeaders(identity) {
    const h = {
        'X-Kvgate-Character': encodeURIComponent(identity.character),
        'X-Kvgate-Kind': identity.kind,
    };
    if (identity.chat) {
        h['X-Kvgate-Chat'] = encodeURIComponent(identity.chat);
    }
    return h;
}

/**
 * `text` (the user's YAML, as ST's server reads it with mergeObjectWithYaml:
 * a mapping, or a list of mappings applied in order) with `ours` added,
 * written as JSON (which is YAML). The user's own keys win over ours.
 * Returns null when the text is not readable YAML, so we change nothing.
 */
export function mergeYaml(text, ours) {
    const source = String(text ?? '').trim();
    let parsed = null;
    if (source) {
        try {
            parsed = libs().yaml.parse(source);
        } catch {
            return null;
        }
    }
    if (Array.isArray(parsed)) {
        return JSON.stringify([ours, ...parsed]);
    }
    if (parsed && typeof parsed === 'object') {
        return JSON.stringify({ ...ours, ...parsed });
    }
    // Empty, or a scalar ST's server would ignore anyway.
    return JSON.stringify(ours);
}

/** Follows the events that tell a group regenerate and end a generation. */
export function watchGenerations() {
    onEvent('MESSAGE_DELETED', () => { deletedSinceLastTurn = true; });
    for (const key of ['MESSAGE_SENT', 'MESSAGE_RECEIVED', 'CHAT_CHANGED']) {
        onEvent(key, () => { deletedSinceLastTurn = false; });
    }
    onEvent('GROUP_WRAPPER_STARTED', ({ type } = {}) => {
        // regenerateGroup() deletes the last replies, then runs the group as
        // 'normal' with nothing typed; a message being sent is not that.
        groupRegenerates = (type === 'normal' || !type) && deletedSinceLastTurn && composerText().trim() === '';
    });
    onEvent('GROUP_WRAPPER_FINISHED', () => {
        groupRegenerates = false;
        deletedSinceLastTurn = false;
    });
    // A generation that ended or was stopped before its request went out
    // (another interceptor aborted it) must not lend its identity to the
    // next request.
    onEvent('GENERATION_ENDED', () => { pending = null; });
    onEvent('GENERATION_STOPPED', () => { pending = null; });
}
