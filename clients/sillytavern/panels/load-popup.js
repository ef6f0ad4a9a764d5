// The load popup: kvgate's saves (GET /saves?q=) by chat and character,
// the chat open now first and marked; pick one save for each of several
// characters, from this chat or any other, and load them into slots for
// this chat (POST /load {"items":[{"file","chat"}]}). Saves of another
// model can't be picked (kvgate refuses them: they'd give garbage).
//
// Stable hooks for UI tests:
//   #kvgate_load_popup                     the popup's content
//   #kvgate_load_search                    search by chat (or group name) or character
//   #kvgate_load_selected                  what is picked, data-count="<n>"
//   [data-kvgate="load-chat"]              a chat (<details>), data-chat="<key>",
//                                          data-current="true" for this chat
//   [data-kvgate="load-character"]         data-character="<name>"
//   [data-kvgate="load-save"]              a save's checkbox, data-file="<file>"
//   the popup's OK button ("Load") loads; Cancel closes.

import * as api from '../api.js';
import { currentChatKey, describeChat } from '../chat.js';
import { refresh } from '../model.js';
import { tell, tellError } from '../notify.js';
import { el, when } from '../format.js';
import { popups, st } from '../st.js';

/** Chats in display order: this chat first, then by their newest save. */
function ordered(chats, currentKey) {
    const newest = c => Math.max(0, ...c.characters.flatMap(ch => ch.saves.map(s => s.created)));
    return [...chats].sort((a, b) =>
        (b.chat === currentKey) - (a.chat === currentKey) || newest(b) - newest(a));
}

function saveLabel(save) {
    const parts = [when(save.created)];
    if (save.tag) {
        parts.push(`tag "${save.tag}"`);
    }
    parts.push(save.kind, `${save.tokens} tokens`);
    if (save.model_match === false) {
        parts.push('another model');
    }
    return parts.join(' · ');
}

/** The popup's state and drawing. */
class LoadPicker {
    constructor() {
        this.currentKey = currentChatKey();
        /** character → {file, chat} */
        this.picked = new Map();
        this.list = el('div', { id: 'kvgate_load_list', className: 'kvgate-load-list' });
        this.list.dataset.kvgate = 'load-list';
        this.selected = el('div', { id: 'kvgate_load_selected', className: 'kvgate-load-selected' });
        this.selected.dataset.kvgate = 'load-selected';
        this.search = el('input', { id: 'kvgate_load_search', className: 'text_pole', type: 'search', placeholder: 'Search by chat or character' });
        this.search.dataset.kvgate = 'load-search';
        let timer = null;
        this.search.addEventListener('input', () => {
            clearTimeout(timer);
            timer = setTimeout(() => this.fetch(), 300);
        });
        this.root = el('div', { id: 'kvgate_load_popup', className: 'kvgate-popup' },
            el('h3', { textContent: 'Load saved caches' }),
            el('p', { className: 'opacity50p', textContent: 'Pick one save per character. They are loaded into slots for this chat, from any chat.' }),
            this.search, this.selected, this.list);
        this.root.dataset.kvgate = 'load-popup';
        this.showSelection();
    }

    /**
     * GET /saves?q=: kvgate matches the chat key or the character. A group
     * chat's key holds no group name, so a search that names a group asks
     * for everything and filters here by what the list shows.
     */
    async fetch() {
        const q = this.search.value.trim();
        const needle = q.toLowerCase();
        const namesGroup = q !== '' && st().groups.some(g => String(g.name).toLowerCase().includes(needle));
        this.list.textContent = 'Loading…';
        try {
            const answer = await api.saves(namesGroup ? '' : q);
            let chats = answer?.chats ?? [];
            if (namesGroup) {
                chats = chats
                    .map(c => describeChat(c.chat).toLowerCase().includes(needle)
                        ? c
                        : { ...c, characters: c.characters.filter(ch => ch.character.toLowerCase().includes(needle)) })
                    .filter(c => c.characters.length);
            }
            this.draw(chats);
        } catch (e) {
            this.list.textContent = e.message;
        }
    }

