// The group preload popup: warm up the group's members before the talk
// starts. Each member is listed, muted members (group.disabled_members)
// unticked; a search box and "select all". Starting:
// 1. builds each ticked member's prompt as ST would for its own turn
//    (prompts.js; Text Completion with llama.cpp only), showing whose;
// 2. POST /preload {"chat", "characters", "prompts"} to kvgate, which for
//    each member in turn restores its best save into a slot, or else
//    evaluates its prompt and saves it;
// 3. follows the job (GET /preload/{id} every 700 ms, and kvgate's
//    preload_progress events) until it is done; Cancel stops the prompt
//    building, or the job (DELETE /preload/{id}).
// Closing the popup leaves kvgate's job running; its end is toasted.
//
// Stable hooks for UI tests:
//   #kvgate_preload_popup                  the popup's content
//   #kvgate_preload_search                 filters the member list
//   #kvgate_preload_all                    select all (the shown members)
//   [data-kvgate="preload-member"]         a member's checkbox, data-name="<name>",
//                                          data-muted="true" for a muted one
//   #kvgate_preload_start, #kvgate_preload_cancel
//   #kvgate_preload_progress               data-state="idle|prompts|running|done|cancelled|failed"
//   #kvgate_preload_bar                    a <progress> (value done, max total)
//   #kvgate_preload_current                the member being worked on
//   #kvgate_preload_done, #kvgate_preload_failed
//                                          lists; items [data-kvgate="preload-done-item"|"preload-failed-item"]
//                                          with data-character
//   the popup's "Close" button closes it.

import * as api from '../api.js';
import { chatCharacters, currentChatKey, currentGroup } from '../chat.js';
import { el } from '../format.js';
import { onKvgateEvent } from '../live.js';
import { refresh } from '../model.js';
import { tell, tellError } from '../notify.js';
import { buildMemberPrompts, canBuildPrompts } from '../prompts.js';
import { isGenerating, popups } from '../st.js';

const POLL_MS = 700;

function withHook(node, hook, data = {}) {
    node.dataset.kvgate = hook;
    Object.assign(node.dataset, data);
    return node;
}

class PreloadRun {
    constructor(members, chatKey) {
        this.members = members;
        this.chatKey = chatKey;
        this.jobId = null;
        this.finished = false;
        this.abort = new AbortController();
        this.unfollow = () => {};
        this.build();
    }

    build() {
        this.search = withHook(el('input', { id: 'kvgate_preload_search', className: 'text_pole', type: 'search', placeholder: 'Search members' }), 'preload-search');
        this.all = withHook(el('input', { id: 'kvgate_preload_all', type: 'checkbox' }), 'preload-all');
        this.list = withHook(el('div', { id: 'kvgate_preload_members', className: 'kvgate-preload-members' }), 'preload-members');
        for (const m of this.members) {
            const box = withHook(el('input', { type: 'checkbox', checked: !m.muted }), 'preload-member', { name: m.name });
            if (m.muted) {
                box.dataset.muted = 'true';
            }
            box.addEventListener('change', () => this.syncAll());
            this.list.append(el('label', { className: 'checkbox_label kvgate-preload-member' }, box,
                el('span', { textContent: m.name + (m.muted ? ' (muted)' : '') })));
        }
        this.search.addEventListener('input', () => this.filter());
        this.all.addEventListener('change', () => {
            for (const box of this.visibleBoxes()) {
                box.checked = this.all.checked;
            }
        });

        this.start = withHook(el('div', { id: 'kvgate_preload_start', className: 'menu_button menu_button_icon' },
            el('i', { className: 'fa-solid fa-fire' }), el('span', { textContent: 'Start preload' })), 'preload-start');
        this.cancel = withHook(el('div', { id: 'kvgate_preload_cancel', className: 'menu_button menu_button_icon displayNone' },
            el('i', { className: 'fa-solid fa-stop' }), el('span', { textContent: 'Cancel' })), 'preload-cancel');
        this.start.addEventListener('click', () => this.run());
        this.cancel.addEventListener('click', () => this.stop());

        this.bar = withHook(el('progress', { id: 'kvgate_preload_bar', value: 0, max: 1 }), 'preload-bar');
        this.current = withHook(el('div', { id: 'kvgate_preload_current' }), 'preload-current');
        this.done = withHook(el('ul', { id: 'kvgate_preload_done', className: 'kvgate-preload-results' }), 'preload-done');
        this.failed = withHook(el('ul', { id: 'kvgate_preload_failed', className: 'kvgate-preload-results kvgate-failed' }), 'preload-failed');
        this.progress = withHook(el('div', { id: 'kvgate_preload_progress', className: 'kvgate-preload-progress' },
            this.bar, this.current, this.done, this.failed), 'preload-progress', { state: 'idle' });

        const note = canBuildPrompts()
            ? 'Each member\'s prompt is built as SillyTavern would build it for that member\'s turn; kvgate restores a member\'s best save, or else reads its prompt and saves it.'
            : 'Prompts can be built only with Text Completion → llama.cpp; kvgate restores each member\'s best save, or else uses the last prompt it saw for that member.';
        this.root = withHook(el('div', { id: 'kvgate_preload_popup', className: 'kvgate-popup' },
            el('h3', { textContent: 'Preload group members' }),
            el('p', { className: 'opacity50p', textContent: note }),
            this.search,
            el('label', { className: 'checkbox_label' }, this.all, el('span', { textContent: 'Select all' })),
            this.list,
            el('div', { className: 'flex-container gap5px' }, this.start, this.cancel),
            this.progress), 'preload-popup');
        this.syncAll();
    }

