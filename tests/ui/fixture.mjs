#!/usr/bin/env node
// Turns a recording of the UI tests (KVGATE_UI_RECORD, see
// tests/ui/lib/recorder.mjs) into a fixture of SillyTavern's generation
// requests, in the shape of tests/fixtures/st-1.18.0-completions.jsonl:
// one JSON object per line with `seq` (the request's number among all
// requests SillyTavern sent, /tokenize and /v1/models included) and `body`,
// plus `label` (the test step), `method`, `path` and `headers`.
//
//   node tests/ui/fixture.mjs RECORDING.jsonl > tests/fixtures/NAME.jsonl

import fs from 'node:fs';

import { GENERATION_PATHS } from './lib/recorder.mjs';

const [input] = process.argv.slice(2);
if (!input) {
  console.error('usage: node tests/ui/fixture.mjs RECORDING.jsonl > FIXTURE.jsonl');
  process.exit(64);
}
const out = [];
for (const line of fs.readFileSync(input, 'utf8').split('\n')) {
  if (!line.trim()) continue;
  const r = JSON.parse(line);
  if (r.method !== 'POST' || !GENERATION_PATHS.test(r.path)) continue;
  out.push(JSON.stringify({ seq: r.seq, label: r.label, method: r.method, path: r.path, headers: r.headers, body: r.body }));
}
if (!out.length) {
  console.error(`${input}: no generation requests`);
  process.exit(1);
}
process.stdout.write(out.join('\n') + '\n');
