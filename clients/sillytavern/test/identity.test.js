import assert from 'node:assert/strict';
import { beforeEach, test } from 'node:test';

import { state } from './stub-st.js';
import { kindOf, mergeYaml, noteGeneration, stampChatCompletion, stampTextCompletion } from '../identity.js';
import { setSetting } from '../settings.js';

beforeEach(() => {
    state.characterId = 0;
    state.groupId = null;
    setSetting('identity', true);
});

test('ST generation types map to kvgate kinds', () => {
    for (const t of ['normal', 'regenerate', 'swipe', 'continue', 'quiet', 'impersonate']) {
        assert.equal(kindOf(t), t);
    }
    assert.equal(kindOf(undefined), 'normal');
    assert.equal(kindOf('something-new'), 'normal');
});

test('a 1:1 chat: the body object names the chat file, the character and the kind, once', () => {
    noteGeneration('swipe');
    const params = { prompt: 'x', api_type: 'llamacpp' };
    stampTextCompletion(params);
    assert.deepEqual(params.kvgate, { character: 'Alice', kind: 'swipe', chat: 'Alice - 2026-01-02@03h04m05s' });
    // A second request with no generation before it (generateRaw) gets nothing.
    const raw = { prompt: 'y', api_type: 'llamacpp' };
    stampTextCompletion(raw);
    assert.equal(raw.kvgate, undefined);
});

test('a group: the chat key is the group chat\'s, the character the drafted member', () => {
    state.groupId = '17';
    state.characterId = 1;
    noteGeneration('normal');
    const params = { api_type: 'llamacpp' };
    stampTextCompletion(params);
    assert.deepEqual(params.kvgate, { character: 'Bob', kind: 'normal', chat: 'group:2026-01-02@03h04m05s' });
});

test('other text completion types and no character get nothing', () => {
    noteGeneration('normal');
    const ooba = { api_type: 'ooba' };
    stampTextCompletion(ooba);
    assert.equal(ooba.kvgate, undefined);
    state.characterId = undefined;
    noteGeneration('normal');
    const none = { api_type: 'llamacpp' };
    stampTextCompletion(none);
    assert.equal(none.kvgate, undefined);
});

test('the switch turns it off', () => {
    setSetting('identity', false);
    noteGeneration('normal');
    const params = { api_type: 'llamacpp' };
    stampTextCompletion(params);
    assert.equal(params.kvgate, undefined);
});

test('chat completion: merged into the custom include headers, the user\'s entries kept and winning', () => {
    noteGeneration('continue');
    const data = { chat_completion_source: 'custom', custom_include_headers: '{"X-Title": "mine", "X-Kvgate-Kind": "quiet"}', custom_include_body: '{"top_k": 7}' };
    stampChatCompletion(data);
    assert.deepEqual(JSON.parse(data.custom_include_headers), {
        'X-Kvgate-Character': 'Alice',
        'X-Kvgate-Kind': 'quiet',
        'X-Kvgate-Chat': encodeURIComponent('Alice - 2026-01-02@03h04m05s'),
        'X-Title': 'mine',
    });
    assert.equal(data.custom_include_body, '{"top_k": 7}', 'the body is left alone');
});

test('chat completion: names are percent-encoded UTF-8 in headers', () => {
    state.characters.push({ name: 'Алиса', avatar: 'a.png', chat: 'Алиса - 1' });
    state.characterId = state.characters.length - 1;
    noteGeneration('impersonate');
    const data = { chat_completion_source: 'custom', custom_include_headers: '' };
    stampChatCompletion(data);
    assert.deepEqual(JSON.parse(data.custom_include_headers), {
        'X-Kvgate-Character': encodeURIComponent('Алиса'),
        'X-Kvgate-Kind': 'impersonate',
        'X-Kvgate-Chat': encodeURIComponent('Алиса - 1'),
    });
    state.characters.pop();
});

test('chat completion: unreadable headers YAML → the body object, the user\'s keys kept', () => {
    noteGeneration('swipe');
    const data = { chat_completion_source: 'custom', custom_include_headers: 'a: [unclosed', custom_include_body: '{"top_k": 7}' };
    stampChatCompletion(data);
    assert.equal(data.custom_include_headers, 'a: [unclosed');
    assert.deepEqual(JSON.parse(data.custom_include_body), {
        kvgate: { character: 'Alice', kind: 'swipe', chat: 'Alice - 2026-01-02@03h04m05s' }, top_k: 7,
    });
});

test('chat completion: a list of mappings gets ours first', () => {
    assert.deepEqual(JSON.parse(mergeYaml('[{"a": 1}, {"b": 2}]', { kvgate: { kind: 'normal' } })),
        [{ kvgate: { kind: 'normal' } }, { a: 1 }, { b: 2 }]);
});

test('chat completion from another source gets nothing', () => {
    noteGeneration('normal');
    const data = { chat_completion_source: 'openai', custom_include_body: '' };
    stampChatCompletion(data);
    assert.equal(data.custom_include_body, '');
});
