// kvgate's live event stream (GET /events, Server-Sent Events), read with
// fetch and a stream reader, not EventSource: EventSource can't send the
// admin key in a header, and the key never goes in a URL. When the stream
// drops (kvgate restarted, a network hiccup) it reconnects after 1 s,
// doubling up to 30 s, back to 1 s once a connection holds.
//
// kvgate sends one `data: {"type", "seq", "time_ms", …}` message per event
// and comments (": keepalive", ": missed N events") that are skipped.

import { errorOf, headers, isUnauthorized } from './api.js';

const FIRST_DELAY_MS = 1_000;
const MAX_DELAY_MS = 30_000;

/** Calls `onData(text)` with each SSE message's joined `data:` lines. */
export async function readMessages(body, onData) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    for (;;) {
        const { value, done } = await reader.read();
        if (done) {
            return;
        }
        buffer += value;
        const parts = buffer.split(/\r?\n\r?\n/);
        buffer = parts.pop();
        for (const message of parts) {
            const data = message
                .split(/\r?\n/)
                .filter((line) => line.startsWith('data:'))
                .map((line) => line.slice(5).replace(/^ /, ''))
                .join('\n');
            if (data) {
                onData(data);
            }
        }
    }
}

/**
 * Follows the events until the returned stop() is called:
 * - `onEvent(event)`: each parsed event;
 * - `onState(state, error?)`: 'connecting', 'connected' or 'down';
 * - `onUnauthorized(message)`: a 401; resolves once a new key is set.
 */
export function follow({ onEvent, onState, onUnauthorized }) {
    const abort = new AbortController();
    let delay = FIRST_DELAY_MS;
    const sleep = (ms) => new Promise((resolve) => {
        const timer = setTimeout(resolve, ms);
        abort.signal.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
    });
    (async () => {
        while (!abort.signal.aborted) {
            onState('connecting');
            try {
                const response = await fetch('/events', {
                    headers: { ...headers(false), Accept: 'text/event-stream' },
                    signal: abort.signal,
                    cache: 'no-store',
                });
                if (!response.ok) {
                    throw await errorOf(response);
                }
                onState('connected');
                delay = FIRST_DELAY_MS;
                await readMessages(response.body, (data) => {
                    let event;
                    try {
                        event = JSON.parse(data);
                    } catch {
                        console.warn('kvgate: an unreadable event', data);
                        return;
                    }
                    onEvent(event);
                });
                if (!abort.signal.aborted) {
                    onState('down', new Error('kvgate closed the event stream'));
                }
            } catch (e) {
                if (abort.signal.aborted) {
                    return;
                }
                if (isUnauthorized(e)) {
                    onState('down', e);
                    await onUnauthorized(e.message);
                    continue;
                }
                onState('down', e);
            }
            await sleep(delay);
            delay = Math.min(delay * 2, MAX_DELAY_MS);
        }
    })();
    return () => abort.abort();
}
