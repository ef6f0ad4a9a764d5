// Headless Chromium (KVGATE_CHROMIUM) driven by playwright-core (resolved
// from KVGATE_NODE_MODULES; no npm dependency of the repository), for any
// page the UI tests open: SillyTavern, kvgate's admin dashboard.
//
// Every request the page makes is routed: one to an allowed origin goes on,
// anything else (a CDN font, an update check, a telemetry ping) is aborted
// and recorded in `browser.blocked`, and `browser.assertClean()` fails the
// test if there was any, or any page error or console error. Console output
// goes to `browser-console.log` in the run folder.

import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';

/** playwright-core from KVGATE_NODE_MODULES. */
export function playwright() {
  const dir = process.env.KVGATE_NODE_MODULES;
  if (!dir || !fs.existsSync(path.join(dir, 'playwright-core'))) {
    throw new Error(`KVGATE_NODE_MODULES=${dir ?? ''} has no playwright-core; run scripts/browser-deps.sh`);
  }
  return createRequire(path.join(dir, 'noop.js'))('playwright-core');
}

export const CHROMIUM_FLAGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/**
 * Launches Chromium with a fresh profile in the run folder and opens one
 * page. `allowedOrigins`: origins (`http://127.0.0.1:PORT`) the page may
 * reach; `data:` and `blob:` URLs are local and always allowed.
 * `ignoreConsole`: regexps of console errors that are not failures (say
 * why where you pass one).
 * Returns `{browser, context, page, blocked, consoleErrors, pageErrors,
 * assertClean(), screenshot(name), close()}`.
 */
export async function openBrowser(run, { allowedOrigins, ignoreConsole = [], viewport = { width: 1280, height: 900 } }) {
  const exe = process.env.KVGATE_CHROMIUM || '/usr/bin/chromium';
  if (!fs.existsSync(exe)) throw new Error(`no Chromium at ${exe}; run scripts/browser-deps.sh`);
  const { chromium } = playwright();
  const profile = run.mkdir('browser-profile', { bulky: true });
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: exe,
    headless: true,
    args: CHROMIUM_FLAGS,
    viewport,
    serviceWorkers: 'block',
    acceptDownloads: false,
  });
  const allowed = new Set(allowedOrigins.map((o) => new URL(o).origin));
  const blocked = [];
  const consoleErrors = [];
  const pageErrors = [];
  const logFile = run.path('browser-console.log');
  const log = (line) => fs.appendFileSync(logFile, `[${(run.elapsed() / 1000).toFixed(1)}s] ${line}\n`);

  await context.route('**/*', (route) => {
    const url = route.request().url();
    let origin;
    try { origin = new URL(url).origin; } catch { origin = 'invalid'; }
    if (allowed.has(origin) || url.startsWith('data:') || url.startsWith('blob:')) {
      return route.continue();
    }
    blocked.push(url);
    log(`BLOCKED ${route.request().method()} ${url}`);
    return route.abort('blockedbyclient');
  });

  const watch = (page) => {
    page.on('console', (msg) => {
      const text = msg.text();
      log(`console.${msg.type()}: ${text}`);
      if (msg.type() === 'error' && !ignoreConsole.some((re) => re.test(text))) {
        consoleErrors.push(text);
      }
    });
    page.on('pageerror', (err) => {
      log(`pageerror: ${err.stack || err.message}`);
      pageErrors.push(err.message);
    });
  };
  context.on('page', watch);
  const page = context.pages()[0] ?? await context.newPage();
  watch(page);

  const screenshotDir = process.env.KVGATE_UI_SCREENSHOTS || run.mkdir('screenshots');
  fs.mkdirSync(screenshotDir, { recursive: true });

  let closed = false;
  const b = {
    context, page, blocked, consoleErrors, pageErrors,
    /** Saves a PNG of the page (or of `locator`) as `<run name>-<name>.png`. */
    async screenshot(name, locator) {
      const file = path.join(screenshotDir, `${run.name}-${name}.png`);
      await (locator ?? page).screenshot({ path: file });
      run.log(`screenshot ${file}`);
      return file;
    },
    /** Throws if the page tried to leave the allowed origins or logged errors. */
    assertClean() {
      const problems = [];
      if (blocked.length) problems.push(`requests outside ${[...allowed].join(', ')}: ${blocked.join(', ')}`);
      if (pageErrors.length) problems.push(`page errors: ${pageErrors.join(' | ')}`);
      if (consoleErrors.length) problems.push(`console errors: ${consoleErrors.join(' | ')}`);
      if (problems.length) throw new Error(`browser: ${problems.join('; ')} (see ${logFile})`);
    },
    async close() {
      if (closed) return;
      closed = true;
      await context.close().catch(() => {});
    },
  };
  run.defer(() => b.close());
  return b;
}
