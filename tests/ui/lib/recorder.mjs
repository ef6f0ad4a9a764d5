// A recording HTTP forwarder for the UI tests: SillyTavern's server talks to
// it instead of kvgate, and it forwards every request to kvgate unchanged
// (streamed answers stream through), writing one JSON line per request to a
// file:
//
//   {"seq", "label", "method", "path", "headers", "body"}
//
// `seq` counts every request from 1; `label` is what the test was doing
// (`recorder.label = 'swipe'`); `headers` are the ones SillyTavern sent,
// less Authorization, X-Api-Key and Cookie; `body` is the parsed JSON (or
// the text, or null). tests/ui/fixture.mjs turns a recording into a fixture
// of generation requests like tests/fixtures/st-1.18.0-completions.jsonl.

import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';

const SECRET_HEADERS = new Set(['authorization', 'x-api-key', 'cookie']);

/** The generation routes (the ones kvgate leases a slot for). */
export const GENERATION_PATHS = /^\/(v1\/)?(completion|completions|chat\/completions)$/;

/**
 * The file to record a run of `api` ('text' or 'chat') into, from
 * KVGATE_UI_RECORD: a `.jsonl` path gets `-<api>` before its extension;
 * anything else is a folder that gets
 * `st-<version>-<text|chat>-completions.jsonl`. Null when unset.
 */
export function recordPath(api, version) {
  const want = process.env.KVGATE_UI_RECORD;
  if (!want) return null;
  if (want.endsWith('.jsonl')) return want.replace(/\.jsonl$/, `-${api}.jsonl`);
  fs.mkdirSync(want, { recursive: true });
  return path.join(want, `st-${version}-${api}-completions.jsonl`);
}

/**
 * Starts the forwarder on a free loopback port in front of `targetUrl`.
 * Returns `{url, label, requests, close()}`; `requests` holds every record
 * (also written to `file` when given).
 */
export async function startRecorder(run, targetUrl, { file = null } = {}) {
  const target = new URL(targetUrl);
  if (file) fs.writeFileSync(file, '');
  const rec = { url: null, label: null, requests: [] };
  let seq = 0;
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const raw = Buffer.concat(chunks);
      const headers = {};
      for (const [k, v] of Object.entries(req.headers)) {
        if (!SECRET_HEADERS.has(k)) headers[k] = v;
      }
      let body = null;
      if (raw.length) {
        try { body = JSON.parse(raw.toString('utf8')); } catch { body = raw.toString('utf8'); }
      }
      const entry = { seq: ++seq, label: rec.label, method: req.method, path: req.url, headers, body };
      rec.requests.push(entry);
      if (file) fs.appendFileSync(file, JSON.stringify(entry) + '\n');

      const up = http.request({
        host: target.hostname, port: target.port, method: req.method, path: req.url,
        headers: { ...req.headers, host: target.host },
      }, (upRes) => {
        res.writeHead(upRes.statusCode, upRes.headers);
        upRes.pipe(res);
      });
      up.on('error', (e) => {
        run.log(`recorder: ${req.method} ${req.url} to kvgate failed: ${e.message}`);
        if (!res.headersSent) res.writeHead(502);
        res.end();
      });
      // The client going away (ST's Stop button) cancels the upstream request.
      res.on('close', () => { if (!res.writableFinished) up.destroy(); });
      up.end(raw);
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  rec.url = `http://127.0.0.1:${server.address().port}`;
  rec.close = () => new Promise((resolve) => {
    server.closeAllConnections();
    server.close(() => resolve());
  });
  run.defer(() => rec.close());
  run.log(`recorder ${rec.url} -> ${targetUrl}${file ? ` writing ${file}` : ''}`);
  return rec;
}
