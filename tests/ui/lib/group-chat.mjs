// A SillyTavern group chat replayed straight to kvgate's front port, no
// SillyTavern needed: text-completion requests in the exact shape SillyTavern
// 1.19.0 sends over Text Completion → llama.cpp (the sampler fields of the
// recorded tests/fixtures/st-1.19.0-text-completions.jsonl; the prompt built
// like its "swap character cards" prompts: the speaker's card, its example
// dialogue, the chat, a `\nName:` tail; the other names as stop strings).
// The characters are DEFAULT_CHARACTERS; kvgate names the chat
// `Alice+Bob+Carol+User`.

import fs from 'node:fs';
import path from 'node:path';

import { DEFAULT_CHARACTERS } from './sillytavern.mjs';
import { REPO } from './stack.mjs';

export const USER = 'User';
export const ROSTER = DEFAULT_CHARACTERS.map((c) => c.name);
export const GROUP_CHAT = [...ROSTER, USER].sort().join('+');

/** The sampler fields of SillyTavern's first recorded request. */
function template() {
  const file = path.join(REPO, 'tests/fixtures/st-1.19.0-text-completions.jsonl');
  const first = JSON.parse(fs.readFileSync(file, 'utf8').split('\n')[0]);
  const { prompt, stop, stopping_strings: _, api_server: __, ...fields } = first.body;
  return fields;
}

/** The chat's start: each member's greeting. */
export function greetings() {
  return DEFAULT_CHARACTERS.map((c) => `${c.name}: ${c.first_mes}`);
}

/** The prompt SillyTavern writes for `speaker` after `history` lines. */
export function groupPrompt(speaker, history) {
  const c = DEFAULT_CHARACTERS.find((x) => x.name === speaker);
  if (!c) throw new Error(`no character ${speaker}`);
  const examples = c.mes_example.replace('<START>\n', '')
    .replaceAll('{{user}}', USER).replaceAll('{{char}}', speaker);
  return [
    `Write ${speaker}'s next reply in a fictional chat between ${speaker} and ${USER}.`,
    c.description,
    `${speaker}'s personality: ${c.personality}`,
    `Scenario: ${c.scenario}`,
    '***',
    examples,
    '***',
    ...history,
    `${speaker}:`,
  ].join('\n');
}

/** The request body for `speaker`'s turn (`nPredict`: reply tokens). */
export function turnBody(speaker, history, { nPredict } = {}) {
  const stop = [`\n${USER}:`, ...ROSTER.filter((n) => n !== speaker).map((n) => `\n${n}:`), '\n***'];
  const body = { ...template(), prompt: groupPrompt(speaker, history), stopping_strings: stop, stop };
  if (nPredict) {
    for (const k of ['n_predict', 'max_tokens', 'max_new_tokens', 'num_predict']) body[k] = nPredict;
  }
  return body;
}

/**
 * Sends one turn to kvgate's front port (streamed, as SillyTavern asks) and
 * reads the whole answer. Returns `{status, slot, character, text}`.
 */
export async function sendTurn(frontUrl, speaker, history, opts = {}) {
  const res = await fetch(`${frontUrl}/completion`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(turnBody(speaker, history, opts)),
    signal: AbortSignal.timeout(60000),
  });
  const body = await res.text();
  if (res.status !== 200) throw new Error(`${speaker}'s turn: HTTP ${res.status}: ${body.slice(0, 300)}`);
  let text = '';
  for (const line of body.split('\n')) {
    if (!line.startsWith('data: ')) continue;
    try { text += JSON.parse(line.slice(6)).content ?? ''; } catch { /* [DONE] or a comment */ }
  }
  return {
    status: res.status,
    slot: res.headers.get('x-kvgate-slot'),
    character: res.headers.get('x-kvgate-character'),
    text,
  };
}

/** Canned user messages and replies (the tiny model's own text is noise). */
const USER_LINES = [
  'Good evening Alice, Bob and Carol! I came in on the coast road.',
  'Carol, Alice and Bob: is the storm getting worse?',
  'Bob, Carol and Alice, who keeps the lighthouse?',
  'Alice, Bob and Carol, shall we light the lamps?',
  'Carol, Bob and Alice: what is for supper?',
];
const ORDERS = [
  ['Alice', 'Bob', 'Carol'],
  ['Carol', 'Alice', 'Bob'],
  ['Bob', 'Carol', 'Alice'],
  ['Alice', 'Carol', 'Bob'],
  ['Carol', 'Bob', 'Alice'],
];

/**
 * Plays `rounds` rounds (a user message, then each member answers), one
 * turn at a time, calling `onTurn({round, speaker, result})` after each.
 * Three characters on two slots: from the third turn on, each turn evicts
 * another character, who is saved and later restored.
 */
export async function replayGroupChat(frontUrl, { rounds = 4, onTurn = () => {} } = {}) {
  const history = greetings();
  const turns = [];
  for (let round = 0; round < rounds; round++) {
    history.push(`${USER}: ${USER_LINES[round % USER_LINES.length]}`);
    for (const speaker of ORDERS[round % ORDERS.length]) {
      const result = await sendTurn(frontUrl, speaker, history);
      history.push(`${speaker}: *${speaker} answers in turn ${turns.length + 1}.*`);
      turns.push({ round, speaker, ...result });
      await onTurn({ round, speaker, result });
    }
  }
  return turns;
}
