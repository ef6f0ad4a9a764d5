// The process side of the UI tests: free ports, a per-run folder, child
// processes in their own process groups (stopped at the end, killed if the
// test process dies), kvgate supervising llama-server with the tiny model,
// and a reader of kvgate's admin `/events` stream.
//
// Everything a run starts is registered with its `Run`, and `run.close()`
// stops it in reverse order. Logs go to files in the run folder; on failure
// the folder is kept and its path printed.
//
// Environment (set by scripts/ui-test.sh):
//   KVGATE_BIN           kvgate binary (default: target/release/kvgate)
//   KVGATE_LLAMA_SERVER  llama-server binary (default: kvgate's own search)
//   KVGATE_UI_MODEL      the tiny GGUF model (default: written per process)
//   KVGATE_UI_KEEP=1     keep every run folder, not only failed ones

import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

/** A free TCP port on 127.0.0.1 (the OS picks it; closed before use). */
export async function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

// Process groups still alive, killed with SIGKILL if the test process exits
// without closing its runs (a thrown error, Ctrl-C, a test timeout).
const liveGroups = new Set();
function killLeftovers() {
  for (const pid of liveGroups) {
    try { process.kill(-pid, 'SIGKILL'); } catch { /* already gone */ }
  }
  liveGroups.clear();
}
process.on('exit', killLeftovers);
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => { killLeftovers(); process.exit(130); });
}

/**
 * One test run: a temp folder, its logs, and what was started in it.
 * `run.path(name)` names a file in it; `run.defer(fn)` registers a cleanup;
 * `run.close(failed)` runs the cleanups (last first), then removes the bulky
 * parts of the folder (data roots, saves, model) unless it failed or
 * KVGATE_UI_KEEP=1; logs and screenshots stay and their path is printed.
 */
export class Run {
  constructor(name) {
    this.name = name;
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), `kvgate-ui-${name}-`));
    this.cleanups = [];
    this.bulky = [];
    this.t0 = Date.now();
  }

  path(...parts) { return path.join(this.dir, ...parts); }

  /** A subfolder, created; `bulky` ones are removed after a passing run. */
  mkdir(name, { bulky = false } = {}) {
    const p = this.path(name);
    fs.mkdirSync(p, { recursive: true });
    if (bulky) this.bulky.push(p);
    return p;
  }

  defer(fn) { this.cleanups.push(fn); }

  /** Milliseconds since the run started, for log lines. */
  elapsed() { return Date.now() - this.t0; }

  log(...args) {
    const line = `[${(this.elapsed() / 1000).toFixed(1).padStart(6)}s ${this.name}] ${args.join(' ')}`;
    console.log(line);
    fs.appendFileSync(this.path('run.log'), line + '\n');
  }

  async close(failed) {
    const errors = [];
    while (this.cleanups.length) {
      const fn = this.cleanups.pop();
      const t0 = Date.now();
      try { await fn(); } catch (e) { errors.push(e); }
      if (Date.now() - t0 > 2000) this.log(`cleanup took ${Date.now() - t0} ms: ${fn.label ?? fn}`);
    }
    const keep = failed || process.env.KVGATE_UI_KEEP === '1';
    if (!keep) {
      for (const p of this.bulky) fs.rmSync(p, { recursive: true, force: true });
    }
    console.log(`${this.name}: ${failed ? 'FAILED, logs' : 'logs'} in ${this.dir}` +
      (keep ? '' : ' (bulky parts removed: data roots, saves, browser profile)'));
    if (errors.length) throw new AggregateError(errors, `${this.name}: cleanup failed`);
  }
}

/**
 * `withRun(name, fn)`: runs `fn(run)` and closes the run afterwards, keeping
 * the folder when `fn` threw.
 */
export async function withRun(name, fn) {
  const run = new Run(name);
  let failed = true;
  try {
    const out = await fn(run);
    failed = false;
    return out;
  } finally {
    await run.close(failed);
  }
}

/**
 * Starts a command in its own process group with stdout and stderr appended
 * to `logFile`. Returns `{pid, child, exited, logFile, stop()}`; `exited` is a
 * promise of the exit code (or signal name). `stop()` sends SIGTERM to the
 * process (only: kvgate stops its llama-server itself), waits `graceMs`, then
 * SIGKILLs the whole group, so nothing it started is left behind.
 */
