// kvgate's admin API, called from the page kvgate itself serves (same
// origin, so no CORS). With an admin key, every call sends it in
// X-Admin-Key; the key is kept in sessionStorage (this tab only, gone when
// it closes) and never put in a URL. Bodies are JSON, labelled so (kvgate
// refuses other bodies with 415).

const KEY_ITEM = 'kvgate.adminKey';
const TIMEOUT_MS = 15_000;
/** Saves, loads and clears move slot files; an instance loads a model. */
export const SLOW_MS = 600_000;

/** A refused or failed call; `message` is kvgate's own when it sent one. */
export class ApiError extends Error {
    constructor(message, { status = 0, type = null } = {}) {
        super(message);
        this.name = 'ApiError';
        this.status = status;
        this.type = type;
    }
}

/** The admin key of this tab ('' when none). */
export const key = {
    get: () => sessionStorage.getItem(KEY_ITEM) ?? '',
    set: (k) => sessionStorage.setItem(KEY_ITEM, k.trim()),
    clear: () => sessionStorage.removeItem(KEY_ITEM),
};

// Asks the user for a key (set by the page); resolves once one works.
let reauthorize = null;

/** `handler(message)` must resolve once the user gave a key that works. */
export function onUnauthorized(handler) {
    reauthorize = handler;
}

export function headers(hasBody) {
    const h = {};
    if (hasBody) {
        h['Content-Type'] = 'application/json';
    }
    const k = key.get();
    if (k) {
        h['X-Admin-Key'] = k;
    }
    return h;
}

/** kvgate's llama.cpp-shaped error body → ApiError. */
export async function errorOf(response) {
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
    return new ApiError(message, { status: response.status, type });
}

/** Whether `e` is kvgate's 401. */
export const isUnauthorized = (e) => e instanceof ApiError && e.status === 401;

/**
 * Whether a 401 is about the key: kvgate also answers 401 when the
 * instances API is used without any key configured, which no key fixes.
 * Asks /health, which takes the key alone.
 */
export async function wantsKey(e) {
    if (!isUnauthorized(e)) {
        return false;
    }
    try {
        await once('GET', '/health', undefined, undefined, TIMEOUT_MS);
        return false;
    } catch (again) {
        return isUnauthorized(again);
    }
}

/**
 * One call. `body` (an object) goes as JSON, `query` as search parameters
 * (empty values left out). A 401 asks the page for the key and retries
 * once it is given (unless `reauth: false`). Resolves with the parsed
 * answer.
 */
export async function call(method, path, { body, query, timeoutMs = TIMEOUT_MS, reauth = true } = {}) {
    try {
        return await once(method, path, body, query, timeoutMs);
    } catch (e) {
        if (!reauth || !reauthorize || !(await wantsKey(e))) {
            throw e;
        }
        await reauthorize(e.message);
        return once(method, path, body, query, timeoutMs);
    }
}

async function once(method, path, body, query, timeoutMs) {
    const url = new URL(path, location.origin);
    for (const [k, v] of Object.entries(query ?? {})) {
        if (v !== undefined && v !== null && v !== '') {
            url.searchParams.set(k, String(v));
        }
    }
    let response;
    try {
        response = await fetch(url, {
            method,
            headers: headers(body !== undefined),
            body: body !== undefined ? JSON.stringify(body) : undefined,
            signal: AbortSignal.timeout(timeoutMs),
            cache: 'no-store',
        });
    } catch (e) {
        const why = e.name === 'TimeoutError' ? `no answer within ${timeoutMs / 1000} s` : e.message;
        throw new ApiError(`kvgate's admin port did not answer (${why})`);
    }
    if (!response.ok) {
        throw await errorOf(response);
    }
    const text = await response.text();
    return text ? JSON.parse(text) : null;
}

const enc = encodeURIComponent;

// The endpoints the page uses (README, "Admin API").
export const health = (opts) => call('GET', '/health', opts);
export const upstreams = () => call('GET', '/upstreams');
export const slots = () => call('GET', '/slots');
export const saves = (q) => call('GET', '/saves', { query: { q } });
export const saveAll = (tag) => call('POST', '/save', { body: tag ? { tag } : {}, timeoutMs: SLOW_MS });
export const saveSlot = (upstream, id, tag) =>
    call('POST', `/slots/${enc(id)}/save`, { body: tag ? { tag } : {}, query: { upstream }, timeoutMs: SLOW_MS });
export const clearSlots = (erase) => call('POST', '/slots/clear', { body: { erase }, timeoutMs: SLOW_MS });
export const load = (items) => call('POST', '/load', { body: { items }, timeoutMs: SLOW_MS });
export const deleteFile = (name) => call('DELETE', `/files/${enc(name)}`);
export const startPreload = (request) => call('POST', '/preload', { body: request });
export const preloadProgress = (id) => call('GET', `/preload/${enc(id)}`);
export const cancelPreload = (id) => call('DELETE', `/preload/${enc(id)}`);
export const instances = () => call('GET', '/instances');
export const createInstance = (spec) => call('POST', '/instances', { body: spec, timeoutMs: SLOW_MS });
export const instanceAction = (id, action) =>
    call('POST', `/instances/${enc(id)}/${action}`, { body: {}, timeoutMs: SLOW_MS });
export const deleteInstance = (id) => call('DELETE', `/instances/${enc(id)}`, { timeoutMs: SLOW_MS });
export const instanceLog = (id) => call('GET', `/instances/${enc(id)}/log`);
export const getSettings = () => call('GET', '/settings');
export const putSettings = (patch) => call('PUT', '/settings', { body: patch });
