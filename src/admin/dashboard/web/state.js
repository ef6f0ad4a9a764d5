// What the page shares between its panels: the chats and characters it has
// learned of (from saves, slots and events; the preload form offers them),
// and refreshers that re-read a resource after the events that change it.

const chats = new Map(); // chat → Set of characters
const listeners = new Set();

/** Notes that `character` (may be null) speaks in `chat`. */
export function learn(chat, character) {
    if (!chat) {
        return;
    }
    let set = chats.get(chat);
    const fresh = !set || (character && !set.has(character));
    if (!set) {
        set = new Set();
        chats.set(chat, set);
    }
    if (character) {
        set.add(character);
    }
    if (fresh) {
        for (const fn of listeners) {
            fn();
        }
    }
}

/** The chats learned of, sorted. */
export const knownChats = () => [...chats.keys()].sort();

/** The characters learned of in `chat`, sorted. */
export const charactersOf = (chat) => [...(chats.get(chat) ?? [])].sort();

/** `fn()` whenever a chat or character is learned. */
export function onLearn(fn) {
    listeners.add(fn);
}

/**
 * `refresher(fn)`: a function that runs `fn` soon (after `delayMs`, so a
 * burst of events costs one call), never two at once; a call while it
 * runs schedules one more run after it. Errors go to `onError`.
 */
export function refresher(fn, { delayMs = 120, onError = console.warn } = {}) {
    let timer = null;
    let running = false;
    let again = false;
    const run = async () => {
        timer = null;
        if (running) {
            again = true;
            return;
        }
        running = true;
        try {
            await fn();
        } catch (e) {
            onError(e);
        } finally {
            running = false;
            if (again) {
                again = false;
                trigger();
            }
        }
    };
    const trigger = () => {
        if (!timer) {
            timer = setTimeout(run, delayMs);
        }
    };
    return trigger;
}