export function startProcess(run, name, cmd, args, { cwd, env, graceMs = 15000 } = {}) {
  const logFile = run.path(`${name}.log`);
  const fd = fs.openSync(logFile, 'a');
  const child = spawn(cmd, args, {
    cwd,
    env: { ...process.env, ...env },
    stdio: ['ignore', fd, fd],
    detached: true, // a process group of its own: the group can be killed whole
  });
  fs.closeSync(fd);
  const pid = child.pid;
  if (pid) liveGroups.add(pid);
  const exited = new Promise((resolve) => {
    child.on('exit', (code, signal) => resolve(code ?? signal));
    child.on('error', (e) => resolve(`spawn error: ${e.message}`));
  });
  let stopping = null;
  const proc = {
    name, pid, child, exited, logFile,
    stop() {
      stopping ??= (async () => {
        if (child.exitCode === null && child.signalCode === null) {
          try { process.kill(pid, 'SIGTERM'); } catch { /* gone */ }
          const timeout = sleep(graceMs, 'timeout', { ref: false });
          if ((await Promise.race([exited, timeout])) === 'timeout') {
            run.log(`${name} did not stop within ${graceMs} ms: SIGKILL`);
          }
        }
        // The group: anything the process left running (llama-server,
        // Chromium's helpers) goes with it.
        try { process.kill(-pid, 'SIGKILL'); } catch { /* group empty */ }
        liveGroups.delete(pid);
        await exited;
      })();
      return stopping;
    },
  };
  run.defer(() => proc.stop());
  return proc;
}

/** The last `n` lines of a log file, for error messages. */
export function tail(file, n = 30) {
  try {
    return fs.readFileSync(file, 'utf8').trimEnd().split('\n').slice(-n).join('\n');
  } catch {
    return '(no log)';
  }
}

/**
 * Polls `probe()` every `everyMs` until it returns a truthy value (returned),
 * `proc` (if given) exits (throws with its log's tail), or `timeoutMs` passes.
 */
