// kvgate's admin API (the admin port, --admin-listen, default
// http://127.0.0.1:8090), called straight from the page.
//
// ST's page is another origin than the admin port, so kvgate must be
// started with --admin-cors-origin <ST's origin>: the admin port answers
// CORS for exact allow-listed origins only, and a refused preflight looks
// to the page like a network failure (the hint in AdminError says so).
// With an admin key, every call sends X-Admin-Key. Bodies are JSON with
// Content-Type: application/json (kvgate refuses other bodies with 415).

import { adminBase, settings } from './settings.js';
import { pageOrigin } from './st.js';

/** How long an ordinary call may take. Saves and loads move files: longer. */
const TIMEOUT_MS = 15_000;
const SLOW_TIMEOUT_MS = 300_000;

/** A failed admin call; `message` is kvgate's error.message when it sent one. */
export class AdminError extends Error {
    constructor(message, { status = 0, type = null } = {}) {
        super(message);
        this.name = 'AdminError';
        this.status = status;
        this.type = type;
    }
}

function headers(hasBody) {
    const h = {};
    if (hasBody) {
        h['Content-Type'] = 'application/json';
    }
    const key = String(settings().adminKey ?? '').trim();
    if (key) {
        h['X-Admin-Key'] = key;
    }
    return h;
}

/** What to tell the user when the admin port did not answer at all. */
function unreachable(base, cause) {
    return new AdminError(
        `kvgate's admin port did not answer at ${base} (${cause?.message ?? cause}). ` +
        `Is kvgate running, and was it started with --admin-cors-origin ${pageOrigin()} ?`,
    );
}

/** kvgate's llama.cpp-shaped error body → AdminError. */
async function errorOf(response) {
    let message = `${response.status} ${response.statusText}`;
    let type = null;
    try {
        const body = await response.json();
        if (body?.error?.message) {
            message = body.error.message;
            type = body.error.type ?? null;
        }
    } catch {
        // Not JSON: keep the status line.
    }
    return new AdminError(message, { status: response.status, type });
}

/**
 * One admin call. `body` (an object) is sent as JSON; `query` is an object
 * of search parameters (empty values left out); `signal` cancels it.
 * Returns the parsed JSON answer (null for an empty one).
 */
export async function call(method, path, { body, query, signal, timeoutMs = TIMEOUT_MS } = {}) {
    const base = adminBase();
    const url = new URL(base + path);
    for (const [k, v] of Object.entries(query ?? {})) {
        if (v !== undefined && v !== null && v !== '') {
            url.searchParams.set(k, String(v));
        }
    }
    const timeout = new AbortController();
    const timer = setTimeout(() => timeout.abort(new Error(`no answer within ${timeoutMs / 1000} s`)), timeoutMs);
    const onAbort = () => timeout.abort(signal.reason);
    signal?.addEventListener('abort', onAbort, { once: true });
    let response;
    try {
        response = await fetch(url, {
            method,
            headers: headers(body !== undefined),
            body: body !== undefined ? JSON.stringify(body) : undefined,
            signal: timeout.signal,
            cache: 'no-store',
        });
        if (!response.ok) {
            throw await errorOf(response);
        }
        const text = await response.text();
        return text ? JSON.parse(text) : null;
    } catch (e) {
        if (e instanceof AdminError) {
            throw e;
        }
        if (signal?.aborted) {
            throw e;
        }
        throw unreachable(base, timeout.signal.aborted ? timeout.signal.reason : e);
    } finally {
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
    }
}

// The endpoints the extension uses, one function each (README, "Admin API").

/** GET /health: kvgate's and its upstreams' state. */
export const health = () => call('GET', '/health');

/** GET /slots: who holds which slot, on every upstream. */
export const slots = () => call('GET', '/slots');

/** GET /saves?q=: saves by chat → character, newest first. */
export const saves = (q) => call('GET', '/saves', { query: { q } });

/** POST /save {"tag"?}: saves every slot holding a character's live cache. */
export const saveAll = (tag) => call('POST', '/save', { body: tag ? { tag } : {}, timeoutMs: SLOW_TIMEOUT_MS });

/** POST /slots/{id}/save[?upstream=]: saves one slot. */
export const saveSlot = (id, upstream) =>
    call('POST', `/slots/${encodeURIComponent(id)}/save`, { body: {}, query: { upstream }, timeoutMs: SLOW_TIMEOUT_MS });

/** POST /slots/clear {"erase"}: releases every slot (erase: also in llama-server). */
export const clearSlots = (erase) => call('POST', '/slots/clear', { body: { erase: Boolean(erase) }, timeoutMs: SLOW_TIMEOUT_MS });

/** POST /load {"items":[{"file","chat"?}]}: loads saves into slots. */
export const load = (items) => call('POST', '/load', { body: { items }, timeoutMs: SLOW_TIMEOUT_MS });

/** POST /preload {"chat","characters","prompts"?}: starts a warm-up job (202 {"id"}). */
export const startPreload = (request) => call('POST', '/preload', { body: request });

/** GET /preload/{id}: a job's progress. */
export const preloadProgress = (id) => call('GET', `/preload/${encodeURIComponent(id)}`);

/** DELETE /preload/{id}: cancels a job at once. */
export const cancelPreload = (id) => call('DELETE', `/preload/${encodeURIComponent(id)}`);

/** GET /settings: kvgate's live settings. */
export const getServerSettings = () => call('GET', '/settings');

/** PUT /settings (any subset): applies and persists them. */
export const putServerSettings = (patch) => call('PUT', '/settings', { body: patch });

/**
 * GET /events as a streaming response (the caller reads its body). fetch,
 * not EventSource: EventSource can't send X-Admin-Key.
 */
export async function openEvents(signal) {
    const base = adminBase();
    let response;
    try {
        response = await fetch(base + '/events', { headers: headers(false), signal, cache: 'no-store' });
    } catch (e) {
        throw signal?.aborted ? e : unreachable(base, e);
    }
    if (!response.ok) {
        throw await errorOf(response);
    }
    return response;
}
