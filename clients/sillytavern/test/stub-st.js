// A stand-in for what SillyTavern gives extensions (SillyTavern.getContext(),
// SillyTavern.libs), enough for the modules that only read state. `state`
// is what getContext() reports; tests change it between calls.

export const state = {
    characters: [{ name: 'Alice', avatar: 'Alice.png', chat: 'Alice - 2026-01-02@03h04m05s' }, { name: 'Bob', avatar: 'Bob.png' }],
    characterId: 0,
    groupId: null,
    groups: [{ id: '17', name: 'Inn', chat_id: '2026-01-02@03h04m05s', chats: ['2026-01-02@03h04m05s'], members: ['Alice.png', 'Bob.png'], disabled_members: ['Bob.png'] }],
    extensionSettings: {},
    mainApi: 'textgenerationwebui',
    textCompletionSettings: { type: 'llamacpp' },
    stopped: 0,
};

globalThis.SillyTavern = {
    getContext() {
        return {
            ...state,
            getCurrentChatId: () => (state.groupId !== null
                ? state.groups.find(g => g.id === state.groupId)?.chat_id
                : state.characters[state.characterId]?.chat),
            saveSettingsDebounced: () => {},
            stopGeneration: () => { state.stopped += 1; },
        };
    },
    // JSON is YAML: enough to test what we do with the parsed value.
    libs: { yaml: { parse: (text) => JSON.parse(text) } },
};
