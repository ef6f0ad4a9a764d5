// DOM helpers. Everything the page shows is built with createElement and
// textContent: character names, chat keys, tags and file names come from
// clients' prompts, so nothing is ever parsed as HTML (and the page's
// Content-Security-Policy allows no inline script or style anyway).

/**
 * `h('button', {class: 'x', dataset: {slot: 1}, onclick}, 'Save')`: an
 * element with attributes (`class`, `dataset`, `on…` handlers, booleans,
 * anything else as an attribute) and children (nodes, strings, numbers;
 * null, undefined and false are skipped; arrays are flattened).
 */
export function h(tag, props = {}, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(props ?? {})) {
        if (v === undefined || v === null || v === false) {
            continue;
        }
        if (k === 'class') {
            el.className = Array.isArray(v) ? v.filter(Boolean).join(' ') : v;
        } else if (k === 'dataset') {
            for (const [dk, dv] of Object.entries(v)) {
                if (dv !== undefined && dv !== null) {
                    el.dataset[dk] = String(dv);
                }
            }
        } else if (k.startsWith('on') && typeof v === 'function') {
            el.addEventListener(k.slice(2), v);
        } else if (k === 'value') {
            el.value = v;
        } else if (k === 'checked' || k === 'disabled' || k === 'hidden' || k === 'open' || k === 'required') {
            el[k] = Boolean(v);
        } else {
            el.setAttribute(k, v === true ? '' : String(v));
        }
    }
    append(el, children);
    return el;
}

function append(el, children) {
    for (const c of children) {
        if (c === undefined || c === null || c === false) {
            continue;
        }
        if (Array.isArray(c)) {
            append(el, c);
        } else {
            el.append(c instanceof Node ? c : document.createTextNode(String(c)));
        }
    }
}

/** Replaces an element's children. */
export function fill(el, ...children) {
    el.replaceChildren();
    append(el, children);
    return el;
}

/** `document.getElementById`, failing loudly when the page lacks it. */
export function byId(id) {
    const el = document.getElementById(id);
    if (!el) {
        throw new Error(`the page has no #${id}`);
    }
    return el;
}

/** A table with a header row and body rows (arrays of cells or `<tr>`s). */
export function table(headers, rows, props = {}) {
    return h('div', { class: 'table-wrap' },
        h('table', props,
            h('thead', {}, h('tr', {}, headers.map((t) => h('th', { scope: 'col' }, t)))),
            h('tbody', {}, rows)));
}

// === dialogs ===

let dialogQueue = Promise.resolve();

/**
 * A modal dialog; resolves with the input's value (or `true` without an
 * input) when confirmed, `null` when cancelled. One at a time.
 * - `title`, `message` (string or nodes), `confirm` (button label),
 *   `danger` (a red confirm button),
 * - `input`: `{label, type, value, placeholder, autocomplete}`; with
 *   `type: 'checkbox'` the dialog resolves with `checked`,
 * - `check(value)`: resolves to an error message to show (the dialog stays
 *   open) or nothing to close it; may be async (the key dialog asks kvgate).
 */
export function ask(opts) {
    const run = () => openDialog(opts);
    const result = dialogQueue.then(run, run);
    dialogQueue = result.catch(() => {});
    return result;
}

function openDialog({ title, message, confirm = 'OK', cancel = 'Cancel', danger = false, input, check, id }) {
    return new Promise((resolve) => {
        const checkbox = input?.type === 'checkbox';
        const field = input ? h('input', {
            type: input.type ?? 'text',
            value: checkbox ? undefined : input.value ?? '',
            checked: checkbox && input.value,
            placeholder: input.placeholder,
            autocomplete: input.autocomplete ?? 'off',
            id: 'dialog-input',
            spellcheck: 'false',
        }) : null;
        // A checkbox sits inside its label; a text field under it.
        const fieldBlock = !input ? null : checkbox
            ? h('label', { class: 'check' }, field, ` ${input.label ?? ''}`)
            : [h('label', { for: 'dialog-input' }, input.label ?? ''), field];
        const error = h('p', { class: 'dialog-error', role: 'alert', id: 'dialog-error', hidden: true });
        const ok = h('button', { type: 'submit', class: danger ? 'danger' : 'primary', id: 'dialog-confirm' }, confirm);
        const no = cancel ? h('button', { type: 'button', id: 'dialog-cancel' }, cancel) : null;
        const form = h('form', { class: 'dialog-form' },
            h('h2', {}, title),
            message ? h('div', { class: 'dialog-message' }, message) : null,
            fieldBlock,
            error,
            h('div', { class: 'dialog-buttons' }, no, ok));
        const dlg = h('dialog', { class: 'dialog', id: id ?? 'dialog', 'aria-labelledby': 'dialog-title' }, form);
        form.querySelector('h2').id = 'dialog-title';
        document.body.append(dlg);
        let settled = false;
        const done = (value) => {
            if (settled) {
                return;
            }
            settled = true;
            dlg.close();
            dlg.remove();
            resolve(value);
        };
        form.addEventListener('submit', async (e) => {
            e.preventDefault();
            const value = !field ? true : checkbox ? field.checked : field.value;
            if (check) {
                ok.disabled = true;
                let problem;
                try {
                    problem = await check(value);
                } catch (err) {
                    problem = err.message;
                }
                ok.disabled = false;
                if (problem) {
                    error.textContent = problem;
                    error.hidden = false;
                    if (field && !checkbox) {
                        field.select();
                    }
                    return;
                }
            }
            done(value);
        });
        no?.addEventListener('click', () => done(null));
        dlg.addEventListener('cancel', (e) => {
            if (!cancel) {
                e.preventDefault();
                return;
            }
            done(null);
        });
        dlg.showModal();
        (field ?? ok).focus();
    });
}

// === toasts ===

const MAX_TOASTS = 4;

/** A short message in the corner (click to dismiss): `kind` is info, ok or error. */
export function toast(message, kind = 'info') {
    const box = byId('toasts');
    const el = h('div', {
        class: ['toast', kind],
        role: kind === 'error' ? 'alert' : 'status',
        title: 'click to dismiss',
        onclick: (e) => e.currentTarget.remove(),
    }, message);
    box.append(el);
    while (box.children.length > MAX_TOASTS) {
        box.firstElementChild.remove();
    }
    setTimeout(() => el.remove(), kind === 'error' ? 10_000 : 4_000);
    return el;
}

/**
 * Runs `action` with `button` disabled (and labelled `busyLabel`)
 * meanwhile; an error becomes an error toast. Resolves with the action's
 * result, or undefined after an error.
 */
export async function busy(button, busyLabel, action) {
    const label = button?.textContent;
    if (button) {
        button.disabled = true;
        if (busyLabel) {
            button.textContent = busyLabel;
        }
    }
    try {
        return await action();
    } catch (e) {
        toast(e.message, 'error');
        return undefined;
    } finally {
        if (button) {
            button.disabled = false;
            button.textContent = label;
        }
    }
}