    draw(chats) {
        const searching = this.search.value.trim() !== '';
        const sections = ordered(chats, this.currentKey).map(chat => this.chatSection(chat, searching));
        this.list.replaceChildren(...sections);
        if (!sections.length) {
            this.list.textContent = searching ? 'No save matches.' : 'kvgate has no saves yet.';
        }
    }

    chatSection(chat, searching) {
        const isCurrent = chat.chat === this.currentKey;
        const section = el('details', { className: 'kvgate-load-chat', open: isCurrent || searching },
            el('summary', {}, el('b', { textContent: describeChat(chat.chat) }),
                isCurrent ? el('span', { className: 'kvgate-current', textContent: ' (this chat)' }) : null));
        section.dataset.kvgate = 'load-chat';
        section.dataset.chat = chat.chat;
        if (isCurrent) {
            section.dataset.current = 'true';
        }
        for (const character of chat.characters) {
            section.append(this.characterBlock(chat.chat, character));
        }
        return section;
    }

    characterBlock(chatKey, character) {
        const block = el('div', { className: 'kvgate-load-character' }, el('div', { className: 'kvgate-name', textContent: character.character }));
        block.dataset.kvgate = 'load-character';
        block.dataset.character = character.character;
        for (const save of character.saves) {
            const box = el('input', { type: 'checkbox', disabled: save.model_match === false });
            box.dataset.kvgate = 'load-save';
            box.dataset.file = save.file;
            box.dataset.character = character.character;
            box.checked = this.picked.get(character.character)?.file === save.file;
            box.addEventListener('change', () => this.pick(character.character, save.file, chatKey, box.checked));
            const label = el('label', { className: 'checkbox_label kvgate-load-save', title: save.file }, box, el('span', { textContent: saveLabel(save) }));
            block.append(label);
        }
        return block;
    }

    /** One save per character: picking one unpicks the character's others. */
    pick(character, file, chatKey, on) {
        if (on) {
            this.picked.set(character, { file, chat: chatKey });
        } else if (this.picked.get(character)?.file === file) {
            this.picked.delete(character);
        }
        for (const box of this.list.querySelectorAll('[data-kvgate="load-save"]')) {
            if (box.dataset.character === character) {
                box.checked = this.picked.get(character)?.file === box.dataset.file;
            }
        }
        this.showSelection();
    }

    showSelection() {
        const entries = [...this.picked.entries()];
        this.selected.dataset.count = String(entries.length);
        this.selected.textContent = entries.length
            ? 'Load: ' + entries.map(([name, p]) => p.chat === this.currentKey ? name : `${name} (from ${describeChat(p.chat)})`).join(', ')
            : 'Nothing picked yet.';
    }

    /** POST /load: into this chat's slots (or, with no chat open, the saves' own chats). */
    async load() {
        const items = [...this.picked.values()].map(p => (this.currentKey ? { file: p.file, chat: this.currentKey } : { file: p.file }));
        try {
            const answer = await api.load(items);
            for (const l of answer?.loaded ?? []) {
                tell('success', `${l.character} → slot ${l.slot} (${l.tokens} tokens, ${l.file})`, 'kvgate: loaded');
            }
            for (const f of answer?.failed ?? []) {
                tell('error', `${f.file}: ${f.reason}`, 'kvgate: load failed');
            }
        } catch (e) {
            tellError('load', e);
        }
        refresh();
    }
}

/** Opens the load popup. */
export async function openLoadPopup() {
    const { Popup, POPUP_TYPE, POPUP_RESULT } = popups();
    const picker = new LoadPicker();
    const popup = new Popup(picker.root, POPUP_TYPE.TEXT, '', {
        okButton: 'Load',
        cancelButton: 'Cancel',
        wide: true,
        large: true,
        allowVerticalScrolling: true,
        leftAlign: true,
        onClosing: (p) => {
            if (p.result === POPUP_RESULT.AFFIRMATIVE && picker.picked.size === 0) {
                tell('warning', 'Pick at least one save.', 'kvgate: load');
                return false;
            }
            return true;
        },
    });
    const shown = popup.show();
    picker.fetch();
    if (await shown === POPUP_RESULT.AFFIRMATIVE) {
        await picker.load();
    }
}