export async function waitUntil(what, probe, { timeoutMs = 60000, everyMs = 200, proc } = {}) {
  const deadline = Date.now() + timeoutMs;
  let lastError;
  let gone = false;
  proc?.exited.then(() => { gone = true; });
  while (Date.now() < deadline) {
    try {
      const v = await probe();
      if (v) return v;
    } catch (e) {
      lastError = e;
    }
    if (gone) {
      throw new Error(`${proc.name} exited (${await proc.exited}) while waiting for ${what}; ` +
        `log ${proc.logFile}:\n${tail(proc.logFile)}`);
    }
    await sleep(everyMs);
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}` +
    (lastError ? ` (last error: ${lastError.message})` : '') +
    (proc ? `; log ${proc.logFile}:\n${tail(proc.logFile)}` : ''));
}

/** The kvgate binary to test. */
export function kvgateBin() {
  const bin = process.env.KVGATE_BIN || path.join(REPO, 'target/release/kvgate');
  if (!fs.existsSync(bin)) throw new Error(`no kvgate binary at ${bin} (cargo build --release)`);
  return bin;
}

let modelPromise = null;
/**
 * The tiny random-weight model (one token per byte, 11 MB): KVGATE_UI_MODEL,
 * else written once per test process by `kvgate demo --write-model PATH`
 * (whole or not at all). The file is checked for the GGUF magic.
 */
export function tinyModel() {
  modelPromise ??= (async () => {
    if (process.env.KVGATE_UI_MODEL) return process.env.KVGATE_UI_MODEL;
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kvgate-ui-model-'));
    process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
    const model = path.join(dir, 'demo-model.gguf');
    const r = spawnSync(kvgateBin(), ['demo', '--write-model', model], { encoding: 'utf8' });
    const magic = fs.existsSync(model) ? fs.readFileSync(model).subarray(0, 4).toString() : '';
    if (r.status !== 0 || magic !== 'GGUF') {
      throw new Error(`kvgate demo --write-model wrote no model at ${model} (exit ${r.status}): ${r.stdout}${r.stderr}`);
    }
    return model;
  })();
  return modelPromise;
}

/** GET a URL and parse JSON; throws on a non-2xx status. */
export async function getJson(url, init) {
  const res = await fetch(url, { ...init, signal: AbortSignal.timeout(5000) });
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
  return res.json();
}

/**
 * Starts kvgate running llama-server with the tiny model:
 * `--model M --slots N --ctx C --save-dir DIR`, both ports on free loopback
 * ports, with `adminKey` as its admin key if given (in the environment, not
 * on the command line). Waits until kvgate knows llama-server's slots (its
 * /upstreams shows the upstream up with N slots). Returns
 * `{frontUrl, adminUrl, saveDir, proc, events, adminHeaders, admin}` with
 * `events` the live `/events` reader (see `watchEvents`), started before
 * any request, and `admin(method, path, body?)` an admin API call with the
 * key, resolving to `{status, body}`.
 */
export async function startKvgate(run, { slots = 2, ctx = 2048, args = [], llamaArgs = [], adminKey = null } = {}) {
  const model = await tinyModel();
  const [front, admin] = [await freePort(), await freePort()];
  const saveDir = run.mkdir('saves', { bulky: true });
  const argv = [
    '--listen', `127.0.0.1:${front}`,
    '--admin-listen', `127.0.0.1:${admin}`,
    '--model', model,
    '--slots', String(slots),
    '--ctx', String(ctx),
    '--save-dir', saveDir,
    ...(process.env.KVGATE_LLAMA_SERVER ? ['--llama-server', process.env.KVGATE_LLAMA_SERVER] : []),
    ...args,
  ];
  if (llamaArgs.length) argv.push('--', ...llamaArgs);
  const proc = startProcess(run, 'kvgate', kvgateBin(), argv, {
    env: {
      KVGATE_LOG: process.env.KVGATE_LOG || 'info',
      ...(adminKey ? { KVGATE_ADMIN_KEY: adminKey } : {}),
    },
  });
  const adminUrl = `http://127.0.0.1:${admin}`;
  const frontUrl = `http://127.0.0.1:${front}`;
  const adminHeaders = adminKey ? { 'x-admin-key': adminKey } : {};
  await waitUntil('kvgate to know llama-server\'s slots', async () => {
    const { upstreams } = await getJson(`${adminUrl}/upstreams`, { headers: adminHeaders });
    return upstreams?.[0]?.up && upstreams[0].slots === slots;
  }, { timeoutMs: 60000, proc });
  const events = await watchEvents(run, adminUrl, { headers: adminHeaders });
  run.log(`kvgate up: front ${frontUrl}, admin ${adminUrl}, ${slots} slots x ${ctx} tokens`);
  const adminCall = async (method, path, body) => {
    const res = await fetch(`${adminUrl}${path}`, {
      method,
      headers: { ...adminHeaders, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
      body: body !== undefined ? JSON.stringify(body) : undefined,
      signal: AbortSignal.timeout(60000),
    });
    const text = await res.text();
    let parsed = null;
    try { parsed = text ? JSON.parse(text) : null; } catch { parsed = text; }
    return { status: res.status, body: parsed };
  };
  return { frontUrl, adminUrl, saveDir, proc, events, adminHeaders, admin: adminCall };
}

/**
 * Reads kvgate's admin `GET /events` (SSE) into `events.list` (parsed
 * `data:` objects, each with `at`, ms since the run began) and appends them
 * to `events.jsonl` in the run folder. `events.waitFor(pred, ms)` resolves
 * with the first event (from `events.list[from]` on) matching `pred`;
 * `events.mark()` is the current length, to look only at later events.
 * Resolves once the stream is open, so no event after it is missed.
 * `headers`: sent with the request (the admin key).
 */
export async function watchEvents(run, adminUrl, { headers = {} } = {}) {
  const list = [];
  const waiters = new Set();
  const controller = new AbortController();
  const file = run.path('events.jsonl');
  const res = await fetch(`${adminUrl}/events`, {
    headers: { accept: 'text/event-stream', ...headers },
    signal: controller.signal,
  });
  if (!res.ok || !res.body) throw new Error(`${adminUrl}/events: HTTP ${res.status}`);
  let closed = false;
  const done = (async () => {
    const decoder = new TextDecoder();
    let buf = '';
    try {
      for await (const chunk of res.body) {
        buf += decoder.decode(chunk, { stream: true });
        let cut;
        while ((cut = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          const data = block.split('\n').filter((l) => l.startsWith('data:'))
            .map((l) => l.slice(5).trimStart()).join('\n');
          if (!data) continue;
          let ev;
          try { ev = JSON.parse(data); } catch { ev = { type: 'unparsed', data }; }
          ev.at = run.elapsed();
          list.push(ev);
          fs.appendFileSync(file, JSON.stringify(ev) + '\n');
          for (const w of waiters) w();
        }
      }
    } catch (e) {
      if (!closed) run.log(`/events stream broke: ${e.message}`);
    }
  })();
  const events = {
    list,
    mark: () => list.length,
    /** All events of a type from index `from` on. */
    of: (type, from = 0) => list.slice(from).filter((e) => e.type === type),
    waitFor(pred, timeoutMs = 30000, from = 0) {
      return new Promise((resolve, reject) => {
        const check = () => {
          const hit = list.slice(from).find(pred);
          if (hit) { waiters.delete(check); clearTimeout(timer); resolve(hit); }
        };
        const timer = setTimeout(() => {
          waiters.delete(check);
          reject(new Error(`no matching kvgate event within ${timeoutMs} ms (see ${file})`));
        }, timeoutMs);
        waiters.add(check);
        check();
      });
    },
    async close() { closed = true; controller.abort(); await done; },
  };
  run.defer(() => events.close());
  return events;
}

/** `startStack(run, opts)`: kvgate with llama-server; see `startKvgate`. */
export async function startStack(run, opts = {}) {
  return startKvgate(run, opts);
}
