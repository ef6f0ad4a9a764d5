// kvgate's live event stream (GET /events, Server-Sent Events), read with
// fetch and a stream reader so the admin key can go in a header, and kept
// open: when it drops (kvgate restarted, the network hiccuped) it reconnects
// after 1 s, doubling up to 30 s, back to 1 s once a connection holds.
//
// kvgate sends one `data: {"type", "seq", "time_ms", …}` line per event and
// comment lines (": keepalive", ": missed N events") that we skip.

import { openEvents } from './api.js';

const FIRST_DELAY_MS = 1_000;
const MAX_DELAY_MS = 30_000;

/**
 * Reads SSE messages from a response body, calling `onData(text)` with each
 * message's joined `data:` lines. Resolves when the stream ends.
 */
export async function readMessages(body, onData) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    for (;;) {
        const { value, done } = await reader.read();
        if (done) {
            return;
        }
        buffer += value;
        // Messages end with a blank line (CRLF or LF line ends).
        const parts = buffer.split(/\r?\n\r?\n/);
        buffer = parts.pop();
        for (const message of parts) {
            const data = message
                .split(/\r?\n/)
                .filter(line => line.startsWith('data:'))
                .map(line => line.slice(5).replace(/^ /, ''))
                .join('\n');
            if (data) {
                onData(data);
            }
        }
    }
}

/**
 * Follows kvgate's events until stop() is called.
 * - onEvent(event): each parsed event object;
 * - onState(state, error?): 'connecting' | 'connected' | 'down'.
 * Returns stop().
 */
export function followEvents({ onEvent, onState }) {
    const abort = new AbortController();
    let delay = FIRST_DELAY_MS;

    const sleep = (ms) => new Promise(resolve => {
        const timer = setTimeout(resolve, ms);
        abort.signal.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
    });

    const run = async () => {
        while (!abort.signal.aborted) {
            onState('connecting');
            try {
                const response = await openEvents(abort.signal);
                onState('connected');
                delay = FIRST_DELAY_MS;
                await readMessages(response.body, (data) => {
                    try {
                        onEvent(JSON.parse(data));
                    } catch (e) {
                        console.warn('[kvgate] unreadable event', data, e);
                    }
                });
                if (!abort.signal.aborted) {
                    onState('down', new Error('kvgate closed the event stream'));
                }
            } catch (e) {
                if (abort.signal.aborted) {
                    return;
                }
                onState('down', e);
            }
            await sleep(delay);
            delay = Math.min(delay * 2, MAX_DELAY_MS);
        }
    };
    run();
    return () => abort.abort();
}
