// The files tests/ui/lib/sillytavern.mjs writes into a SillyTavern data
// root, checked against the pinned SillyTavern package's own code and
// defaults (no browser, no server: a second or so). The UI tests show that
// SillyTavern loads them; these show they are what SillyTavern itself
// writes, so a new pin that changes a format fails here first, by name.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createRequire } from 'node:module';
import { test } from 'node:test';
import { pathToFileURL } from 'node:url';

import {
  sillyTavernDir, cardPng, characterCard, readCardPng, configYaml, settingsJson, writeDataRoot, DEFAULT_CHARACTERS,
} from './lib/sillytavern.mjs';

const ST = sillyTavernDir();
const stRequire = createRequire(path.join(ST, 'package.json'));
const source = (rel) => fs.readFileSync(path.join(ST, rel), 'utf8');

/** Every key path (`a.b.c`) of a plain object; arrays are leaves. */
function keyPaths(obj, prefix = '') {
  return Object.entries(obj).flatMap(([k, v]) => (v && typeof v === 'object' && !Array.isArray(v)
    ? keyPaths(v, `${prefix}${k}.`)
    : [`${prefix}${k}`]));
}

/**
 * The top-level keys of the object literal that starts at `marker` (which
 * ends with its `{`) in a source file: `key:` at the start of a line at
 * brace depth 1 (good enough for SillyTavern's plain settings literals).
 */
function literalKeys(src, marker) {
  const start = src.indexOf(marker);
  assert.ok(start >= 0, `${marker} not found`);
  const keys = [];
  let depth = 1;
  for (const line of src.slice(start + marker.length).split('\n')) {
    const m = /^\s*([A-Za-z_][A-Za-z0-9_]*)\s*:/.exec(line);
    if (m && depth === 1) keys.push(m[1]);
    for (const ch of line.replace(/'[^']*'|"[^"]*"|`[^`]*`/g, '')) {
      if (ch === '{' || ch === '[') depth++;
      if (ch === '}' || ch === ']') depth--;
    }
    if (depth <= 0) return keys;
  }
  assert.fail(`${marker}: no end`);
}

test('a character card PNG is byte for byte what SillyTavern writes', async () => {
  const { write, read } = await import(pathToFileURL(path.join(ST, 'src/character-card-parser.js')));
  for (const c of DEFAULT_CHARACTERS) {
    const card = characterCard(c);
    const ours = cardPng(card, { rgb: c.rgb });
    // write() drops any chara/ccv3 chunks and adds its own before IEND.
    const theirs = Buffer.from(write(ours, JSON.stringify(card)));
    assert.ok(theirs.equals(ours), `${c.name}: SillyTavern's write() changes our PNG`);
    const back = JSON.parse(read(ours));
    assert.equal(back.spec, 'chara_card_v3', 'read() prefers the ccv3 chunk');
    assert.equal(back.data.first_mes, c.first_mes);
    const chunks = readCardPng(ours);
    assert.equal(chunks.chara.spec, 'chara_card_v2');
    assert.equal(chunks.chara.name, c.name);
  }
});

test('a card has the fields of charaFormatData (src/endpoints/characters.js)', () => {
  const src = source('src/endpoints/characters.js');
  const fn = src.slice(src.indexOf('function charaFormatData('), src.indexOf('function convertWorldInfoToCharacterBook'));
  const set = new Set([...fn.matchAll(/_\.set\(char, '([a-z_.]+)'/g)].map((m) => m[1]));
  set.delete('data.character_book'); // only with a world book
  set.delete('data.extensions'); // only with extension data; its fields are set one by one
  set.add('create_date'); // set by /create's callers, as ST's own cards have it
  const ours = new Set(keyPaths(characterCard(DEFAULT_CHARACTERS[0])));
  assert.deepEqual([...ours].sort(), [...set].sort());
});

test('config.yaml sets only keys that default/config.yaml has, CSRF protection on', () => {
  const yaml = stRequire('yaml');
  const defaults = new Set(keyPaths(yaml.parse(source('default/config.yaml'))));
  const ours = yaml.parse(configYaml());
  for (const k of keyPaths(ours)) assert.ok(defaults.has(k), `${k} is not in SillyTavern's default config`);
  assert.equal(ours.disableCsrfProtection, false);
  assert.equal(ours.listen, false);
  assert.equal(ours.enableServerPlugins, false);
});

test('settings.json is the shipped default with known keys changed', () => {
  const shipped = JSON.parse(source('default/content/settings.json'));
  for (const api of ['text', 'chat']) {
    const s = settingsJson({ api, apiUrl: 'http://127.0.0.1:1' });
    assert.deepEqual(Object.keys(s).sort(), Object.keys(shipped).sort(), 'no top-level key added or lost');
    assert.equal(s.firstRun, false);
    assert.equal(s.main_api, api === 'chat' ? 'openai' : 'textgenerationwebui');
  }
  // The nested keys we set are keys of SillyTavern's own settings objects.
  const textgen = literalKeys(source('public/scripts/textgen-settings.js'), 'export const textgenerationwebui_settings = {');
  for (const k of ['streaming', 'seed', 'type', 'server_urls']) assert.ok(textgen.includes(k), `textgen setting ${k}`);
  const oai = literalKeys(source('public/scripts/openai.js'), 'const default_settings = {');
  for (const k of ['stream_openai', 'openai_max_context', 'openai_max_tokens', 'seed', 'chat_completion_source', 'custom_url']) {
    assert.ok(oai.includes(k), `chat completion setting ${k}`);
  }
});

test('a group file has the keys /api/groups/create writes (src/endpoints/groups.js)', () => {
  const keys = literalKeys(source('src/endpoints/groups.js'), 'const groupMetadata = {');
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'kvgate-ui-dataroot-'));
  try {
    const data = writeDataRoot(root, { api: 'text' });
    const file = JSON.parse(fs.readFileSync(path.join(data.userDir, 'groups', `${data.group.id}.json`), 'utf8'));
    assert.deepEqual(Object.keys(file).sort(), [...keys].sort());
    assert.equal(file.activation_strategy, 0, 'natural order');
    assert.equal(file.generation_mode, 0, 'swap character cards');
    assert.deepEqual(file.members, DEFAULT_CHARACTERS.map((c) => `${c.name}.png`));
    for (const m of file.members) assert.ok(fs.existsSync(path.join(data.userDir, 'characters', m)));
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
});
