// The slot list and the save buttons.
//
// Stable hooks for UI tests:
//   #kvgate_slots                          the list
//   [data-kvgate="slot-row"]               one per slot, with data-slot="<id>",
//       data-upstream="<name>", data-character="<name>|" (empty: none)
//   [data-kvgate="slot-save"]              a row's save button (POST /slots/{id}/save)
//   #kvgate_slots_refresh                  GET /slots again
//   #kvgate_clear_slots                    "Clear all slots" (confirmation popup:
//       #kvgate_clear_erase checkbox, then OK) → POST /slots/clear
//   #kvgate_save_now                       POST /save
//   #kvgate_save_tag                       tag popup (ST's input popup), then POST /save {tag}

import * as api from '../api.js';
import { describeChat } from '../chat.js';
import { kvgateView, refresh, subscribe } from '../model.js';
import { tell, tellError } from '../notify.js';
import { popups } from '../st.js';

/** "Saved Alice (file), Bob (file)" / failures, from a /save-shaped answer. */
function reportSaves(answer, what) {
    const saved = answer?.saved ?? [];
    const failed = answer?.failed ?? [];
    if (saved.length) {
        tell('success', saved.map(s => `${s.character}: ${s.file}`).join('; '), `kvgate: ${what}`);
    }
    for (const f of failed) {
        tell('error', `${f.character ?? `slot ${f.slot}`}: ${f.reason}`, `kvgate: ${what} failed`);
    }
    if (!saved.length && !failed.length) {
        tell('info', 'No slot holds a character\'s cache: nothing to save.', `kvgate: ${what}`);
    }
}

/** Runs an action with its button disabled meanwhile. */
async function busy(button, action) {
    button?.classList.add('disabled');
    try {
        await action();
    } finally {
        button?.classList.remove('disabled');
    }
}

async function saveNow(button) {
    await busy(button, async () => {
        try {
            reportSaves(await api.saveAll(), 'save now');
        } catch (e) {
            tellError('save now', e);
        }
        refresh();
    });
}

async function saveWithTag(button) {
    const { callGenericPopup, POPUP_TYPE } = popups();
    const tag = await callGenericPopup(
        '<h3>Save with tag</h3><p>Every slot holding a character\'s cache is saved under this tag. Tagged saves are never rotated away.</p>',
        POPUP_TYPE.INPUT, '', { okButton: 'Save', placeholder: 'e.g. before the duel' },
    );
    if (typeof tag !== 'string' || !tag.trim()) {
        return;
    }
    await busy(button, async () => {
        try {
            reportSaves(await api.saveAll(tag.trim()), `save "${tag.trim()}"`);
        } catch (e) {
            tellError('save with tag', e);
        }
        refresh();
    });
}

async function clearAll(button) {
    const { Popup, POPUP_TYPE, POPUP_RESULT } = popups();
    const popup = new Popup(
        '<h3>Clear all slots?</h3><p>kvgate releases every slot; characters come back from their saves on their next turn. Unsaved messages are not saved first. Files on disk stay.</p>',
        POPUP_TYPE.CONFIRM, '',
        {
            okButton: 'Clear',
            cancelButton: 'Cancel',
            customInputs: [{ id: 'kvgate_clear_erase', label: 'Also erase the slots in llama-server', defaultState: false }],
        },
    );
    const result = await popup.show();
    if (result !== POPUP_RESULT.AFFIRMATIVE) {
        return;
    }
    const erase = Boolean(popup.inputResults?.get('kvgate_clear_erase'));
    await busy(button, async () => {
        try {
            const answer = await api.clearSlots(erase);
            const n = (answer?.cleared ?? []).length;
            tell('success', `${n} slot(s) released${erase ? `, ${(answer?.erased ?? []).length} erased` : ''}.`, 'kvgate: clear all slots');
        } catch (e) {
            tellError('clear all slots', e);
        }
        refresh();
    });
}

async function saveOne(slot, button, several) {
    await busy(button, async () => {
        try {
            reportSaves(await api.saveSlot(slot.id, several ? slot.upstream : undefined), `save slot ${slot.id}`);
        } catch (e) {
            tellError(`save slot ${slot.id}`, e);
        }
        refresh();
    });
}

function cell(text, className = '') {
    const span = document.createElement('span');
    span.className = className;
    span.textContent = text;
    return span;
}

function slotRow(slot, several) {
    const row = document.createElement('div');
    row.className = 'kvgate-slot-row';
    row.dataset.kvgate = 'slot-row';
    row.dataset.slot = String(slot.id);
    row.dataset.upstream = slot.upstream ?? '';
    row.dataset.character = slot.character ?? '';

    const id = several ? `${slot.upstream} #${slot.id}` : `#${slot.id}`;
    let who = slot.character ?? (slot.anonymous ? '(anonymous)' : '(free)');
    if ((slot.also_holds ?? []).length) {
        who += ` + ${slot.also_holds.join(', ')}`;
    }
    const details = [];
    if (slot.chat) {
        details.push(describeChat(slot.chat));
    }
    if (slot.character) {
        details.push(`${slot.messages_since_save ?? 0} unsaved`);
    }
    if (slot.tokens_cached !== null && slot.tokens_cached !== undefined) {
        details.push(`${slot.tokens_cached} tokens`);
    }
    if (slot.busy) {
        details.push('busy');
    }
    if (slot.character && slot.live === false) {
        details.push('contents unknown');
    }

    const save = document.createElement('div');
    save.className = 'menu_button menu_button_icon kvgate-slot-save';
    save.dataset.kvgate = 'slot-save';
    save.title = `Save slot ${slot.id} now (POST /slots/${slot.id}/save)`;
    save.innerHTML = '<i class="fa-solid fa-floppy-disk"></i>';
    if (!slot.character) {
        save.classList.add('disabled');
    } else {
        save.addEventListener('click', () => saveOne(slot, save, several));
    }

    row.append(cell(id, 'kvgate-slot-id'), cell(who, 'kvgate-name'), cell(details.join(' · '), 'kvgate-what'), save);
    return row;
}

function render(view) {
    const list = document.getElementById('kvgate_slots');
    if (!list) {
        return;
    }
    if (view.error) {
        list.textContent = view.error.message;
        return;
    }
    const slots = view.slots?.slots ?? [];
    const several = new Set(slots.map(s => s.upstream)).size > 1;
    list.replaceChildren(...slots.map(s => slotRow(s, several)));
    if (view.slots?.queued) {
        list.append(cell(`${view.slots.queued} request(s) waiting for a slot`, 'opacity50p'));
    }
    if (!slots.length) {
        list.textContent = 'kvgate knows no slots yet (is llama-server up?).';
    }
}

/** Wires the slot list and the save buttons. */
export function mountSlots() {
    subscribe(render);
    const on = (id, fn) => {
        const el = document.getElementById(id);
        el?.addEventListener('click', () => {
            if (!el.classList.contains('disabled')) {
                fn(el);
            }
        });
    };
    on('kvgate_slots_refresh', () => refresh({ withSettings: true }));
    on('kvgate_save_now', saveNow);
    on('kvgate_save_tag', saveWithTag);
    on('kvgate_clear_slots', clearAll);
    render(kvgateView());
}