    boxes() {
        return [...this.list.querySelectorAll('[data-kvgate="preload-member"]')];
    }

    visibleBoxes() {
        return this.boxes().filter(b => !b.closest('label').classList.contains('displayNone'));
    }

    filter() {
        const q = this.search.value.trim().toLowerCase();
        for (const box of this.boxes()) {
            box.closest('label').classList.toggle('displayNone', q !== '' && !box.dataset.name.toLowerCase().includes(q));
        }
        this.syncAll();
    }

    syncAll() {
        const shown = this.visibleBoxes();
        this.all.checked = shown.length > 0 && shown.every(b => b.checked);
    }

    setState(state) {
        this.progress.dataset.state = state;
        const running = state === 'prompts' || state === 'running';
        this.start.classList.toggle('displayNone', running);
        this.cancel.classList.toggle('displayNone', !running);
        for (const box of [...this.boxes(), this.all]) {
            box.disabled = running;
        }
    }

    async run() {
        const names = new Set(this.boxes().filter(b => b.checked).map(b => b.dataset.name));
        const chosen = this.members.filter(m => names.has(m.name));
        if (!chosen.length) {
            tell('warning', 'Tick at least one member.', 'kvgate: preload');
            return;
        }
        if (isGenerating()) {
            tell('warning', 'Wait for the generation to finish.', 'kvgate: preload');
            return;
        }
        this.abort = new AbortController();
        this.jobId = null;
        this.finished = false;
        this.done.replaceChildren();
        this.failed.replaceChildren();
        this.bar.max = chosen.length;
        this.bar.value = 0;

        this.setState('prompts');
        let prompts = {};
        try {
            prompts = await buildMemberPrompts(chosen, {
                signal: this.abort.signal,
                onMember: (name) => { this.current.textContent = `Building ${name}'s prompt…`; },
            });
        } catch (e) {
            console.warn('[kvgate] building prompts failed; preloading without them', e);
        }
        if (this.abort.signal.aborted) {
            this.current.textContent = 'Cancelled.';
            this.setState('cancelled');
            return;
        }

        this.current.textContent = 'Starting…';
        try {
            const request = { chat: this.chatKey, characters: chosen.map(m => m.name) };
            if (Object.keys(prompts).length) {
                request.prompts = prompts;
            }
            const answer = await api.startPreload(request);
            this.jobId = answer.id;
        } catch (e) {
            tellError('preload', e);
            this.current.textContent = e.message;
            this.setState('failed');
            return;
        }
        this.setState('running');
        this.unfollow = onKvgateEvent((event) => {
            if (event.type === 'preload_progress' && event.id === this.jobId) {
                this.showProgress(event);
            }
        });
        await this.follow();
        this.unfollow();
    }

    /** Polls the job until it ends (events fill in between polls). */
    async follow() {
        while (!this.finished) {
            try {
                this.showProgress(await api.preloadProgress(this.jobId));
            } catch (e) {
                this.current.textContent = `Lost the job: ${e.message}`;
                this.setState('failed');
                return;
            }
            if (!this.finished) {
                await new Promise(resolve => setTimeout(resolve, POLL_MS));
            }
        }
    }

    showProgress(p) {
        if (this.finished || !p) {
            return;
        }
        this.bar.max = p.total || 1;
        this.bar.value = p.done ?? 0;
        this.current.textContent = p.current ? `${p.current} (${(p.done ?? 0) + 1} of ${p.total})` : '';
        this.done.replaceChildren(...(p.succeeded ?? []).map(s =>
            withHook(el('li', { textContent: `${s.character}: ${s.result ?? 'ok'}` }), 'preload-done-item', { character: s.character })));
        this.failed.replaceChildren(...(p.failed ?? []).map(f =>
            withHook(el('li', { textContent: `${f.character}: ${f.reason}` }), 'preload-failed-item', { character: f.character })));
        if (p.state !== 'running') {
            this.finished = true;
            this.unfollow();
            this.current.textContent = p.state === 'cancelled' ? 'Cancelled.' : 'Done.';
            this.setState(p.state);
            const ok = (p.succeeded ?? []).length;
            const bad = (p.failed ?? []).length;
            tell(bad ? 'warning' : 'success', `${ok} warmed up${bad ? `, ${bad} failed` : ''}${p.state === 'cancelled' ? ' (cancelled)' : ''}.`, 'kvgate: preload');
            refresh();
        }
    }

    async stop() {
        this.abort.abort();
        if (this.jobId !== null && !this.finished) {
            try {
                this.showProgress(await api.cancelPreload(this.jobId));
            } catch (e) {
                tellError('cancel preload', e);
            }
        }
    }
}

/** Opens the preload popup for the group chat open now. */
export async function openPreloadPopup() {
    if (!currentGroup()) {
        tell('info', 'Preload is for group chats: open one first.', 'kvgate: preload');
        return;
    }
    const chatKey = currentChatKey();
    if (!chatKey) {
        tell('warning', 'This group has no chat open.', 'kvgate: preload');
        return;
    }
    const { Popup, POPUP_TYPE } = popups();
    const run = new PreloadRun(chatCharacters(), chatKey);
    const popup = new Popup(run.root, POPUP_TYPE.TEXT, '', {
        okButton: 'Close',
        cancelButton: false,
        wide: true,
        allowVerticalScrolling: true,
        leftAlign: true,
    });
    await popup.show();
    // Still building prompts: nothing was sent to kvgate yet, so stop.
    if (run.progress.dataset.state === 'prompts') {
        run.abort.abort();
    }
}
