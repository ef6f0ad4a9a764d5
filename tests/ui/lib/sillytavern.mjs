// A real SillyTavern (the npm package at KVGATE_SILLYTAVERN) for the UI
// tests: writes a fresh data root (config.yaml, the default user's
// settings.json, character cards as PNG files, a group, extensions) in the
// formats SillyTavern itself writes, and starts `node server.js` on it.
//
// Formats checked against SillyTavern 1.19.0's sources in the package:
//   config.yaml         default/config.yaml (only keys it has)
//   settings.json       default/content/settings.json, read by
//                       public/script.js, public/scripts/textgen-settings.js
//                       and public/scripts/openai.js
//   characters/*.png    src/character-card-parser.js `write` (a `chara` tEXt
//                       chunk with the V2 card, then `ccv3` with the V3 one,
//                       before IEND) of src/endpoints/characters.js
//                       `charaFormatData`
//   groups/<id>.json    src/endpoints/groups.js `/create`, fed what
//                       public/scripts/group-chats.js `createGroup` posts
//
// The very first start bundles public/lib.js with webpack (about 18 s on 2
// busy cores). Inside a container (is-docker) SillyTavern keeps the bundle
// and its cache in the package's dist/_webpack, shared by every run;
// elsewhere in DATA_ROOT/_webpack, so `startSillyTavern` copies a bundle
// cached by an earlier run into the fresh root (and caches the first one it
// builds). Later starts take about 3 s.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';

import { freePort, startProcess, waitUntil } from './stack.mjs';

/** The SillyTavern package folder (with server.js) and its version. */
export function sillyTavernDir() {
  const dir = process.env.KVGATE_SILLYTAVERN;
  if (!dir || !fs.existsSync(path.join(dir, 'server.js'))) {
    throw new Error(`KVGATE_SILLYTAVERN=${dir ?? ''} is not a SillyTavern package (no server.js); run scripts/browser-deps.sh`);
  }
  return dir;
}

export function sillyTavernVersion() {
  return JSON.parse(fs.readFileSync(path.join(sillyTavernDir(), 'package.json'), 'utf8')).version;
}

// ---------------------------------------------------------------- PNG cards

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

/** CRC-32 (ISO-HDLC, as PNG uses) of the given buffers in turn. */
export function crc32(...bufs) {
  let c = 0xffffffff;
  for (const b of bufs) for (const byte of b) c = CRC_TABLE[(c ^ byte) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function pngChunk(type, data) {
  const head = Buffer.alloc(8);
  head.writeUInt32BE(data.length, 0);
  head.write(type, 4, 'latin1');
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(head.subarray(4), data));
  return Buffer.concat([head, data, crc]);
}

/** A tEXt chunk as png-chunk-text encodes it: keyword, NUL, Latin-1 text. */
function textChunk(keyword, text) {
  return pngChunk('tEXt', Buffer.concat([Buffer.from(keyword, 'latin1'), Buffer.from([0]), Buffer.from(text, 'latin1')]));
}

/**
 * A PNG (8-bit RGB, one colour, `w`x`h`) carrying a character card the way
 * SillyTavern 1.19 writes one: `chara` = base64 of the V2 JSON, then `ccv3`
 * = base64 of the same object with `spec: chara_card_v3, spec_version: 3.0`,
 * both just before IEND.
 */
export function cardPng(card, { w = 64, h = 96, rgb = [90, 110, 150] } = {}) {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0);
  ihdr.writeUInt32BE(h, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // colour type: RGB
  const row = Buffer.alloc(1 + 3 * w); // filter byte 0, then pixels
  for (let x = 0; x < w; x++) row.set(rgb, 1 + 3 * x);
  const raw = Buffer.concat(Array.from({ length: h }, () => row));
  const v2 = JSON.stringify(card);
  const v3 = JSON.stringify({ ...card, spec: 'chara_card_v3', spec_version: '3.0' });
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    pngChunk('IHDR', ihdr),
    pngChunk('IDAT', zlib.deflateSync(raw)),
    textChunk('chara', Buffer.from(v2, 'utf8').toString('base64')),
    textChunk('ccv3', Buffer.from(v3, 'utf8').toString('base64')),
    pngChunk('IEND', Buffer.alloc(0)),
  ]);
}

