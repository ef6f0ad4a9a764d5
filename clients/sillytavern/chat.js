// Which chat and which characters the user is looking at, in kvgate's terms.
//
// The chat key is what the extension sends kvgate as the explicit chat, so
// it decides which saves belong together:
// - a 1:1 chat: ST's chat id, the chat file's name ("Alice - 2025-11-06@12h30m15s");
// - a group chat: "group:" + the group's chat id. ST keeps every group's
//   chats in one folder, so that id is unique among groups; it stays the
//   same for every member (swap-cards mode included) and when the group is
//   renamed. The UI shows the group's name beside it (describeChat).
// Two chats with the same roster are different chats, unlike kvgate's own
// roster-based key.

import { st } from './st.js';

const GROUP_PREFIX = 'group:';

/** The current group object, or null in a 1:1 chat. */
export function currentGroup() {
    const { groupId, groups } = st();
    if (groupId === null || groupId === undefined) {
        return null;
    }
    return groups.find(g => String(g.id) === String(groupId)) ?? null;
}

/** kvgate's chat key for the chat open now; null when no chat is open. */
export function currentChatKey() {
    const group = currentGroup();
    if (group) {
        return group.chat_id ? GROUP_PREFIX + group.chat_id : null;
    }
    const chatId = st().getCurrentChatId();
    return chatId ? String(chatId) : null;
}

/** A chat key as a person reads it: a group chat gets its group's name. */
export function describeChat(key) {
    if (!key || !key.startsWith(GROUP_PREFIX)) {
        return key ?? '';
    }
    const chatId = key.slice(GROUP_PREFIX.length);
    const group = st().groups.find(g => Array.isArray(g.chats) && g.chats.includes(chatId));
    return group ? `${group.name} · ${chatId}` : chatId;
}

/** The character's name at index `chid` of ST's character list. */
export function characterName(chid) {
    if (chid === undefined || chid === null || chid === '') {
        return null;
    }
    return st().characters[Number(chid)]?.name ?? null;
}

/**
 * The characters of the chat open now, in ST's order:
 * [{chid, name, avatar, muted}]. A group lists every member; muted ones
 * (group.disabled_members) are flagged.
 */
export function chatCharacters() {
    const { characters, characterId } = st();
    const group = currentGroup();
    if (!group) {
        const name = characterName(characterId);
        return name ? [{ chid: Number(characterId), name, avatar: characters[Number(characterId)].avatar, muted: false }] : [];
    }
    const disabled = new Set(group.disabled_members ?? []);
    return (group.members ?? [])
        .map(avatar => ({ avatar, chid: characters.findIndex(c => c.avatar === avatar) }))
        .filter(m => m.chid !== -1)
        .map(m => ({ ...m, name: characters[m.chid].name, muted: disabled.has(m.avatar) }));
}
