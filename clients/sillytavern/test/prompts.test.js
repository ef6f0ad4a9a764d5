import assert from 'node:assert/strict';
import { test } from 'node:test';

import { state } from './stub-st.js';
import { canBuildPrompts, noteGeneration, takeCapture } from '../prompts.js';

test('nothing is captured without a capture in progress', () => {
    noteGeneration('quiet');
    assert.equal(takeCapture({ prompt: 'p' }), false);
    assert.equal(state.stopped, 0);
});

test('prompts are built only for llama.cpp Text Completion', () => {
    assert.equal(canBuildPrompts(), true);
    state.mainApi = 'openai';
    assert.equal(canBuildPrompts(), false);
    state.mainApi = 'textgenerationwebui';
});