/** Reads the `chara` card back out of a PNG (for the tests' own checks). */
export function readCardPng(buf) {
  const out = {};
  for (let i = 8; i < buf.length;) {
    const len = buf.readUInt32BE(i);
    const type = buf.toString('latin1', i + 4, i + 8);
    const data = buf.subarray(i + 8, i + 8 + len);
    if (crc32(buf.subarray(i + 4, i + 8), data) !== buf.readUInt32BE(i + 8 + len)) {
      throw new Error(`bad CRC in ${type} chunk`);
    }
    if (type === 'tEXt') {
      const nul = data.indexOf(0);
      out[data.toString('latin1', 0, nul)] = JSON.parse(Buffer.from(data.toString('latin1', nul + 1), 'base64').toString('utf8'));
    }
    i += 12 + len;
  }
  return out;
}

/** `humanizedDateTime` of SillyTavern's src/util.js: `2026-12-03@10h05m09s123ms`. */
export function humanizedDateTime(ms = Date.now()) {
  const d = new Date(ms);
  const p = (n, l = 2) => String(n).padStart(l, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}@${p(d.getHours())}h${p(d.getMinutes())}m${p(d.getSeconds())}s${p(d.getMilliseconds(), 3)}ms`;
}

/**
 * The card object `charaFormatData` builds from the character editor's form
 * (src/endpoints/characters.js), for a character with these V1 fields.
 */
export function characterCard({ name, description = '', personality = '', scenario = '', first_mes = '', mes_example = '', talkativeness = 0.5 }) {
  const created = new Date().toISOString();
  return {
    name, description, personality, scenario, first_mes, mes_example,
    creatorcomment: '',
    avatar: 'none',
    chat: `${name} - ${humanizedDateTime()}`,
    talkativeness,
    fav: false,
    tags: [],
    spec: 'chara_card_v2',
    spec_version: '2.0',
    data: {
      name, description, personality, scenario, first_mes, mes_example,
      creator_notes: '',
      system_prompt: '',
      post_history_instructions: '',
      tags: [],
      creator: '',
      character_version: '',
      alternate_greetings: [],
      extensions: {
        talkativeness,
        fav: false,
        world: '',
        depth_prompt: { prompt: '', depth: 4, role: 'system' },
      },
    },
    create_date: created,
  };
}

/**
 * Three short characters for a group chat. The tiny model reads one token
 * per byte, so cards and greetings are short: prompts stay well inside a
 * 1024-token slot and each turn is quick.
 */
export const DEFAULT_CHARACTERS = [
  {
    name: 'Alice',
    description: 'Alice keeps the Lantern inn by the harbor. She was a map maker and answers with exact distances.',
    personality: 'precise, brisk, warm',
    scenario: 'A stormy evening at the Lantern inn. User has just come in from the quay.',
    first_mes: '*Alice looks up from her ledger.* Room four is free. Which road did you take?',
    mes_example: '<START>\n{{user}}: How far is the lighthouse?\n{{char}}: Two miles and a quarter along the cliff path.',
    rgb: [200, 120, 60],
  },
  {
    name: 'Bob',
    description: 'Bob is the blacksmith who mends everything that breaks at the inn. He speaks little.',
    personality: 'calm, dry, kind',
    scenario: 'A stormy evening at the Lantern inn. User has just come in from the quay.',
    first_mes: '*Bob nods at the puddle by the door.* Hang your coat by the stove.',
    mes_example: '<START>\n{{user}}: Can you fix a lantern?\n{{char}}: Already did. Twice.',
    rgb: [70, 90, 110],
  },
  {
    name: 'Carol',
    description: 'Carol tends the garden and the sick room of the inn and makes herbal tea for every guest.',
    personality: 'cheerful, caring, chatty',
    scenario: 'A stormy evening at the Lantern inn. User has just come in from the quay.',
    first_mes: '*Carol hands over a steaming mug.* Nettle and ginger. Drink it all.',
    mes_example: '<START>\n{{user}}: What is in this tea?\n{{char}}: Nettle, ginger and a secret.',
    rgb: [90, 160, 90],
  },
];

// ---------------------------------------------------------- the data root

/** config.yaml for a local, offline test run (only keys 1.19's default has). */
export function configYaml() {
  // JSON is YAML: the yaml package SillyTavern uses reads it as is.
  return JSON.stringify({
    listen: false, // bind 127.0.0.1 only
    protocol: { ipv4: true, ipv6: false },
    whitelistMode: true,
    whitelist: ['127.0.0.1', '::1'],
    whitelistDockerHosts: false,
    enableForwardedWhitelist: false,
    basicAuthMode: false,
    enableUserAccounts: false,
    browserLaunch: { enabled: false },
    heartbeatInterval: 0,
    disableCsrfProtection: false, // the page fetches /csrf-token and sends it, as for a user
    securityOverride: false,
    requestProxy: { enabled: false },
    enableCorsProxy: false,
    // (whitelistImportDomains is not set: SillyTavern refills an empty list
    // from its default; the tests import nothing from URLs.)
    enableDownloadableTokenizers: false,
    extensions: { enabled: true, autoUpdate: false, models: { autoDownload: false } },
    enableServerPlugins: false,
    enableServerPluginsAutoUpdate: false,
    // Copies ST's bundled default content (presets, context templates) once:
    // the prompt formats come from it.
    skipContentCheck: false,
    logging: { enableAccessLog: false, minLogLevel: 0 },
    backups: { chat: { enabled: false } },
  }, null, 2) + '\n';
}

/**
 * The default user's settings.json: SillyTavern's shipped first-run
 * settings (default/content/settings.json) with
 *   - firstRun false (no welcome/persona popups),
 *   - `main_api` of the run (`textgenerationwebui` for Text Completion,
 *     `openai` for Chat Completion), so nothing at start tries an online
 *     API (the shipped default is the online AI Horde);
 *   - streaming on, a response length of `responseTokens`, a context of
 *     `contextTokens` (no larger than llama-server's per-slot context, or
 *     llama-server answers 400 "exceeds the available context size");
 *   - a fixed sampler seed, so a run's generated text repeats.
 * The API type/source and its URL are left for the test to set through the
 * API Connections panel, as a person would; `apiUrl` presets them instead
 * (for tests that don't exercise that panel).
 */
export function settingsJson({ api = 'text', apiUrl = null, responseTokens = 16, contextTokens = 1024, seed = 1, extensionSettings = {} } = {}) {
  const s = JSON.parse(fs.readFileSync(path.join(sillyTavernDir(), 'default/content/settings.json'), 'utf8'));
  s.firstRun = false;
  s.main_api = api === 'chat' ? 'openai' : 'textgenerationwebui';
  s.amount_gen = responseTokens;
  s.max_context = contextTokens;
  Object.assign(s.textgenerationwebui_settings, { streaming: true, seed });
  if (api === 'text' && apiUrl) {
    s.textgenerationwebui_settings.type = 'llamacpp';
    s.textgenerationwebui_settings.server_urls = { llamacpp: apiUrl };
  }
  Object.assign(s.oai_settings, {
    stream_openai: true,
    openai_max_context: contextTokens,
    openai_max_tokens: responseTokens,
    seed,
  });
  if (api === 'chat' && apiUrl) {
    Object.assign(s.oai_settings, { chat_completion_source: 'custom', custom_url: apiUrl });
  }
  Object.assign(s.extension_settings, extensionSettings);
  return s;
}

/**
 * Writes a fresh data root for the default user under `root`:
 * config.yaml (beside it: `root/config.yaml`), settings.json, the character
 * cards, one group of them in SillyTavern's defaults (natural order,
 * "swap character cards"), and each extension folder of `extensions`
 * copied to `default-user/extensions/<name>/`.
 * Returns `{root, configPath, userDir, characters: [{name, avatar}], group}`.
 */
export function writeDataRoot(root, {
  api = 'text', apiUrl = null, characters = DEFAULT_CHARACTERS, groupName = 'Lantern inn',
  extensions = [], settings = {},
} = {}) {
  const userDir = path.join(root, 'default-user');
  for (const d of ['characters', 'chats', 'groups', 'group chats', 'extensions']) {
    fs.mkdirSync(path.join(userDir, d), { recursive: true });
  }
  const configPath = path.join(root, 'config.yaml');
  fs.writeFileSync(configPath, configYaml());
  fs.writeFileSync(path.join(userDir, 'settings.json'),
    JSON.stringify(settingsJson({ api, apiUrl, ...settings }), null, 4));

  const written = [];
  for (const c of characters) {
    const card = characterCard(c);
    const avatar = `${c.name}.png`;
    fs.writeFileSync(path.join(userDir, 'characters', avatar), cardPng(card, { rgb: c.rgb }));
    // characters.js `/create` makes the character's chat folder with the card.
    fs.mkdirSync(path.join(userDir, 'chats', c.name), { recursive: true });
    written.push({ name: c.name, avatar });
  }

  let group = null;
  if (groupName && written.length > 1) {
    const id = String(Date.now());
    const chatId = humanizedDateTime();
    group = {
      id,
      name: groupName,
      members: written.map((c) => c.avatar),
      avatar_url: 'img/ai4.png', // public/script.js default_avatar
      allow_self_responses: false,
      activation_strategy: 0, // natural order
      generation_mode: 0, // swap character cards
      disabled_members: [],
      fav: false,
      chat_id: chatId,
      chats: [chatId],
      auto_mode_delay: 5,
      generation_mode_join_prefix: '',
      generation_mode_join_suffix: '',
    };
    fs.writeFileSync(path.join(userDir, 'groups', `${id}.json`), JSON.stringify(group, null, 4));
  }

  for (const ext of extensions) {
    const dest = path.join(userDir, 'extensions', path.basename(ext));
    fs.cpSync(ext, dest, { recursive: true });
  }
  return { root, configPath, userDir, characters: written, group };
}

// ------------------------------------------------------------ the server

function webpackCacheDir(version) {
  const base = process.env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache');
  return path.join(base, 'kvgate', `sillytavern-${version}-webpack`);
}

/**
 * Starts `node server.js --port P --dataRoot ROOT --configPath ROOT/config.yaml`
 * in the package folder and waits until `/csrf-token` answers (the page's
 * first call). Copies a cached webpack bundle into the root first, and
 * caches the one this start built if there was none. `port`: the port to
 * listen on (default: a free one), for a test that must know SillyTavern's
 * origin before it starts (kvgate's --admin-cors-origin). Returns
 * `{url, origin, proc}`.
 */
export async function startSillyTavern(run, data, { name = 'sillytavern', timeoutMs = 90000, port = null } = {}) {
  const dir = sillyTavernDir();
  const version = sillyTavernVersion();
  const cache = webpackCacheDir(version);
  const bundle = path.join(data.root, '_webpack');
  const cached = fs.existsSync(path.join(cache, 'complete'));
  if (cached && !fs.existsSync(bundle)) {
    fs.cpSync(path.join(cache, '_webpack'), bundle, { recursive: true });
  }
  port ??= await freePort();
  const proc = startProcess(run, name, process.execPath,
    ['server.js', '--port', String(port), '--dataRoot', data.root, '--configPath', data.configPath],
    { cwd: dir, env: { NODE_ENV: 'production', FORCE_COLOR: '0' }, graceMs: 5000 });
  const url = `http://127.0.0.1:${port}`;
  const t0 = Date.now();
  await waitUntil('SillyTavern to answer /csrf-token', async () => {
    const res = await fetch(`${url}/csrf-token`, { signal: AbortSignal.timeout(3000) });
    return res.ok;
  }, { timeoutMs, proc, everyMs: 250 });
  run.log(`SillyTavern ${version} up at ${url} in ${((Date.now() - t0) / 1000).toFixed(1)} s` +
    (cached ? ' (cached webpack bundle)' : ''));
  if (!cached && fs.existsSync(bundle)) {
    // Rename into place so a concurrent or interrupted copy is never used.
    const tmp = `${cache}.tmp-${process.pid}`;
    fs.rmSync(tmp, { recursive: true, force: true });
    fs.mkdirSync(tmp, { recursive: true });
    fs.cpSync(bundle, path.join(tmp, '_webpack'), { recursive: true });
    fs.writeFileSync(path.join(tmp, 'complete'), `${version}\n`);
    fs.rmSync(cache, { recursive: true, force: true });
    fs.renameSync(tmp, cache);
  }
  return { url, origin: url, proc };
}
