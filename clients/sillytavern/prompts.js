// Builds a group member's real prompt, as ST would send it on that
// member's turn, for kvgate's group preload (POST /preload "prompts").
//
// In ST's default "swap character cards" mode every member's prompt starts
// with its own card, so warming all members with one prompt would warm the
// wrong prefix. ST 1.19 has no dry run per member: Generate(type, {force_chid},
// dryRun=true) in a group always builds the first enabled member's prompt
// (public/script.js, the `selected_group && !is_group_generating` branch),
// and skips interceptors. What does work is a real quiet generation for
// that member, stopped before anything is sent:
// 1. Generate('quiet', {force_chid}) → generateGroupWrapper runs the member
//    (setCharacterId(force_chid)) → Generate('quiet') builds its prompt, with
//    no quiet instruction added, so it ends like the member's own turn;
// 2. our interceptor sees type 'quiet' for that member and arms the capture;
// 3. TEXT_COMPLETION_SETTINGS_READY hands us the finished body: we keep its
//    prompt and call stopGeneration(), which aborts ST's abortController;
//    the quiet request is sent with that signal (sendGenerationRequest), so
//    fetch fails at once and nothing reaches ST's server or kvgate.
// Text Completion only: a Chat Completion prompt is a message list kvgate's
// preload can't evaluate as text, so there the members go without a prompt
// (kvgate then uses the last prompt it saw for each).

import { isGenerating, st } from './st.js';

/** How long one member's prompt may take to build. */
const BUILD_TIMEOUT_MS = 60_000;

/** The capture in progress: {chid, armed, prompt}. */
let capture = null;

/** Whether prompts can be built with the API ST uses now. */
export function canBuildPrompts() {
    const { mainApi, textCompletionSettings } = st();
    return mainApi === 'textgenerationwebui' && textCompletionSettings?.type === 'llamacpp';
}

/** The interceptor's part: a quiet turn of the member we wait for arms the capture. */
export function noteGeneration(type) {
    if (capture && type === 'quiet' && Number(st().characterId) === capture.chid) {
        capture.armed = true;
    }
}

/**
 * TEXT_COMPLETION_SETTINGS_READY's part: takes the armed capture's prompt and
 * stops its request. Returns true when the body was ours (nothing else may
 * touch it).
 */
export function takeCapture(params) {
    if (!capture?.armed || capture.prompt !== null) {
        return false;
    }
    capture.prompt = String(params?.prompt ?? '');
    st().stopGeneration();
    return true;
}

/** One member's prompt, or null if it could not be built. */
async function buildOne(chid, signal) {
    capture = { chid, armed: false, prompt: null };
    let timer;
    try {
        const generation = st().generate('quiet', { force_chid: chid }).catch(() => {
            // The stopped request rejects: expected.
        });
        const timeout = new Promise(resolve => { timer = setTimeout(resolve, BUILD_TIMEOUT_MS); });
        const cancelled = new Promise(resolve => signal?.addEventListener('abort', resolve, { once: true }));
        await Promise.race([generation, timeout, cancelled]);
        if (capture.prompt === null && (signal?.aborted || capture.armed)) {
            st().stopGeneration(); // timed out or cancelled mid-way
        }
        return capture.prompt || null;
    } finally {
        clearTimeout(timer);
        capture = null;
    }
}

/**
 * Builds the prompts of `members` ([{chid, name}]) one after another.
 * onMember(name) is called as each starts. Returns {name: prompt} for those
 * that could be built; an empty object when the API is not llama.cpp Text
 * Completion or ST is busy generating.
 */
export async function buildMemberPrompts(members, { signal, onMember } = {}) {
    const prompts = {};
    if (!canBuildPrompts() || isGenerating()) {
        return prompts;
    }
    for (const member of members) {
        if (signal?.aborted) {
            break;
        }
        onMember?.(member.name);
        const prompt = await buildOne(member.chid, signal);
        if (prompt) {
            prompts[member.name] = prompt;
        }
    }
    return prompts;
}
